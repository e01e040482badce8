"""Embedding throughput per inference runtime on this CPU, and the verification protocol's speed on 6,000
pairs.

    python benchmarks/bench_embed.py [--runtimes openvino onnxruntime torch] [--batches 1 64] [--threads 1 2]
                                     [--rounds 3] [--seconds 2] [--flip] [--backbone mobilefacenet]

Each runtime runs in its own process (so its peak memory is its own), holding the BatchEmbedder the
evaluation and the packages use (uint8 crops in, preprocessing included). The rounds alternate: every round measures
each (batch, threads) on every runtime in turn, so a neighbour's load falls on all of them alike. Prints
the median images/s over the rounds (image + mirror count as one image with --flip), the ratio to torch
of the medians and of the best rounds (the least disturbed on a shared machine), the process CPU time per
image (all its threads, spinning included: less sensitive to a neighbour's load than wall time) and each
process's peak RSS. The ONNX export is made (and cached) before the workers start.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _worker(conn, runtime: str, spec_json: str, flip: bool) -> None:
    """One runtime's process: a BatchEmbedder per thread count; answers ("measure", batch, threads, seconds)
    with (images/s, process CPU ms per image), ("peak",) with its peak RSS in MiB."""
    from mfr_ray.evaluation.embed import BatchEmbedder
    from mfr_ray.models.spec import ModelSpec
    from mfr_ray.threads import use_threads

    spec = ModelSpec.model_validate_json(spec_json)
    embedders: dict[int, BatchEmbedder] = {}
    warm: set[tuple[int, int]] = set()
    rng = np.random.default_rng(0)
    while (message := conn.recv())[0] != "stop":
        if message[0] == "peak":
            conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            continue
        _, batch, threads, seconds = message
        if threads not in embedders:
            embedders[threads] = BatchEmbedder(spec, flip=flip, num_threads=threads, runtime=runtime)
        embedder = embedders[threads]
        use_threads(threads)
        height, width = embedder.input_size
        crops = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
        if (batch, threads) not in warm:  # once: OpenVINO compiles each batch shape on first sight
            embedder({"crop": crops})
            warm.add((batch, threads))
        done, start, cpu = 0, time.perf_counter(), time.process_time()
        while (elapsed := time.perf_counter() - start) < seconds:
            embedder({"crop": crops})
            done += batch
        conn.send((done / elapsed, (time.process_time() - cpu) * 1000 / done))


def _export_once(spec) -> None:
    """The cached ONNX export, made here so no worker's time or memory includes exporting."""
    from mfr_ray.runtime.onnx import export_onnx, spec_onnx_file

    target = spec_onnx_file(spec)
    if target is not None and not target.is_file():
        export_onnx(spec.load(), target)


def _measure(args, spec) -> tuple[dict, dict, dict]:
    """Alternated rounds over runtime processes: {(runtime, batch, threads): [img/s]}, the same of CPU
    ms/image, {runtime: MiB}."""
    context = mp.get_context("spawn")
    pipes = {}
    for runtime in args.runtimes:
        parent, child = context.Pipe()
        context.Process(target=_worker, args=(child, runtime, spec.model_dump_json(), args.flip), daemon=True).start()
        pipes[runtime] = parent
    rates: dict[tuple, list[float]] = {}
    cpu: dict[tuple, list[float]] = {}
    for round_ in range(args.rounds):
        for batch in args.batches:
            for threads in args.threads:
                for runtime in args.runtimes if round_ % 2 == 0 else reversed(args.runtimes):
                    pipes[runtime].send(("measure", batch, threads, args.seconds))
                    rate, cpu_ms = pipes[runtime].recv()
                    rates.setdefault((runtime, batch, threads), []).append(rate)
                    cpu.setdefault((runtime, batch, threads), []).append(cpu_ms)
    peaks = {}
    for runtime, pipe in pipes.items():
        pipe.send(("peak",))
        peaks[runtime] = pipe.recv()
        pipe.send(("stop",))
    return rates, cpu, peaks


def _report(args, rates: dict, cpu: dict, peaks: dict) -> None:
    print(f"{args.backbone}, {args.rounds} alternated rounds of {args.seconds:g} s each, flip={args.flip}; "
          "median images/s (min-max), ratio to torch")
    print(f"{'runtime':<12} {'batch':>5} {'threads':>7} {'img/s':>8} {'range':>11} {'x torch':>8} {'best x':>7} "
          f"{'CPU ms/img':>10} {'x torch':>8}")
    for batch in args.batches:
        for threads in args.threads:
            base = rates.get(("torch", batch, threads))
            for runtime in args.runtimes:
                values = rates[(runtime, batch, threads)]
                median = statistics.median(values)
                ratio = f"{median / statistics.median(base):.2f}" if base else "-"
                best = f"{max(values) / max(base):.2f}" if base else "-"  # the least disturbed rounds
                cpu_ms = statistics.median(cpu[(runtime, batch, threads)])
                cpu_ratio = f"{statistics.median(cpu[('torch', batch, threads)]) / cpu_ms:.2f}" if base else "-"
                print(f"{runtime:<12} {batch:>5} {threads:>7} {median:>8.1f} "
                      f"{f'{min(values):.0f}-{max(values):.0f}':>11} {ratio:>8} {best:>7} {cpu_ms:>10.2f} {cpu_ratio:>8}")
    print("peak RSS per runtime process: " + ", ".join(f"{r} {m:.0f} MiB" for r, m in peaks.items()))


def _protocol_speed() -> None:
    from mfr_ray.evaluation.verification import kfold_verification

    rng = np.random.default_rng(0)
    same = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], 10)
    scores = np.where(same, rng.normal(0.6, 0.1, same.size), rng.normal(0.1, 0.1, same.size))
    start = time.perf_counter()
    kfold_verification(scores, same, np.repeat(np.arange(10), 600), far_targets=[1e-3, 1e-2])
    print(f"10-fold protocol on 6,000 pairs (2 FAR targets): {(time.perf_counter() - start) * 1000:.1f} ms")


def main() -> None:
    from mfr_ray.models.spec import ModelSpec
    from mfr_ray.paths import shared_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="mobilefacenet")
    parser.add_argument("--checkpoint", default=str(shared_dir() / "weights" / "mobilefacenet_casia.ckpt"))
    parser.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime", "torch"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per round and setting")
    parser.add_argument("--flip", action="store_true", help="embed each mirror image too (as evaluation does)")
    args = parser.parse_args()

    spec = ModelSpec(backbone=args.backbone, checkpoint=args.checkpoint or None)
    _export_once(spec)
    _report(args, *_measure(args, spec))
    _protocol_speed()


if __name__ == "__main__":
    main()
