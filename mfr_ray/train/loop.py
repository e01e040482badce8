"""The Ray Train worker function: DDP model, Ray Data shard of (unmasked, masked) pairs, AMP on GPU,
gradient clipping, LR schedule; per epoch validation (rank 0), a state-dict checkpoint and one
`ray.train.report`. Restarted workers (after a failure or a rerun of the same run name) resume from the
newest checkpoint.

`train_loop_per_worker` reads as its steps: `start_worker` (config, seeds, model, resume, optimiser,
schedule), then per epoch `train_epoch` (`train_step` per batch), `validate` and `report_epoch`; the state
they share is one typed `Worker`."""

from __future__ import annotations

import logging
import math
import os
import resource
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfr_ray.evaluation.metric_names import VAL_ACCURACY, VAL_TPR_AT_FAR, metric_key
from mfr_ray.models.backbone_config import BackboneConfig
from mfr_ray.models.preprocessing import preprocess
from mfr_ray.models.weights import MODEL_FILE
from mfr_ray.threads import threads_for, use_threads
from mfr_ray.train.augment import apply_occluders
from mfr_ray.train.config import OptimConfig, ScheduleConfig, TrainConfig
from mfr_ray.train.data import ValidationSet, decode_pairs
from mfr_ray.train.model import FaceTrainModel, build_model, compute_loss

STATE_FILE = "state.pt"


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
    run (the schedule of the paper this project reproduces) or cosine to zero."""
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
        backbone(preprocess(np.array(crops[i : i + batch]), backbone.backbone_config.normalisation).to(device))
        .float().cpu().numpy()
        for i in range(0, len(crops), batch)
    ]
    return np.concatenate(out)


def validate(
    backbone: torch.nn.Module, val: ValidationSet, far: float, folds: int, device: torch.device
) -> dict[str, float]:
    """TPR at `far` and accuracy of masked-vs-unmasked pairs of held-out identities (k-fold protocol)."""
    from mfr_ray.evaluation.verification import cosine_scores, deterministic_folds, kfold_verification

    was_training = backbone.training
    backbone.eval()
    unmasked, masked = embed(backbone, val.unmasked, device), embed(backbone, val.masked, device)
    backbone.train(was_training)
    left, right, same = val.pair_indices()
    scores = cosine_scores(masked[left], unmasked[right])
    summary = kfold_verification(scores, same, deterministic_folds(same, folds), far_targets=(far,)).summary()
    return {
        VAL_TPR_AT_FAR: summary[metric_key("tpr", far)],
        VAL_ACCURACY: summary[metric_key("accuracy")],
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


def as_floats(terms: dict[str, Any]) -> dict[str, float]:
    """Logged terms as numbers. Read only when they are logged or shown: a term still on the device (a 0-d
    tensor) costs a host sync to read."""
    return {k: float(v) for k, v in terms.items()}


class StepLogger:
    """Rank 0's MLflow logging into the run the driver opened: loss terms every few steps, throughput."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, every: int):
        self.every = every
        self.client = None
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.client is None:
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

    def step(self, shown: tuple[float, float] | None = None) -> None:
        """One step done; `shown` = (loss, images/s) updates the description (on logging steps only)."""
        if self.bar is not None:
            if shown is not None:
                self.bar.set_description(f"{self.prefix} loss {shown[0]:.3f} {shown[1]:.1f} img/s")
            self.bar.update(1)

    def close(self, loss: float, images_per_s: float, val_tpr: float) -> None:
        if self.bar is not None:
            val = "" if math.isnan(val_tpr) else f" val TPR {val_tpr:.3f}"
            self.bar.set_description(f"{self.prefix} loss {loss:.3f} {images_per_s:.1f} img/s{val}")
            self.bar.close()


# DDP settings, both exact for this model: gradients live in the all-reduce buckets (no copy in and out
# of them every step), and no broadcast of the BatchNorm statistics from rank 0 before every forward
# (training-mode BatchNorm normalises with the batch's own statistics, and rank 0, whose running statistics
# the checkpoint and validation use, never receives any). `forward_sync_buffers` is torch 2.14's name for
# the per-forward sync (`broadcast_buffers` is deprecated); it still syncs once at init, when every rank
# holds the same statistics (from the checkpoint, or BatchNorm's fixed initial values).
DDP_KWARGS = {"gradient_as_bucket_view": True, "forward_sync_buffers": False}
WORKER_INPUTS = "inputs"  # the key of Ray Train's train_loop_config that holds the WorkerInputs


@dataclass
class WorkerInputs:
    """What the driver hands every worker: the run's config and what it derived from the dataset."""

    # The validated config itself, not its JSON: `model_dump(mode="json")` masks every SecretStr, and the
    # workers would then authenticate to S3 with the mask. Pickled by Ray with the secrets; shown masked.
    train: TrainConfig
    num_classes: int
    steps_per_epoch: int
    validation: Any = None  # ObjectRef of the ValidationSet (rank 0 fetches it); None: nothing held out
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None  # rank 0 logs into it; None: no MLflow


