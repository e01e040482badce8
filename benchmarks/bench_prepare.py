"""Throughput and peak memory of the dataset-preparation job.

Runs `jobs/prepare_dataset.py` as a fresh process per case (its own local Ray), into a scratch output,
and samples the proportional set size (PSS, so shared object-store pages count once) and CPU time of
every process in the job's session: the driver, the Ray daemons and the actors. Prints images/s end to
end, how that splits into start-up (process start to the first shard starting: Ray, the actors' model
loading) and the steady rate while shards run, where the actor time goes (read, decode, align, mask, encode,
write), which processes used the CPU, and the peak memory.

The machine's speed drifts by tens of percent over minutes on shared hosts, so `--repeat N` runs the cases
in rounds (1, 2, 1, 2, ...) and compares the medians; each round's own ratio is printed too.

    python benchmarks/bench_prepare.py --config configs/prepare_lfw_eval.yaml \
        --cases 1300:1 1300:2 13233:1 13233:2 --repeat 2

`--detector N` instead times the aligner's MTCNN (`mtcnn_detect`, every candidate box resampled at once)
against facenet-pytorch's own `MTCNN.detect` (one interpolate call per box) on N LFW images with the
config's align settings, in one process on one thread, alternating rounds, and checks they agree:

    python benchmarks/bench_prepare.py --detector 96 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mfr_ray.data.layout import CARD_JSON, DONE_DIR

REPO = Path(__file__).resolve().parent.parent


def session_processes(session_id: int) -> dict[str, tuple[int, float]]:
    """PSS bytes and CPU seconds so far of each process whose session id is `session_id` (the job and
    everything it spawned), keyed by "pid name" (name: the process title, e.g. ray::MapWorker(...),
    raylet, gcs_server, python)."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session_id:  # fields after the command: state ppid pgrp session ...
                continue
            cpu_s = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            title = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            name = Path(title.split()[0]).name if title else "?"
            for line in (stat.parent / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    found[f"{stat.parent.name} {name[:40]}"] = (int(line.split()[1]) * 1024, cpu_s)
                    break
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return found


class ProcessSampler(threading.Thread):
    """Samples the job's processes: the peak of the summed PSS, each process's own peak (where growth
    happens) and its CPU seconds at the last sample (where the 2 cores go besides the actors)."""

    def __init__(self, session_id: int, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.session_id, self.interval_s, self.peak, self.running = session_id, interval_s, 0, True
        self.per_process: dict[str, int] = {}
        self.cpu_s: dict[str, float] = {}

    def run(self) -> None:
        # Lowest priority: reading smaps_rollup of every process costs ~12% of a core, which would otherwise
        # be taken from the job (from the actors once both cores are busy) and bias the 1 -> 2 actor ratio.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while self.running:
            found = session_processes(self.session_id)
            self.peak = max(self.peak, sum(pss for pss, _ in found.values()))
            for name, (pss, cpu_s) in found.items():
                self.per_process[name] = max(pss, self.per_process.get(name, 0))
                self.cpu_s[name] = cpu_s
            time.sleep(self.interval_s)

    def largest(self, count: int = 6) -> dict[str, int]:
        top = sorted(self.per_process.items(), key=lambda kv: -kv[1])[:count]
        return {name: round(size / 2**20) for name, size in top}

    def busiest(self, count: int = 8) -> dict[str, float]:
        top = sorted(self.cpu_s.items(), key=lambda kv: -kv[1])[:count]
        return {name: round(seconds, 1) for name, seconds in top}


def shard_span(out: Path) -> tuple[float, float]:
    """(first shard start, last shard end) as wall-clock times, from the shards' done markers (a shard
    starts its stage seconds before it finishes)."""
    markers = [json.loads(p.read_text()) for p in (out / DONE_DIR).glob("*.json")]
    starts = [m["finished_at"] - sum(m["seconds"].values()) for m in markers]
    return min(starts), max(m["finished_at"] for m in markers)


def run_case(config: str, images: int, actors: int, scratch: Path, extra: list[str], round_: int = 0) -> dict:
    out = scratch / f"out-{images}-{actors}-{round_}"
    cmd = [sys.executable, str(REPO / "jobs" / "prepare_dataset.py"), "--config", config, "--no-progress",
           f"output.uri={out}", f"index.limit={images}", f"compute.num_actors={actors}",
           "tracking.enabled=false", *extra]
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sampler = ProcessSampler(proc.pid)
    sampler.start()
    output, _ = proc.communicate()
    sampler.running = False
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"case {images}:{actors} failed:\n{output[-3000:]}")
    rate = float(re.search(r"([\d.]+) images/s", output).group(1))
    card = json.loads((out / CARD_JSON).read_text())
    first_start, last_end = shard_span(out)
    return {
        "images": images,
        "actors": actors,
        "round": round_,
        "images_per_s": rate,
        "process_wall_s": round(wall, 1),
        "startup_s": round(first_start - started, 1),
        "steady_images_per_s": round(images / (last_end - first_start), 2),
        "peak_pss_mib": round(sampler.peak / 2**20),
        "peak_pss_mib_by_process": sampler.largest(),
        "cpu_s_by_process": sampler.busiest(),
        "cpu_s_total": round(sum(sampler.cpu_s.values()), 1),
        "stage_seconds": card["counts"]["stage_seconds"],
        "status": card["counts"]["status"].get("unmasked", {}),
    }


def detector_rounds(config: str, count: int, rounds: int) -> None:
    """Process CPU ms/image of both MTCNN paths, alternating, and their largest disagreement."""
    import numpy as np

    from mfr_ray.config import load_config
    from mfr_ray.faces.aligner import FaceAligner
    from mfr_ray.faces.mtcnn import mtcnn_detect
    from mfr_ray.imageio import read_image_file
    from mfr_ray.masking.quality import lfw_files
    from mfr_ray.threads import use_threads

    use_threads(1)
    align = load_config(config, ["output.uri=unused"]).align
    aligner = FaceAligner(align.model_copy(update={"runtime": "torch"}))  # facenet's detect needs torch stages
    batches = [np.stack([read_image_file(f).image for f in chunk]) for chunk in
               (lfw_files(count, 5)[i : i + align.batch_size] for i in range(0, count, align.batch_size))]
    paths = {"facenet MTCNN.detect": lambda b: aligner._mtcnn.detect(b, landmarks=True),
             "mtcnn_detect": lambda b: mtcnn_detect(aligner._mtcnn, b)}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    found: dict[str, list] = {}
    for _ in range(rounds):
        for name, detect in paths.items():
            start = time.process_time()
            found[name] = [detect(b) for b in batches]
            seconds[name].append(time.process_time() - start)
    worst = 0.0
    for ours, stock in zip(found["mtcnn_detect"], found["facenet MTCNN.detect"], strict=True):
        for box, _, points, box_s, _, points_s in zip(*ours, *stock, strict=True):
            if (box is None) != (box_s is None) or (box is not None and box.shape != box_s.shape):
                worst = float("inf")
            elif box is not None:  # the same faces, listed in either order (the aligner picks by position)
                mine, theirs = np.lexsort(box.T[::-1]), np.lexsort(box_s.T[::-1])
                worst = max(worst, float(np.abs(points[mine] - points_s[theirs]).max()),
                            float(np.abs(box[mine] - box_s[theirs]).max()))
    for name, values in seconds.items():
        print(f"{name:<22} {1000 * statistics.median(values) / count:6.2f} ms/image (median of {rounds} rounds)")
    ratios = [a / b for a, b in zip(seconds["facenet MTCNN.detect"], seconds["mtcnn_detect"], strict=True)]
    print(f"speed-up {statistics.median(ratios):.2f}x (per round {', '.join(f'{r:.2f}' for r in ratios)}); "
          f"largest box/landmark difference {worst:.4f} px (min_face_size {align.min_face_size}, {count} images)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/prepare_lfw_eval.yaml")
    parser.add_argument("--cases", nargs="+", default=["1300:1", "1300:2", "13233:2"], help="IMAGES:ACTORS")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all cases; figures are medians")
    parser.add_argument("--scratch", default=None, help="output folder (default: a temp folder)")
    parser.add_argument("--detector", type=int, default=0, help="time only MTCNN on this many images (see above)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, key=value")
    args = parser.parse_args()
    if args.detector:
        detector_rounds(args.config, args.detector, args.repeat)
        return
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench-prepare-"))
    runs: dict[tuple[int, int], list[dict]] = {}
    for round_ in range(args.repeat):
        for case in args.cases:
            images, actors = (int(x) for x in case.split(":"))
            result = run_case(args.config, images, actors, scratch, args.overrides, round_)
            runs.setdefault((images, actors), []).append(result)
            print(json.dumps(result), flush=True)
    report(runs)


def report(runs: dict[tuple[int, int], list[dict]]) -> None:
    """Median per case over the rounds, then the 1 -> 2 actor speed-up and the memory growth."""
    median = {case: {key: statistics.median(r[key] for r in results)
                     for key in ("images_per_s", "steady_images_per_s", "startup_s", "peak_pss_mib")}
              for case, results in runs.items()}
    print(f"\n{'images':>7} {'actors':>6} {'runs':>4} {'img/s':>7} {'steady':>7} {'start s':>7} {'peak MiB':>9}"
          "  actor seconds per stage (last run)")
    for (images, actors), results in runs.items():
        m = median[images, actors]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in results[-1]["stage_seconds"].items())
        print(f"{images:>7} {actors:>6} {len(results):>4} {m['images_per_s']:>7.2f} {m['steady_images_per_s']:>7.2f} "
              f"{m['startup_s']:>7.1f} {m['peak_pss_mib']:>9.0f}  {stages}")
    for images in sorted({images for images, _ in runs}):
        if (images, 1) in runs and (images, 2) in runs:
            one, two = median[images, 1], median[images, 2]
            rounds = [b["images_per_s"] / a["images_per_s"] for a, b in zip(runs[images, 1], runs[images, 2])]
            print(f"speed-up 1 -> 2 actors on {images} images: {two['images_per_s'] / one['images_per_s']:.2f}x "
                  f"end to end (per round: {', '.join(f'{r:.2f}' for r in rounds)}), "
                  f"{two['steady_images_per_s'] / one['steady_images_per_s']:.2f}x while shards run")
    sizes = sorted({images for images, _ in runs})
    if len(sizes) >= 2:
        small = max(median[case]["peak_pss_mib"] for case in runs if case[0] == sizes[0])
        large = max(median[case]["peak_pss_mib"] for case in runs if case[0] == sizes[-1])
        print(f"peak memory {sizes[0]} vs {sizes[-1]} images: {small:.0f} vs {large:.0f} MiB ({large / small - 1:+.0%})")


if __name__ == "__main__":
    main()
