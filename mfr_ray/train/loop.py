"""The Ray Train worker function: DDP model, Ray Data shard of (unmasked, masked) pairs, AMP on GPU,
gradient clipping, LR schedule; per epoch validation (rank 0), a state-dict checkpoint and one
`ray.train.report`. Restarted workers (after a failure or a rerun of the same run name) resume from the
newest checkpoint."""

from __future__ import annotations

import logging
import math
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mfr_ray.models import preprocess
from mfr_ray.threads import threads_for, use_threads
from mfr_ray.train.config import OptimConfig, TrainConfig
from mfr_ray.train.data import ValidationSet, decode_pairs
from mfr_ray.train.objective import build_model, compute_loss

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW; the head may have its own learning rate; no weight decay on BN/PReLU/bias."""
    groups = []
    for prefix, lr in (("backbone.", cfg.lr), ("head.", cfg.head_lr or cfg.lr)):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
        decay = [p for n, p in named if p.ndim > 1]
        no_decay = [p for n, p in named if p.ndim <= 1]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW)(groups, lr=cfg.lr)


def lr_factor(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base LR at `step`: linear warm-up, then constant, step decay at fractions of the
    run (the seed-000 recipe) or cosine to zero."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= m * total_steps for m in cfg.milestones)
    if cfg.schedule == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))
    return 1.0


@torch.no_grad()
def embed(backbone: torch.nn.Module, crops: np.ndarray, device: torch.device, batch: int = 128) -> np.ndarray:
    out = [
        backbone(preprocess(np.array(crops[i : i + batch])).to(device)).float().cpu().numpy()
        for i in range(0, len(crops), batch)
    ]
    return np.concatenate(out)


def validate(
    backbone: torch.nn.Module, val: ValidationSet, far: float, folds: int, device: torch.device
) -> dict[str, float]:
    """TPR at `far` and accuracy of masked-vs-unmasked pairs of held-out identities (k-fold protocol)."""
    from mfr_ray.evaluation.verification import (
        cosine_scores,
        deterministic_folds,
        far_tag,
        kfold_verification,
    )

    was_training = backbone.training
    backbone.eval()
    unmasked, masked = embed(backbone, val.unmasked, device), embed(backbone, val.masked, device)
    backbone.train(was_training)
    left, right, same = val.pair_indices()
    scores = cosine_scores(masked[left], unmasked[right])
    summary = kfold_verification(scores, same, deterministic_folds(same, folds), far_targets=(far,)).summary()
    return {
        "val_tpr_at_far": summary[f"tpr_at_{far_tag(far)}_mean"],
        "val_accuracy": summary["accuracy_mean"],
    }


def save_checkpoint(folder: str, model, optimizer, scaler, epoch: int, step: int) -> None:
    """State dicts only (loadable with weights_only=True): the full training state for resuming, and the
    bare backbone weights for evaluation and registration."""
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "step": step,
        },
        os.path.join(folder, STATE_FILE),
    )
    torch.save(model.backbone.state_dict(), os.path.join(folder, MODEL_FILE))


def write_pid(folder: str | None, epoch: int, rank: int) -> None:
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, f"epoch{epoch}-rank{rank}.pid").write_text(str(os.getpid()))


class StepLogger:
    """Rank 0's MLflow logging into the run the driver opened: loss terms every few steps, throughput."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, every: int):
        self.every = every
        self.client = None
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, step: int, metrics: dict[str, float], force: bool = False) -> None:
        if self.client is None or not (force or step % self.every == 0):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )


# Messages every step or report repeats that say nothing to act on: DDP's note that MobileFaceNet's
# depthwise-conv gradients are not laid out like its buckets (a speed hint, the values are right), and
# Ray Train's per-report and per-checkpoint INFO lines (the epoch bar shows the same).
NOISE_WARNINGS = ("Grad strides do not match bucket view strides",)


def quiet_worker() -> None:
    """Silence the known noise of a training worker, by message or logger, and nothing else."""
    from ray.train.v2._internal.execution import context, storage

    for message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for module in (context, storage):  # their loggers (context's is named by its file path)
        module.logger.setLevel(logging.WARNING)