@dataclass
class Worker:
    """One worker's run: its config and place in the group, the model, its optimiser state and where
    training stands (what a checkpoint saves and restores)."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    use_amp: bool
    model: FaceTrainModel  # the bare model: checkpoints and validation
    ddp_model: torch.nn.Module  # what the steps run: DDP over `model` when world > 1
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator  # the flips and the occluders
    steps_per_epoch: int
    start_epoch: int = 0
    step: int = 0  # global steps done
    resumed_from: int = -1  # the step restored from a checkpoint; -1: started afresh

    @property
    def backbone_config(self) -> BackboneConfig:
        """Input size and normalisation of the backbone being trained."""
        return self.model.backbone.backbone_config


@dataclass
class EpochStats:
    """What one epoch did, for its report."""

    steps: int = 0
    images: int = 0  # crops through the backbone, all workers
    skipped: int = 0  # pairs left out (a crop that did not decode or had another size)
    seconds: float = 0.0
    data_wait_s: float = 0.0  # time this worker waited for its next batch from the Ray Data shard
    terms: dict[str, Any] = field(default_factory=dict)  # the last step's loss terms, as the objective gave them
    step_images_per_s: float = math.nan  # the last step's

    def images_per_s(self, seconds: float | None = None) -> float:
        return self.images / max(self.seconds if seconds is None else seconds, 1e-9)


def resume_state() -> dict[str, Any] | None:
    """The training state of the newest checkpoint of this run, or None on a fresh start. Each worker
    downloads into its own folder: with `as_directory` the workers of one node share one download of an S3
    checkpoint, and the first to finish may delete it while another still reads it ("file read failed" in
    a CI run)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with tempfile.TemporaryDirectory(prefix="mfr-resume-") as folder:
        checkpoint.to_directory(folder)
        return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)


def start_worker(inputs: WorkerInputs) -> Worker:
    """Config, threads, seeds and device; the model (restored from the newest checkpoint, if any) wrapped
    for DDP; its optimiser, gradient scaler and LR schedule, put where the checkpoint left them."""
    import ray.train
    import ray.train.torch

    cfg = inputs.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    use_threads(cfg.scaling.torch_threads or threads_for(cfg.scaling.cpus_per_worker))
    torch.manual_seed(cfg.data.seed + rank)
    device = ray.train.torch.get_device()
    use_amp = cfg.optim.amp and device.type == "cuda"

    model = build_model(cfg, inputs.num_classes)
    state = resume_state()
    if state is not None:
        model.load_state_dict(state["model"])
    # moves `model` to the device; DDP when world > 1
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=DDP_KWARGS)
    optimizer = build_optimizer(cfg.optim, model)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    total_steps = inputs.steps_per_epoch * cfg.schedule.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg.optim, s, total_steps))
    worker = Worker(
        cfg, rank, world, device, use_amp, model, ddp_model, optimizer, scaler, scheduler,
        np.random.default_rng(cfg.data.seed + rank), inputs.steps_per_epoch,
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])  # moves the optimiser state to the params' device
        scaler.load_state_dict(state["scaler"])
        worker.start_epoch, worker.step, worker.resumed_from = state["epoch"] + 1, state["step"], state["step"]
        for _ in range(worker.step):  # put the schedule where the checkpoint left it
            scheduler.step()
    return worker


def epoch_batches(worker: Worker, shard, epoch: int):
    """This worker's batches of one epoch, shuffled locally with a seed per (epoch, rank)."""
    data = worker.cfg.data
    return shard.iter_batches(
        batch_size=worker.cfg.schedule.batch_size,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=data.shuffle_buffer or None,
        local_shuffle_seed=data.seed + epoch * worker.world + worker.rank if data.shuffle_buffer else None,
    )


def train_step(worker: Worker, batch: dict[str, np.ndarray]) -> tuple[int, int, dict[str, Any]]:
    """Decode one batch of pairs, put random occluders on a share of them, flip, forward, backward (DDP all-reduces the gradients), clip, step
    the optimiser and the schedule. Returns (crops through the backbone on all workers, pairs skipped, the
    loss terms as the objective logged them)."""
    cfg, device = worker.cfg, worker.device
    unmasked, masked, valid = decode_pairs(
        list(batch["image_unmasked"]), list(batch["image_masked"]), worker.backbone_config.input_size
    )
    normalisation = worker.backbone_config.normalisation
    labels = torch.as_tensor(batch["identity_id"][valid].astype(np.int64), device=device)
    masked, _ = apply_occluders(unmasked, masked, cfg.data.occluders, worker.rng)
    if cfg.data.hflip:
        flip = worker.rng.random(len(labels)) < 0.5
        unmasked[flip] = unmasked[flip, :, ::-1]
        if masked is not None:
            masked[flip] = masked[flip, :, ::-1]
    with torch.autocast(device.type, dtype=torch.float16, enabled=worker.use_amp):
        loss = compute_loss(
            cfg.loss,
            worker.ddp_model,
            preprocess(unmasked, normalisation).to(device, non_blocking=True),
            preprocess(masked, normalisation).to(device, non_blocking=True) if masked is not None else None,
            labels,
        )
    worker.optimizer.zero_grad(set_to_none=True)
    worker.scaler.scale(loss.total).backward()
    if cfg.optim.grad_clip_norm:
        worker.scaler.unscale_(worker.optimizer)
        torch.nn.utils.clip_grad_norm_(worker.ddp_model.parameters(), cfg.optim.grad_clip_norm)
    worker.scaler.step(worker.optimizer)
    worker.scaler.update()
    worker.scheduler.step()
    worker.step += 1
    seen = len(labels) * (2 if masked is not None else 1) * worker.world
    return seen, int((~valid).sum()), loss.logged


