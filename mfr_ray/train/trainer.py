"""Driver side of a training run: datasets and validation pairs, the `TorchTrainer` with scaling,
checkpoint, failure and storage settings, the MLflow run it logs into, and registration of the final
model. Shared by `mfr train`, `jobs/train.py` and the Tune trials."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from mfr_ray.config import dump_config
from mfr_ray.storage import filesystem_for, is_s3
from mfr_ray.train.config import TrainConfig

RUN_NAME_TAG = "mfr.train_run"
STORAGE_TAG = "mfr.train_storage"


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


def _mlflow_run(
    cfg: TrainConfig, name: str, parent_run_id: str | None, derived: dict[str, Any]
) -> str | None:
    """The MLflow run of this training run: the one an earlier attempt of the same name and storage
    opened (a resumed run continues it), else a new one with the flattened config as params."""
    if not cfg.tracking.enabled:
        return None
    import mlflow

    from mfr_ray.tracking import log_config_params, resolve_tracking_uri, start_run

    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking))
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        earlier = mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}' and tags.`{STORAGE_TAG}` = '{cfg.checkpoint.storage_path}'",
            order_by=["attributes.start_time ASC"],
            output_format="list",
        )
        if earlier:
            return earlier[0].info.run_id
    tags = {"mfr.stage": "train", RUN_NAME_TAG: name, STORAGE_TAG: cfg.checkpoint.storage_path}
    with start_run(cfg.tracking, run_name=name, parent_run_id=parent_run_id, tags=tags) as run:
        log_config_params(cfg)
        mlflow.log_params({f"derived.{k}": str(v) for k, v in derived.items()})
        return run.info.run_id


def _finish_mlflow(cfg: TrainConfig, run_id: str, result) -> str | None:
    """Final tags on the run; the final model logged and, if configured, registered with its config.
    Returns the registered model version."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from mfr_ray.models import load_backbone
    from mfr_ray.tracking import resolve_tracking_uri
    from mfr_ray.train.loop import MODEL_FILE

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
            backbone = load_backbone(
                cfg.model.backbone, os.path.join(folder, MODEL_FILE), **cfg.model.backbone_kwargs
            )
        backbone.eval()
        example = np.zeros((1, 3, *backbone.input_size), dtype=np.float32)
        with torch.no_grad():
            signature = infer_signature(example, backbone(torch.from_numpy(example)).numpy())
        # Pickled module + our package as code (loads anywhere with torch/numpy); explicit requirements
        # skip MLflow's slow dependency inference.
        info = mlflow.pytorch.log_model(
            backbone,
            name="model",
            registered_model_name=cfg.registered_model_name,
            signature=signature,
            serialization_format="pickle",
            code_paths=[os.path.dirname(os.path.dirname(os.path.abspath(__file__)))],
            pip_requirements=[f"torch=={torch.__version__}", f"numpy=={np.__version__}"],
            metadata={"mfr_train_config": dump_config(cfg)},
        )
        mlflow.log_dict(dump_config(cfg), "train_config.json")
        return str(info.registered_model_version) if cfg.registered_model_name else None


def ingest_cpu_shortfall(cfg: TrainConfig, cluster_cpus: float) -> str | None:
    """Ray Data's ingest tasks ask for a whole CPU each: workers that hold all but a fraction of the
    cluster's CPUs leave them unschedulable and training waits forever. The warning to print, if so."""
    free = cluster_cpus - cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if free >= 1.0:
        return None
    return (
        f"{cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker:g} CPU leave {max(free, 0):.2f} of the "
        f"cluster's {cluster_cpus:g} CPUs; Ray Data ingest tasks need 1 CPU each and will wait until the cluster "
        "grows. Lower scaling.cpus_per_worker (a logical share; threads are scaling.torch_threads)."
    )


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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mfr_ray.config.common import init_ray
    from mfr_ray.models import create_backbone
    from mfr_ray.tracking import resolve_tracking_uri
    from mfr_ray.train.data import label_count, training_dataset, validation_identities, validation_set
    from mfr_ray.train.loop import train_loop_per_worker

    name = run_name or cfg.name
    init_ray(cfg.ray)
    shortfall = ingest_cpu_shortfall(cfg, ray.cluster_resources().get("CPU", 0.0))
    if shortfall:
        print(f"warning: {shortfall}", file=sys.stderr, flush=True)
    num_classes = label_count(cfg.data, cfg.storage)
    held_out = validation_identities(num_classes, cfg.data.val_identities, cfg.data.seed)
    input_size = tuple(create_backbone(cfg.model.backbone, **cfg.model.backbone_kwargs).input_size)
    validation = validation_set(cfg.data, cfg.storage, held_out, input_size)
    train_ds, rows = training_dataset(cfg.data, cfg.storage, held_out, use_masked=cfg.loss.use_masked)
    per_step = cfg.schedule.batch_size * cfg.scaling.num_workers
    steps_per_epoch = min(rows // per_step, cfg.schedule.steps_per_epoch or sys.maxsize)
    if steps_per_epoch < 1:
        raise ValueError(f"{rows} training pairs are fewer than one step of {per_step} pairs")

    derived = {
        "num_classes": num_classes,
        "steps_per_epoch": steps_per_epoch,
        "held_out_identities": held_out,
    }
    mlflow_run_id = _mlflow_run(cfg, name, parent_run_id, derived)
    storage_path, storage_fs = _storage(cfg)
    score = cfg.checkpoint.score_attribute if validation is not None else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "num_classes": num_classes,
            "steps_per_epoch": steps_per_epoch,
            "validation": ray.put(validation) if validation is not None else None,
            "tracking_uri": resolve_tracking_uri(cfg.tracking) if mlflow_run_id else None,
            "mlflow_run_id": mlflow_run_id,
        },
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
            callbacks=list(extra_callbacks),
        ),
        datasets={"train": train_ds},
    )
    try:
        result = trainer.fit()
    except Exception:
        if mlflow_run_id:
            from mlflow.tracking import MlflowClient

            MlflowClient(resolve_tracking_uri(cfg.tracking)).set_terminated(mlflow_run_id, "FAILED")
        raise
    version = _finish_mlflow(cfg, mlflow_run_id, result) if mlflow_run_id else None
    return TrainingOutcome(result, mlflow_run_id, version, steps_per_epoch, held_out)


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
