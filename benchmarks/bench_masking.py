"""Single-core masking throughput on real LFW faces: (a) 112x112 aligned crops through the fast path,
(b) 250x250 LFW images through the HOG detector. Prints ms/image, images/s, success rate and peak RSS.

    python benchmarks/bench_masking.py --images 300
    python benchmarks/bench_masking.py --images 100 --paths aligned   # the fast path only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import resource
import time

import cv2

from mfr_ray.imageio import read_image_file
from mfr_ray.masking import MaskEngine, MaskingConfig, available_mask_types
from mfr_ray.masking.landmarks import crop_and_resize
from mfr_ray.masking.quality import lfw_files, lfw_key


def lfw_images(count: int, seed: int) -> list:
    return [(lfw_key(f), read_image_file(f).image) for f in lfw_files(count, seed)]


def timed(engine: MaskEngine, items: list, aligned: bool, passes: int) -> tuple[float, float, float]:
    """Best pass of `passes` (wall and process CPU ms/image, like timeit: the least disturbed pass on a
    shared machine) and the success rate."""
    for key, image in items[:10]:  # warm caches (patterns)
        engine.mask(image, key, aligned=aligned)
    best_wall, best_cpu, ok = float("inf"), float("inf"), 0
    for _ in range(passes):
        ok = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        for key, image in items:
            ok += engine.mask(image, key, aligned=aligned).record.status == "ok"
        best_wall = min(best_wall, (time.perf_counter() - start) / len(items))
        best_cpu = min(best_cpu, (time.process_time() - cpu_start) / len(items))
    return 1000 * best_wall, 1000 * best_cpu, ok / len(items)


def report(name: str, wall_ms: float, cpu_ms: float, ok: float, reference_ms: float) -> None:
    """Wall time, and CPU time of this process (closer to the true cost when other jobs share the cores)."""
    print(
        f"{name:<44} wall {wall_ms:6.2f} ms/image ({1000 / wall_ms:6.1f} images/s)  cpu {cpu_ms:6.2f} ms/image "
        f"({1000 / cpu_ms:6.1f} images/s)  ok {ok:6.1%}  speed-up vs MaskTheFace {reference_ms} ms: "
        f"{reference_ms / wall_ms:4.1f}x wall, {reference_ms / cpu_ms:4.1f}x cpu"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--passes", type=int, default=3, help="timed passes; the best one is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--crop",
        default="61,55,188,182",
        help="LFW box cut out and resized to 112x112 (approximates ArcFace framing)",
    )
    parser.add_argument(
        "--paths", default="aligned,detector", help="comma list of paths to time: aligned, detector"
    )
    args = parser.parse_args()
    paths = set(args.paths.split(","))
    cv2.setNumThreads(1)

    images = lfw_images(args.images, args.seed)
    box = tuple(int(v) for v in args.crop.split(","))
    crops = [(key, crop_and_resize(image, box, (112, 112))) for key, image in images]
    mix = {t: 1.0 for t in available_mask_types()}
    print(f"{len(images)} LFW images, single thread, mask types mixed: {', '.join(mix)}")

    if "aligned" in paths:
        engine = MaskEngine(MaskingConfig(mix=mix, aligned=True))
        report("(a) 112x112 aligned crops, fast path", *timed(engine, crops, True, args.passes), 19.6)
    for upsample in (0, 1) if "detector" in paths else ():
        cfg = MaskingConfig(mix=mix, upsample=upsample, retry_upsample=max(upsample, 1))
        label = f"(b) LFW 250x250, HOG upsample {upsample}" + (" (+1 on miss)" if upsample == 0 else "")
        report(label, *timed(MaskEngine(cfg), images, False, args.passes), 38.0)
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