def train_epoch(worker: Worker, shard, epoch: int, logger: StepLogger, bar: EpochBar) -> EpochStats:
    """`steps_per_epoch` steps over this worker's shard; rank 0 logs the loss terms every
    `log_every_steps` steps (the only steps that read them off the device) and draws the bar."""
    stats = EpochStats()
    started = time.perf_counter()
    batches = iter(epoch_batches(worker, shard, epoch))
    while stats.steps < worker.steps_per_epoch:
        waited = time.perf_counter()
        batch = next(batches, None)
        if batch is None:  # on-the-fly masking dropped crops: the shard ran out early
            break
        step_start = time.perf_counter()
        stats.data_wait_s += step_start - waited
        seen, skipped, stats.terms = train_step(worker, batch)
        now = time.perf_counter()
        stats.steps, stats.images, stats.skipped = stats.steps + 1, stats.images + seen, stats.skipped + skipped
        stats.step_images_per_s = seen / max(now - step_start, 1e-9)
        shown = None
        if worker.step % logger.every == 0 and (logger.client is not None or bar.bar is not None):
            terms = step_terms(worker, stats)
            logger.log(worker.step, terms)
            shown = terms.get("loss_total", math.nan), stats.images_per_s(now - started)
        bar.step(shown)
    stats.seconds = time.perf_counter() - started
    return stats


def step_terms(worker: Worker, stats: EpochStats) -> dict[str, float]:
    """What rank 0 logs every few steps: the loss terms of the last step, its LR and throughput."""
    return {
        **as_floats(stats.terms),
        "lr": worker.optimizer.param_groups[0]["lr"],
        "images_per_s": stats.step_images_per_s,
    }


def validation_due(schedule: ScheduleConfig, epoch: int) -> bool:
    return (epoch + 1) % schedule.validate_every_epochs == 0 or epoch + 1 == schedule.epochs


def epoch_metrics(worker: Worker, epoch: int, stats: EpochStats, val_metrics: dict[str, float]) -> dict:
    """The one `ray.train.report` of an epoch (what Tune and checkpoint ranking read)."""
    return {
        **step_terms(worker, stats),
        **val_metrics,
        "epoch": epoch,
        "global_step": worker.step,
        "epoch_steps": stats.steps,  # below steps_per_epoch when on-the-fly masking dropped crops
        "resumed_from_step": worker.resumed_from,
        "epoch_images_per_s": stats.images_per_s(),
        "epoch_data_wait_s": stats.data_wait_s,
        "skipped_pairs": stats.skipped,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def report_epoch(worker: Worker, epoch: int, metrics: dict) -> None:
    """Rank 0's checkpoint of the training state and every worker's report of the epoch."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        if worker.rank == 0:
            save_checkpoint(folder, worker.model, worker.optimizer, worker.scaler, epoch, worker.step)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if worker.rank == 0 else None
        )


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; `config[WORKER_INPUTS]` holds the run's `WorkerInputs`."""
    import ray
    import ray.train

    quiet_worker()
    inputs: WorkerInputs = config[WORKER_INPUTS]
    worker = start_worker(inputs)
    cfg, rank = worker.cfg, worker.rank
    validation: ValidationSet | None = (
        ray.get(inputs.validation) if rank == 0 and inputs.validation is not None else None
    )
    logger = StepLogger(inputs.tracking_uri, inputs.mlflow_run_id if rank == 0 else None,
                        cfg.schedule.log_every_steps)
    shard = ray.train.get_dataset_shard("train")
    val_metrics = {VAL_TPR_AT_FAR: math.nan, VAL_ACCURACY: math.nan}
    for epoch in range(worker.start_epoch, cfg.schedule.epochs):
        write_pid(cfg.worker_pid_dir, epoch, rank)
        bar = EpochBar(epoch, cfg.schedule.epochs, worker.steps_per_epoch, enabled=rank == 0)
        stats = train_epoch(worker, shard, epoch, logger, bar)
        if validation is not None and validation_due(cfg.schedule, epoch):
            val_metrics = validate(worker.model.backbone, validation, cfg.val_far, cfg.data.val_folds,
                                   worker.device)
        metrics = epoch_metrics(worker, epoch, stats, val_metrics)
        bar.close(metrics.get("loss_total", math.nan), stats.images_per_s(), val_metrics[VAL_TPR_AT_FAR])
        per_step = step_terms(worker, stats)  # logged on the logging steps, under their step
        logger.log(worker.step, {k: v for k, v in metrics.items() if k not in per_step and not math.isnan(v)})
        report_epoch(worker, epoch, metrics)
