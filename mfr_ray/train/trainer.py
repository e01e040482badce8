"""Driver side of a training run: datasets and validation pairs, the `TorchTrainer` with scaling,
checkpoint, failure and storage settings, the MLflow run it logs into, and registration of the final
model. Shared by `mfr train`, `jobs/train.py` and the Tune trials."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mfr_ray.config import dump_config
from mfr_ray.storage import exists, filesystem_for, is_s3, join_uri
from mfr_ray.train.config import TrainConfig

RUN_NAME_TAG = "mfr.train_run"
STORAGE_TAG = "mfr.train_storage"
TRAIN_KEY_TAG = "mfr.train_key"  # digest of (run name, storage): searchable without quoting either
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints


@dataclass
class TrainingOutcome:
    result: Any  # ray.train.Result
    mlflow_run_id: str | None
    model_version: str | None
    steps_per_epoch: int
    held_out_identities: list[int]


def _storage(cfg: TrainConfig) -> tuple[str, Any]:
    """RunConfig's (storage_path, storage_filesystem): S3 through our configured filesystem, local as is."""
    if is_s3(cfg.checkpoint.storage_path):
        fs, path = filesystem_for(cfg.checkpoint.storage_path, cfg.storage)
        return path, fs
    return os.path.abspath(filesystem_for(cfg.checkpoint.storage_path)[1]), None


def train_key(name: str, storage_path: str) -> str:
    return hashlib.sha256(json.dumps([name, storage_path]).encode()).hexdigest()


def has_checkpoints(cfg: TrainConfig, name: str) -> bool:
    """Whether Ray Train will resume run `name` from checkpoints in the storage (else it starts afresh)."""
    return exists(join_uri(cfg.checkpoint.storage_path, name, RAY_TRAIN_SNAPSHOT), cfg.storage)


