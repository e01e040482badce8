"""Embedding throughput of a backbone on this CPU, and the verification protocol's speed on 6,000 pairs.

    python benchmarks/bench_embed.py [--backbone mobilefacenet] [--images 512] [--threads 1 2]
Prints images/s (image + mirror counted as one image when --flip) and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from mfr_ray.evaluation.verification import kfold_verification
    from mfr_ray.models import load_backbone, preprocess
    from mfr_ray.paths import shared_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="mobilefacenet")
    parser.add_argument("--checkpoint", default=str(shared_dir() / "weights" / "mobilefacenet_casia.ckpt"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--flip", action="store_true")
    args = parser.parse_args()

    model = load_backbone(args.backbone, args.checkpoint or None).eval()
    h, w = model.input_size
    crops = np.random.default_rng(0).integers(0, 256, (args.images, h, w, 3), dtype=np.uint8)
    for threads in args.threads:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            model(preprocess(crops[:8]))  # warm-up
            start = time.perf_counter()
            for s in range(0, args.images, args.batch):
                x = preprocess(crops[s : s + args.batch])
                model(x)
                if args.flip:
                    model(torch.flip(x, dims=[3]))
            elapsed = time.perf_counter() - start
        print(f"{args.backbone} {h}x{w} threads={threads} batch={args.batch} flip={args.flip}: "
              f"{args.images / elapsed:.1f} images/s")

    rng = np.random.default_rng(0)
    same = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], 10)
    scores = np.where(same, rng.normal(0.6, 0.1, same.size), rng.normal(0.1, 0.1, same.size))
    start = time.perf_counter()
    kfold_verification(scores, same, np.repeat(np.arange(10), 600), far_targets=[1e-3, 1e-2])
    print(f"10-fold protocol on 6,000 pairs (2 FAR targets): {(time.perf_counter() - start) * 1000:.1f} ms")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