class EpochBar:
    """Rank 0's progress bar of one epoch, drawn by the driver (Ray's distributed tqdm): steps, loss,
    images/s, then the validation TPR."""

    def __init__(self, epoch: int, epochs: int, steps: int, enabled: bool):
        self.prefix = f"epoch {epoch + 1}/{epochs}"
        self.bar = None
        if enabled:
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(desc=self.prefix, total=steps, unit="step")

    def step(self, loss: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{self.prefix} loss {loss:.3f} {images_per_s:.1f} img/s")
            self.bar.update(1)

    def close(self, loss: float, images_per_s: float, val_tpr: float) -> None:
        if self.bar is not None:
            val = "" if math.isnan(val_tpr) else f" val TPR {val_tpr:.3f}"
            self.bar.set_description(f"{self.prefix} loss {loss:.3f} {images_per_s:.1f} img/s{val}")
            self.bar.close()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config`: {"train": TrainConfig as dict, "num_classes", "steps_per_epoch",
    "validation": ObjectRef of a ValidationSet or None, "tracking_uri", "mlflow_run_id"}."""
    import ray
    import ray.train
    import ray.train.torch

    quiet_worker()
    cfg = TrainConfig.model_validate(config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    use_threads(cfg.scaling.torch_threads or threads_for(cfg.scaling.cpus_per_worker))
    torch.manual_seed(cfg.data.seed + rank)
    rng = np.random.default_rng(cfg.data.seed + rank)
    device = ray.train.torch.get_device()
    use_amp = cfg.optim.amp and device.type == "cuda"

    model = build_model(cfg, config["num_classes"])
    input_size = tuple(model.backbone.input_size)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # Each worker downloads into its own folder: with `as_directory` the workers of one node share one
        # download of an S3 checkpoint, and the first to finish may delete it while another still reads
        # it ("file read failed" in a CI run).
        with tempfile.TemporaryDirectory(prefix="mfr-resume-") as folder:
            checkpoint.to_directory(folder)
            state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
    ddp_model = ray.train.torch.prepare_model(model)  # moves `model` to the device; DDP when world > 1
    optimizer = build_optimizer(cfg.optim, model)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    start_epoch, step, resumed_from = 0, 0, -1
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])  # moves the optimiser state to the params' device
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, resumed_from = state["epoch"] + 1, state["step"], state["step"]
    steps_per_epoch = config["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.schedule.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg.optim, s, total_steps))
    for _ in range(step):  # put the schedule where the checkpoint left it
        scheduler.step()
    validation: ValidationSet | None = (
        ray.get(config["validation"]) if rank == 0 and config["validation"] else None
    )
    logger = StepLogger(
        config["tracking_uri"], config["mlflow_run_id"] if rank == 0 else None, cfg.schedule.log_every_steps
    )
    shard = ray.train.get_dataset_shard("train")
    val_metrics = {"val_tpr_at_far": float("nan"), "val_accuracy": float("nan")}

    for epoch in range(start_epoch, cfg.schedule.epochs):
        write_pid(cfg.worker_pid_dir, epoch, rank)
        epoch_start, images, skipped, epoch_step = time.perf_counter(), 0, 0, 0
        batches = shard.iter_batches(
            batch_size=cfg.schedule.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.data.seed + epoch * world + rank if cfg.data.shuffle_buffer else None,
        )
        terms: dict[str, float] = {}
        bar = EpochBar(epoch, cfg.schedule.epochs, steps_per_epoch, enabled=rank == 0)
        for batch in batches:
            if epoch_step >= steps_per_epoch:
                break
            step_start = time.perf_counter()
            unmasked, masked, valid = decode_pairs(
                list(batch["image_unmasked"]), list(batch["image_masked"]), input_size
            )
            skipped += int((~valid).sum())
            labels = torch.as_tensor(batch["identity_id"][valid].astype(np.int64), device=device)
            if cfg.data.hflip:
                flip = rng.random(len(labels)) < 0.5
                unmasked[flip] = unmasked[flip, :, ::-1]
                if masked is not None:
                    masked[flip] = masked[flip, :, ::-1]
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = compute_loss(
                    cfg.loss,
                    ddp_model,
                    preprocess(unmasked).to(device, non_blocking=True),
                    preprocess(masked).to(device, non_blocking=True) if masked is not None else None,
                    labels,
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss.total).backward()
            if cfg.optim.grad_clip_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.optim.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            epoch_step += 1
            seen = len(labels) * (2 if masked is not None else 1) * world
            images += seen
            terms = {
                **loss.logged,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": seen / max(time.perf_counter() - step_start, 1e-9),
            }
            logger.log(step, terms)
            bar.step(terms.get("loss_total", math.nan), images / max(time.perf_counter() - epoch_start, 1e-9))
        epoch_seconds = time.perf_counter() - epoch_start
        last_epoch = epoch + 1 == cfg.schedule.epochs
        if validation is not None and ((epoch + 1) % cfg.schedule.validate_every_epochs == 0 or last_epoch):
            val_metrics = validate(model.backbone, validation, cfg.val_far, cfg.data.val_folds, device)
        bar.close(terms.get("loss_total", math.nan), images / epoch_seconds, val_metrics["val_tpr_at_far"])
        metrics = {
            **terms,
            **val_metrics,
            "epoch": epoch,
            "global_step": step,
            "epoch_steps": epoch_step,  # below steps_per_epoch when on-the-fly masking dropped crops
            "resumed_from_step": resumed_from,
            "epoch_images_per_s": images / epoch_seconds,
            "skipped_pairs": skipped,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        logger.log(
            step, {k: v for k, v in metrics.items() if k not in terms and not math.isnan(v)}, force=True
        )
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                save_checkpoint(folder, model, optimizer, scaler, epoch, step)
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
            )
