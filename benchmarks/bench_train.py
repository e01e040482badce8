"""Training throughput: Ray Train (N CPU workers, DDP over gloo, Ray Data shards) against a plain
single-process PyTorch loop on the same model, loss, global batch and total cores.

    python benchmarks/bench_train.py --config configs/train_mobilefacenet_distill.yaml \
        data.uri=outputs/datasets/celeba299-112x96 [--steps 20] [--epochs 3] [--batch 32]

Images = crops through the backbone (a pair counts 2). Both sides decode the same encoded crops per step;
the first epoch (worker start, warm-up) is left out of the Ray figure, the first steps of the plain loop
likewise. Prints images/s of each, their ratio and peak memory (resident set size), and the CPU seconds per
image of each side: the plain process, and every process of the local Ray (workers, ingest, raylet, GCS,
driver) from the report of the first epoch to the report of the last (checkpoints and reports included).
On a machine other jobs load, the wall-clock figures follow the load; the CPU seconds per image much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from ray.train import UserCallback

from mfr_ray.config import load_config
from mfr_ray.config.common import RayConfig
from mfr_ray.raycluster import init_ray
from mfr_ray.train.config import TrainConfig


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of `root` and every process below it (a local Ray: raylet, GCS, workers)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo, seen = 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            total += times.get(pid, 0.0)
            todo += children.get(pid, [])
    return total


class ReportClock(UserCallback):
    """A Ray Train callback (it runs in the train controller): at every report, the wall clock and the CPU
    seconds of the whole local Ray, appended to a JSON-lines file."""

    def __init__(self, driver_pid: int, path: str):
        self.driver_pid, self.path = driver_pid, path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        line = {"time": time.time(), "cpu_s": tree_cpu_seconds(self.driver_pid), "metrics": metrics[0]}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line) + "\n")


def plain_loop(
    cfg: TrainConfig, num_classes: int, rows: list[dict], steps: int, warmup: int, threads: int
) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of the same step (decode, flip, forward both crops, loss, backward,
    clip, SGD) in one process."""
    from mfr_ray.models import preprocess
    from mfr_ray.train.data import decode_pairs
    from mfr_ray.train.loop import build_optimizer
    from mfr_ray.train.model import build_model, compute_loss

    torch.set_num_threads(threads)
    model = build_model(cfg, num_classes)
    optimizer = build_optimizer(cfg.optim, model)
    size, pixels = model.backbone.backbone_config.input_size, model.backbone.backbone_config.normalisation
    batch = cfg.schedule.batch_size * cfg.scaling.num_workers
    rng = np.random.default_rng(0)
    images, started, cpu_started = 0, None, None
    for step in range(warmup + steps):
        if step == warmup:
            images, started, cpu_started = 0, time.perf_counter(), time.process_time()
        chosen = [rows[i] for i in rng.integers(0, len(rows), batch)]
        unmasked, masked, valid = decode_pairs(
            [r["image_unmasked"] for r in chosen], [r["image_masked"] for r in chosen], size
        )
        flip = rng.random(len(unmasked)) < 0.5
        unmasked[flip] = unmasked[flip, :, ::-1]
        masked[flip] = masked[flip, :, ::-1]
        labels = torch.as_tensor(np.asarray([r["identity_id"] for r in chosen])[valid].astype(np.int64))
        loss = compute_loss(cfg.loss, model, preprocess(unmasked, pixels), preprocess(masked, pixels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm or float("inf"))
        optimizer.step()
        images += 2 * len(labels)
    return images / (time.perf_counter() - started), (time.process_time() - cpu_started) / images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per epoch / of the plain loop")
    parser.add_argument("--epochs", type=int, default=3, help="Ray epochs (the first is warm-up)")
    parser.add_argument("--batch", type=int, default=32, help="pairs per worker and step")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--cores", type=int, default=2, help="total cores: plain-loop threads, Ray's num_cpus"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from mfr_ray.data import paired_dataset
    from mfr_ray.train import run_training
    from mfr_ray.train.data import label_count

    threads = max(args.cores // args.workers, 1)
    cfg = load_config(args.config, args.overrides, expected=TrainConfig)
    storage = tempfile.mkdtemp(prefix="bench-train-")
    cfg = cfg.model_copy(
        update={
            "schedule": cfg.schedule.model_copy(
                update={"epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": args.batch}
            ),
            "scaling": cfg.scaling.model_copy(
                update={
                    "num_workers": args.workers,
                    "use_gpu": False,
                    "cpus_per_worker": (args.cores - cfg.data.ingest_cpus) / args.workers,  # ingest fits beside
                    "torch_threads": threads,
                }
            ),
            "checkpoint": cfg.checkpoint.model_copy(
                update={"storage_path": storage, "max_failures": 0, "num_to_keep": None}
            ),
            "data": cfg.data.model_copy(update={"val_identities": 0, "on_the_fly_masking": False}),
            "tracking": cfg.tracking.model_copy(update={"enabled": False}),
            "registered_model_name": None,
        }
    )
    init_ray(RayConfig(num_cpus=args.cores, include_dashboard=False), log_to_driver=False)
    num_classes = label_count(cfg.data, cfg.storage)
    rows = paired_dataset(cfg.data.uri, cfg.storage, cfg.data.masked_variant, cfg.data.seed).take(2000)

    plain, plain_cpu = plain_loop(cfg, num_classes, rows, args.steps, warmup=3, threads=args.cores)
    plain_rss = peak_rss_mb()
    clock_file = Path(storage) / "reports.jsonl"
    clock = ReportClock(os.getpid(), str(clock_file))
    started = time.perf_counter()
    outcome = run_training(cfg, run_name="bench", extra_callbacks=[clock])
    wall = time.perf_counter() - started
    reports = [json.loads(line) for line in clock_file.read_text().splitlines()]
    first, last = reports[0], reports[-1]
    steady_images = sum(
        r["metrics"]["epoch_steps"] * args.batch * args.workers * 2 for r in reports[1:]
    )
    steady_wall_ips = steady_images / (last["time"] - first["time"])
    ray_cpu = (last["cpu_s"] - first["cpu_s"]) / steady_images
    data_wait = [r["metrics"].get("epoch_data_wait_s") for r in reports[1:]]
    history = [m for _, m in outcome.result.best_checkpoints or []]
    steady = [m["epoch_images_per_s"] for m in history if m["epoch"] >= 1]
    ray_ips = float(np.mean(steady)) if steady else outcome.result.metrics["epoch_images_per_s"]
    worker_rss = max(m.get("peak_rss_mb", 0.0) for m in history) if history else float("nan")
    ray.shutdown()

    print(
        f"model {cfg.model.backbone} {cfg.loss.kind}/{getattr(cfg.loss, 'distillation', '-')}, global batch "
        f"{args.batch * args.workers} pairs, {args.cores} cores"
    )
    print(
        f"plain PyTorch, 1 process x {args.cores} threads: {plain:.1f} images/s, peak RSS {plain_rss:.0f} MB"
    )
    print(
        f"Ray Train, {args.workers} workers x {threads} thread(s): {ray_ips:.1f} images/s (epochs >= 1), "
        f"wall {wall:.1f} s for {args.epochs} x {args.steps} steps incl. start-up, worker peak RSS {worker_rss:.0f} MB"
    )
    print(f"ratio Ray / plain: {ray_ips / plain:.2f}")
    print(
        f"Ray Train report to report (epochs >= 1, checkpoints included): {steady_wall_ips:.1f} images/s, "
        f"ratio {steady_wall_ips / plain:.2f}"
        + (f"; rank 0 waited {np.mean(data_wait):.2f} s per epoch for data" if None not in data_wait else "")
    )
    print(
        f"CPU seconds per 100 images: plain {100 * plain_cpu:.2f}, Ray (all its processes) {100 * ray_cpu:.2f}; "
        f"ratio plain / Ray (the throughput ratio on idle cores): {plain_cpu / ray_cpu:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
