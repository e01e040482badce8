"""MTCNN's three stages on each inference runtime against torch's: speed of the aligner and how far the
five landmarks move, on N LFW images (evenly spread over the people, first image each).

    python benchmarks/bench_mtcnn_runtime.py [--images 500] [--runtimes openvino onnxruntime]
Prints images/s and process CPU ms per image per runtime (one thread), then per runtime: images whose
detector method differs from torch's, and the largest landmark difference (px, at the aligner's 0.01 px).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _align(runtime: str, images: list[np.ndarray]) -> list:
    from mfr_ray.faces.aligner import FaceAligner
    from mfr_ray.faces.config import AlignConfig

    aligner = FaceAligner(AlignConfig(runtime=runtime, num_threads=1))
    aligner.align_batch(images[:8])  # warm-up (and the ONNX export, once)
    wall, cpu = time.perf_counter(), time.process_time()
    results = aligner.align_batch(images)
    print(f"{runtime:<12} {len(images) / (time.perf_counter() - wall):6.1f} images/s  "
          f"{(time.process_time() - cpu) * 1000 / len(images):6.1f} CPU ms/image", flush=True)
    return results


def main() -> None:
    import cv2

    from mfr_ray.paths import shared_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime"])
    args = parser.parse_args()
    paths = sorted((shared_dir() / "datasets" / "lfw" / "lfw-deepfunneled").glob("*/*_0001.jpg"))
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    reference = _align("torch", images)
    found = {runtime: _align(runtime, images) for runtime in args.runtimes}
    for runtime, results in found.items():
        other = sum(a.method != b.method for a, b in zip(reference, results, strict=True))
        both = [i for i, (a, b) in enumerate(zip(reference, results, strict=True)) if a.method == b.method == "mtcnn"]
        worst = max((float(np.abs(np.subtract(results[i].landmarks, reference[i].landmarks)).max()) for i in both),
                    default=float("nan"))
        print(f"{runtime}: {len(images)} images, {other} with another method than torch's; largest landmark "
              f"difference over the {len(both)} MTCNN faces: {worst:.3f} px")


if __name__ == "__main__":
    main()
