"""Training throughput: Ray Train (N CPU workers, DDP over gloo, Ray Data shards) against a plain
single-process PyTorch loop on the same model, loss, global batch and total cores.

    python benchmarks/bench_train.py --config configs/train_mobilefacenet_distill.yaml \
        data.uri=outputs/datasets/celeba299-112x96 [--steps 20] [--epochs 3] [--batch 32]

Images = crops through the backbone (a pair counts 2). Both sides decode the same encoded crops per step;
the first epoch (worker start, warm-up) is left out of the Ray figure, the first steps of the plain loop
likewise. Prints images/s of each, their ratio and peak memory (resident set size).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from mfr_ray.config import load_config
from mfr_ray.config.common import RayConfig, init_ray
from mfr_ray.train.config import TrainConfig


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain_loop(
    cfg: TrainConfig, num_classes: int, rows: list[dict], steps: int, warmup: int, threads: int
) -> float:
    """images/s of the same step (decode, flip, forward both crops, loss, backward, clip, SGD) in one process."""
    from mfr_ray.models import preprocess
    from mfr_ray.train.data import decode_pairs
    from mfr_ray.train.loop import build_optimizer
    from mfr_ray.train.objective import build_model, compute_loss

    torch.set_num_threads(threads)
    model = build_model(cfg, num_classes)
    optimizer = build_optimizer(cfg.optim, model)
    size = tuple(model.backbone.input_size)
    batch = cfg.schedule.batch_size * cfg.scaling.num_workers
    rng = np.random.default_rng(0)
    images, started = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            images, started = 0, time.perf_counter()
        chosen = [rows[i] for i in rng.integers(0, len(rows), batch)]
        unmasked, masked, valid = decode_pairs(
            [r["image_unmasked"] for r in chosen], [r["image_masked"] for r in chosen], size
        )
        flip = rng.random(len(unmasked)) < 0.5
        unmasked[flip] = unmasked[flip, :, ::-1]
        masked[flip] = masked[flip, :, ::-1]
        labels = torch.as_tensor(np.asarray([r["identity_id"] for r in chosen])[valid].astype(np.int64))
        loss = compute_loss(cfg.loss, model, preprocess(unmasked), preprocess(masked), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm or float("inf"))
        optimizer.step()
        images += 2 * len(labels)
    return images / (time.perf_counter() - started)


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
                    "cpus_per_worker": args.cores / args.workers * 0.9,
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

    plain = plain_loop(cfg, num_classes, rows, args.steps, warmup=3, threads=args.cores)
    plain_rss = peak_rss_mb()
    started = time.perf_counter()
    outcome = run_training(cfg, run_name="bench")
    wall = time.perf_counter() - started
    history = [m for _, m in outcome.result.best_checkpoints or []]
    steady = [m["epoch_images_per_s"] for m in history if m["epoch"] >= 1]
    ray_ips = float(np.mean(steady)) if steady else outcome.result.metrics["epoch_images_per_s"]
    worker_rss = max(m.get("peak_rss_mb", 0.0) for m in history) if history else float("nan")
    ray.shutdown()

    print(
        f"model {cfg.model.backbone} {cfg.loss.kind}/{cfg.loss.distillation}, global batch "
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