def _mlflow_run(
    cfg: TrainConfig, name: str, parent_run_id: str | None, derived: dict[str, Any]
) -> str | None:
    """The MLflow run of this training run: when Ray Train resumes it from checkpoints still in the storage,
    the newest run an earlier attempt of the same name and storage opened; else a new one with the
    flattened config as params. The search filter holds a hex digest, never the name or path."""
    if not cfg.tracking.enabled:
        return None
    import mlflow

    from mfr_ray.tracking import log_config_params, resolve_tracking_uri, start_run

    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking))
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    key = train_key(name, cfg.checkpoint.storage_path)
    if experiment is not None and has_checkpoints(cfg, name):
        earlier = mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TRAIN_KEY_TAG}` = '{key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
            output_format="list",
        )
        if earlier:
            return earlier[0].info.run_id
    tags = {
        "mfr.stage": "train", RUN_NAME_TAG: name, STORAGE_TAG: cfg.checkpoint.storage_path, TRAIN_KEY_TAG: key
    }
    with start_run(cfg.tracking, run_name=name, parent_run_id=parent_run_id, tags=tags) as run:
        log_config_params(cfg)
        mlflow.log_params({f"derived.{k}": str(v) for k, v in derived.items()})
        return run.info.run_id


def _finish_mlflow(cfg: TrainConfig, run_id: str, result) -> str | None:
    """Final tags on the run; the final model logged as `model/` (state dict + JSON spec, loadable without
    pickle: `ModelSpec(checkpoint="models:/...").load()`) and, if configured, registered as a new
    version of `registered_model_name`. Returns the registered model version."""
    import tempfile

    import mlflow

    from mfr_ray.models.store import register_model_version, save_model_files
    from mfr_ray.models.weights import MODEL_FILE
    from mfr_ray.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking))
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags(
            {
                "mfr.checkpoint": result.checkpoint.path if result.checkpoint else "",
                "mfr.result_path": result.path,
            }
        )
        if result.checkpoint is None:
            return None
        with result.checkpoint.as_directory() as folder:
            backbone = cfg.model.trained(os.path.join(folder, MODEL_FILE)).load()
        with tempfile.TemporaryDirectory(prefix="mfr-model-") as folder:
            save_model_files(backbone, cfg.model.backbone, dict(cfg.model.kwargs), folder)
            mlflow.log_artifacts(folder, artifact_path="model")
        mlflow.log_dict(dump_config(cfg), "train_config.json")
        if not cfg.registered_model_name:
            return None
        return register_model_version(cfg.registered_model_name, "model", run_id,
                                      {"mfr.format": "state_dict+spec", "mfr.backbone": cfg.model.backbone})


@contextmanager
def quiet_ingest() -> Iterator[None]:
    """Datasets built inside get Ray Data's bars and per-execution banners off (each dataset keeps a copy
    of the context, so it also holds in the split coordinator that feeds the workers every epoch): the
    workers' epoch bar is the progress a user reads."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    context.enable_progress_bars, context.print_on_execution_start = False, False
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


def ingest_cpu_shortfall(cfg: TrainConfig, cluster_cpus: float) -> str | None:
    """Ray Data's ingest tasks ask for `data.ingest_cpus` each, beside the on-the-fly masking actors that
    hold `data.masking_cpus` each for the whole run: workers that leave less than that free leave the
    ingest unschedulable and training waits forever. The warning to print, if so."""
    data, scaling = cfg.data, cfg.scaling
    maskers = data.on_the_fly_masking and cfg.loss.use_masked
    held = data.masking_actors * data.masking_cpus if maskers else 0.0
    free = cluster_cpus - scaling.num_workers * scaling.cpus_per_worker
    if free >= held + data.ingest_cpus:
        return None
    beside = f" beside {data.masking_actors} masking actor(s) x {data.masking_cpus:g} CPU" if maskers else ""
    return (
        f"{scaling.num_workers} workers x {scaling.cpus_per_worker:g} CPU leave {max(free, 0):.2f} of the "
        f"cluster's {cluster_cpus:g} CPUs; Ray Data ingest tasks need {data.ingest_cpus:g} CPU each "
        f"(data.ingest_cpus){beside} and will wait until the cluster grows. Lower scaling.cpus_per_worker "
        "(a logical share; threads are scaling.torch_threads)."
    )


@dataclass
class TrainingData:
    """What the driver reads before training: the class count, the held-out identities and their validation
    pairs (None without any), the training dataset and the steps an epoch takes."""

    num_classes: int
    held_out: list[int]
    validation: Any
    train_ds: Any
    steps_per_epoch: int


def training_data(cfg: TrainConfig) -> TrainingData:
    """Read the prepared dataset's labels, hold out the validation identities and size the epoch; raises
    ValueError when the data is less than one step."""
    from mfr_ray.models.backbone_config import backbone_config
    from mfr_ray.train.data import label_count, training_dataset, validation_identities, validation_set

    with quiet_ingest():
        num_classes = label_count(cfg.data, cfg.storage)
        held_out = validation_identities(num_classes, cfg.data.val_identities, cfg.data.seed)
        input_size = backbone_config(cfg.model.backbone, cfg.model.kwargs).input_size
        validation = validation_set(cfg.data, cfg.storage, held_out, input_size)
        train_ds, rows = training_dataset(cfg.data, cfg.storage, held_out, use_masked=cfg.loss.use_masked)
    per_step = cfg.schedule.batch_size * cfg.scaling.num_workers
    steps_per_epoch = min(rows // per_step, cfg.schedule.steps_per_epoch or sys.maxsize)
    if steps_per_epoch < 1:
        raise ValueError(f"{rows} training pairs are fewer than one step of {per_step} pairs")
    return TrainingData(num_classes, held_out, validation, train_ds, steps_per_epoch)


def ingest_config():
    """Ray Train's default ingest options, passed explicitly: its default copies the deprecated
    `exclude_resources` (a RayDeprecationWarning on every run), which this project never sets."""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    current = DataContext.get_current().execution_options
    return DataConfig(execution_options=ExecutionOptions(
        resource_limits=current.resource_limits, preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress))


def run_training(
    cfg: TrainConfig,
    *,
    run_name: str | None = None,
    extra_callbacks: list | tuple = (),
    parent_run_id: str | None = None,
) -> TrainingOutcome:
    """Train (or resume, when `run_name` already has checkpoints in the storage) and return the outcome.
    Raises `ray.train.TrainingFailedError` when the run fails beyond `checkpoint.max_failures`."""
    import ray

    from mfr_ray.raycluster import init_ray
    from mfr_ray.tracking import resolve_tracking_uri

    name = run_name or cfg.name
    init_ray(cfg.ray)
    shortfall = ingest_cpu_shortfall(cfg, ray.cluster_resources().get("CPU", 0.0))
    if shortfall:
        print(f"warning: {shortfall}", file=sys.stderr, flush=True)
    data = training_data(cfg)
    derived = {
        "num_classes": data.num_classes,
        "steps_per_epoch": data.steps_per_epoch,
        "held_out_identities": data.held_out,
    }
    mlflow_run_id = _mlflow_run(cfg, name, parent_run_id, derived)
    trainer = _torch_trainer(cfg, name, data, mlflow_run_id, extra_callbacks)
    try:
        result = trainer.fit()
    except Exception:
        if mlflow_run_id:
            from mlflow.tracking import MlflowClient

            MlflowClient(resolve_tracking_uri(cfg.tracking)).set_terminated(mlflow_run_id, "FAILED")
        raise
    version = _finish_mlflow(cfg, mlflow_run_id, result) if mlflow_run_id else None
    return TrainingOutcome(result, mlflow_run_id, version, data.steps_per_epoch, data.held_out)


def _torch_trainer(cfg: TrainConfig, name: str, data: TrainingData, mlflow_run_id: str | None, callbacks):
    """The TorchTrainer of the run: the worker loop's inputs, scaling, checkpoints kept by the validation
    score (when there is validation), failure retries and the checkpoint storage."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mfr_ray.tracking import resolve_tracking_uri
    from mfr_ray.train.loop import WORKER_INPUTS, WorkerInputs, train_loop_per_worker

    storage_path, storage_fs = _storage(cfg)
    score = cfg.checkpoint.score_attribute if data.validation is not None else None
    inputs = WorkerInputs(
        train=cfg,
        num_classes=data.num_classes,
        steps_per_epoch=data.steps_per_epoch,
        validation=ray.put(data.validation) if data.validation is not None else None,
        tracking_uri=resolve_tracking_uri(cfg.tracking) if mlflow_run_id else None,
        mlflow_run_id=mlflow_run_id,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={WORKER_INPUTS: inputs},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoint.num_to_keep,
                checkpoint_score_attribute=score,
                checkpoint_score_order=cfg.checkpoint.score_order,
            ),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            callbacks=list(callbacks),
        ),
        datasets={"train": data.train_ds},
        dataset_config=ingest_config(),
    )


def train_and_report(cfg: TrainConfig, run_name: str | None = None) -> int:
    """Exit status for the command-line forms: 0 after a finished run (its summary printed), 1 with the reason."""
    from ray.train import TrainingFailedError

    try:
        outcome = run_training(cfg, run_name=run_name)
    except (TrainingFailedError, ValueError, FileNotFoundError) as exc:
        print(f"training failed: {exc}", file=sys.stderr, flush=True)
        return 1
    metrics = outcome.result.metrics or {}
    shown = {
        k: metrics[k]
        for k in ("epoch", "global_step", "loss_total", "val_tpr_at_far", "val_accuracy")
        if k in metrics
    }
    print(f"trained {run_name or cfg.name}: {shown}", flush=True)
    print(f"checkpoint: {outcome.result.checkpoint.path if outcome.result.checkpoint else None}", flush=True)
    if outcome.mlflow_run_id:
        print(
            f"mlflow run: {outcome.mlflow_run_id}"
            + (f", model version {outcome.model_version}" if outcome.model_version else "")
        )
    return 0
