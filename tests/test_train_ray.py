"""Ray Train end to end on a few real CelebA-299 identities prepared by `run_prepare`: 2 DDP workers with
each loss (cosine + dynamic balancing, MSE, margin cosine, triplet, unmasked-only), a worker killed
mid-run (resumes from the last checkpoint), resume by run name with checkpoints on a real S3 server,
on-the-fly masking, MLflow logging and model registration."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mfr_ray.config import load_config
from mfr_ray.config.common import TrackingConfig
from mfr_ray.models import create_backbone
from mfr_ray.models.spec import ModelSpec
from mfr_ray.paths import PROJECT_ROOT
from mfr_ray.train import TrainConfig, run_training
from mfr_ray.train.loop import MODEL_FILE, STATE_FILE

pytestmark = pytest.mark.slow

STEPS = 2


@pytest.fixture(scope="module")
def tiny_prepared(tiny_celeba_prepared) -> str:
    return tiny_celeba_prepared


def train_config(data_uri: str, storage: Path | str, **sections) -> TrainConfig:
    """The shipped fine-tuning config shrunk to a few steps on 2 workers with half a CPU each."""
    overrides = [
        f"data.uri={data_uri}",
        "data.val_identities=2",
        "data.val_max_images=24",
        "data.shuffle_buffer=16",
        "schedule.epochs=1",
        "schedule.batch_size=8",
        f"schedule.steps_per_epoch={STEPS}",
        "schedule.log_every_steps=1",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5",
        "scaling.torch_threads=1",
        f"checkpoint.storage_path={storage}",
        "tracking.enabled=false",
        "registered_model_name=null",
    ]
    overrides += [f"{k}={v}" for k, v in sections.items()]
    return load_config(
        PROJECT_ROOT / "configs" / "train_mobilefacenet_distill.yaml", overrides, expected=TrainConfig
    )


def assert_checkpoint_loads(result) -> None:
    """Checkpoints hold state dicts only: both files load with weights_only=True into the backbone."""
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)
        weights = torch.load(os.path.join(folder, MODEL_FILE), weights_only=True)
    backbone = create_backbone("mobilefacenet")
    backbone.load_state_dict(weights)
    assert {"model", "optimizer", "scaler", "epoch", "step"} <= set(state)


def assert_weights_moved(cfg: TrainConfig, result) -> None:
    """The optimiser stepped: backbone weights differ from the checkpoint the run started from (a run
    whose optimiser never stepped has the same loss ranges)."""
    start = cfg.model.load(cfg.storage).state_dict()
    with result.checkpoint.as_directory() as folder:
        final = torch.load(os.path.join(folder, MODEL_FILE), weights_only=True)
    assert set(final) == set(start)
    moved = [k for k, v in final.items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert any(k.endswith("weight") for k in moved), "no weight moved"
    if cfg.model.batchnorm == "frozen":  # the statistics stay the checkpoint's
        assert not [k for k in moved if k.endswith(("running_mean", "running_var"))]


def assert_validated_on_held_out_identities(cfg: TrainConfig, result, logged_held_out: str) -> None:
    """The reported validation metrics are the held-out identities': those identities are out of every
    training row, and TPR/accuracy are what the final weights give on their masked/unmasked pairs."""
    import ast

    import numpy as np

    from mfr_ray.train.data import label_count, training_dataset, validation_identities, validation_set
    from mfr_ray.train.loop import VAL_ACCURACY, VAL_TPR_AT_FAR, validate

    held_out = validation_identities(label_count(cfg.data, cfg.storage), cfg.data.val_identities, cfg.data.seed)
    assert len(held_out) == cfg.data.val_identities and ast.literal_eval(logged_held_out) == held_out
    train_ds, _ = training_dataset(cfg.data, cfg.storage, held_out, use_masked=cfg.loss.use_masked)
    trained = {int(row["identity_id"]) for row in train_ds.select_columns(["identity_id"]).iter_rows()}
    assert trained and not trained & set(held_out)
    validation = validation_set(cfg.data, cfg.storage, held_out, (112, 96))
    assert set(np.unique(validation.identity).tolist()) == set(held_out)
    backbone = create_backbone(cfg.model.backbone)
    with result.checkpoint.as_directory() as folder:
        backbone.load_state_dict(torch.load(os.path.join(folder, MODEL_FILE), weights_only=True))
    again = validate(backbone, validation, cfg.val_far, cfg.data.val_folds, torch.device("cpu"))
    assert again[VAL_TPR_AT_FAR] == pytest.approx(result.metrics[VAL_TPR_AT_FAR], abs=1e-6)
    assert again[VAL_ACCURACY] == pytest.approx(result.metrics[VAL_ACCURACY], abs=1e-6)


def test_two_workers_fine_tune_tracked_and_registered(tiny_prepared, tmp_path, tmp_tracking_uri):
    """The shipped config (ArcFace + cosine distillation with dynamic balancing, fine-tuning the CASIA
    checkpoint): rank 0 logs params, per-step loss terms, throughput and validation; the final model is
    registered in the MLflow registry."""
    cfg = train_config(
        tiny_prepared,
        tmp_path / "ckpt",
        **{"tracking.enabled": "true", "registered_model_name": "mfr-train-test"},
    )
    outcome = run_training(cfg, run_name="tracked")
    metrics = outcome.result.metrics
    assert outcome.result.error is None
    assert metrics["global_step"] == STEPS and metrics["epoch"] == 0 and metrics["resumed_from_step"] == -1
    assert 0.0 <= metrics["distill_share_counted"] <= 1.0
    assert 0.0 <= metrics["val_tpr_at_far"] <= 1.0 and 0.5 <= metrics["val_accuracy"] <= 1.0
    client = MlflowClient(tmp_tracking_uri)
    run = client.get_run(outcome.mlflow_run_id)
    assert (
        run.data.params["loss.distillation"] == "cosine"
        and run.data.params["loss.dynamic_balancing"] == "True"
    )
    assert run.data.params["derived.steps_per_epoch"] == str(STEPS)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_total")] == list(
        range(1, STEPS + 1)
    )
    for name in (
        "loss_cls_unmasked",
        "loss_cls_masked",
        "loss_distill",
        "distill_share_counted",
        "images_per_s",
        "val_tpr_at_far",
        "val_accuracy",
    ):
        assert math.isfinite(run.data.metrics[name])
    version = client.get_model_version("mfr-train-test", outcome.model_version)
    assert version.run_id == run.info.run_id
    assert "train_config.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == [
        "model/mfr_model.json",
        "model/weights.pt",
    ]
    registered = ModelSpec(checkpoint=f"models:/mfr-train-test/{outcome.model_version}",
                           tracking_uri=tmp_tracking_uri).load()
    assert registered(torch.zeros(1, 3, 112, 96)).shape == (1, 128)
    assert_checkpoint_loads(outcome.result)
    assert_weights_moved(cfg, outcome.result)
    assert_validated_on_held_out_identities(cfg, outcome.result, run.data.params["derived.held_out_identities"])


@pytest.mark.parametrize(
    "loss",
    [
        {
            "loss.distillation": "margin_cosine",
            "loss.distill_margin": 0.1,
            "loss.distill_layer": "linear7",
            "model.head": "cosface",
            "model.head_kwargs": "{s: 32, m: 0.35}",
        },
        {
            "loss": "{kind: triplet}",  # a whole section: the base config's margin_distill terms would be refused
            "model.checkpoint": "null",
            "model.batchnorm": "train",  # from scratch there are no statistics to keep
            "optim.optimizer": "adamw",
            "optim.lr": 0.001,
            "optim.schedule": "cosine",
            "data.on_the_fly_masking": "true",
            "data.masking_cpus": 0.5,
        },
    ],
    ids=["margin_cosine-linear7-cosface", "triplet-scratch-masked-on-the-fly"],
)
def test_two_workers_other_losses(tiny_prepared, tmp_path, loss):
    """The margin-cosine distillation on an inner layer with a CosFace head; the triplet baseline from
    scratch on masks drawn inside the Ray Data ingest by mask-engine actors (fresh every epoch)."""
    cfg = train_config(tiny_prepared, tmp_path / "ckpt", **loss)
    outcome = run_training(cfg, run_name="loss-test")
    metrics = outcome.result.metrics
    assert outcome.result.error is None and metrics["global_step"] == STEPS and metrics["skipped_pairs"] == 0
    expected = (
        {"loss_triplet"}
        if cfg.loss.kind == "triplet"
        else {"loss_cls_unmasked", "loss_cls_masked", "loss_distill"}
    )
    assert expected <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in expected | {"loss_total"})
    assert 0.0 <= metrics["val_tpr_at_far"] <= 1.0
    assert_checkpoint_loads(outcome.result)
    if cfg.model.checkpoint:  # from scratch there is no starting point to compare with
        assert_weights_moved(cfg, outcome.result)


def test_ingest_cpu_shortfall_counts_the_configured_ingest_and_masking_cpus():
    """The CPUs left beside the workers must hold one ingest task (`data.ingest_cpus`) and, with on-the-fly
    masking, the masking actors: a share too small for them is a warning, a large enough one is not."""
    from mfr_ray.train.trainer import ingest_cpu_shortfall

    def shortfall(cluster_cpus: float, **overrides) -> str | None:
        return ingest_cpu_shortfall(train_config("unused", "unused", **overrides), cluster_cpus)

    assert shortfall(2.0, **{"scaling.cpus_per_worker": 0.85}) is None  # 0.30 left, 0.25 asked
    message = shortfall(2.0, **{"scaling.cpus_per_worker": 0.85, "data.ingest_cpus": 0.5})
    assert message and "leave 0.30 of the cluster's 2 CPUs" in message and "need 0.5 CPU each" in message
    masking = {"data.on_the_fly_masking": "true", "data.masking_cpus": 0.5}  # 2 workers x 0.5 leave 1.0
    assert shortfall(2.0, **masking, **{"data.masking_actors": 1}) is None
    message = shortfall(2.0, **masking, **{"data.masking_actors": 2})
    assert message and "beside 2 masking actor(s) x 0.5 CPU" in message


def test_killed_worker_resumes_from_last_checkpoint(tiny_prepared, tmp_path):
    """SIGKILL a training worker once the epoch-0 checkpoint is registered and a later epoch runs: Ray Train
    restarts the group from the newest checkpoint (not from step 0) and the run finishes all epochs.
    (max_failures leaves room for Ray's own spurious restarts on an overloaded machine.)"""
    pids, storage = tmp_path / "pids", tmp_path / "ckpt"
    epochs = 4
    cfg = train_config(
        tiny_prepared,
        storage,
        **{
            "schedule.epochs": epochs,
            "checkpoint.max_failures": 3,
            "worker_pid_dir": str(pids),
            "loss.distillation": "mse",
            "loss.dynamic_balancing": "false",
        },
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(value=run_training(cfg, run_name="killed")))
    thread.start()
    snapshot = storage / "killed" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    target = None
    while target is None and thread.is_alive() and time.monotonic() < deadline:
        started = sorted(pids.glob("epoch*-rank1.pid")) if pids.exists() else []
        if snapshot.exists() and started and started[-1].name != "epoch0-rank1.pid":
            target = started[-1]
        time.sleep(0.05)
    assert target is not None, "the run never got past a registered checkpoint into a later epoch"
    first_epoch0 = (pids / "epoch0-rank0.pid").read_text()
    killed = int(target.read_text())
    os.kill(killed, signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive()
    result = outcome["value"].result
    assert result.error is None
    assert result.metrics["epoch"] == epochs - 1 and result.metrics["global_step"] == epochs * STEPS
    assert result.metrics["resumed_from_step"] > 0  # restored from a checkpoint, not from scratch
    assert (pids / "epoch0-rank0.pid").read_text() == first_epoch0  # epoch 0 was not trained again
    assert int((pids / f"epoch{epochs - 1}-rank1.pid").read_text()) != killed
    assert_checkpoint_loads(result)


def test_rerun_by_name_resumes_from_s3_checkpoint(tiny_prepared, s3_server, tmp_tracking_uri):
    """The unmasked-only baseline with checkpoints on S3; a second run with the same name and more epochs
    continues from the first run's last checkpoint, into the same MLflow run."""
    storage = f"s3://{s3_server.bucket}/train-resume"
    base = {"storage": s3_server.storage, "tracking": TrackingConfig(enabled=True)}
    nomask = {"loss.use_masked": "false", "loss.distillation": "none"}
    first_cfg = train_config(tiny_prepared, storage, **nomask).model_copy(update=base)
    first = run_training(first_cfg, run_name="by-name")
    assert first.result.metrics["global_step"] == STEPS and first.result.checkpoint.path.startswith(
        s3_server.bucket
    )
    assert "loss_cls_masked" not in first.result.metrics
    second_cfg = train_config(tiny_prepared, storage, **nomask, **{"schedule.epochs": 2}).model_copy(
        update=base
    )
    second = run_training(second_cfg, run_name="by-name")
    assert second.result.metrics["resumed_from_step"] == STEPS
    assert second.result.metrics["epoch"] == 1 and second.result.metrics["global_step"] == 2 * STEPS
    assert second.mlflow_run_id == first.mlflow_run_id
    assert_checkpoint_loads(second.result)


def test_an_s3_checkpoint_with_credentials_only_in_the_config(tiny_prepared, s3_server, tmp_path, shared,
                                                              monkeypatch):
    """`model.checkpoint: s3://...` with the keys only in the config's `storage:` section: the workers get
    the secrets themselves (a JSON dump of the config would hand them `**********`), and they are not in
    the environment for the workers to fall back on."""
    from mfr_ray.storage import write_bytes

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
        assert name not in os.environ
    uri = f"s3://{s3_server.bucket}/weights/casia.ckpt"
    write_bytes(uri, (shared / "weights" / "mobilefacenet_casia.ckpt").read_bytes(), s3_server.storage)
    cfg = train_config(tiny_prepared, tmp_path / "ckpt", **{"model.checkpoint": uri})
    cfg = cfg.model_copy(update={"storage": s3_server.storage})
    assert s3_server.secret_key not in repr(cfg)
    outcome = run_training(cfg, run_name="s3-checkpoint")
    assert outcome.result.error is None and outcome.result.metrics["global_step"] == STEPS


# What a short training run printed before issue 25 (point 5) and a user need not see: DDP's deprecated
# argument, Ray Data's deprecation reached through Ray Train's default ingest options, Ray's token-auth
# notice, the raylet's worker-count warning, and Ray Train's placement-group cleaner failing to find its
# cluster when another Ray runs on the machine (this session's `ray_local` is that other Ray).
CONSOLE_NOISE = ("broadcast_buffers", "exclude_resources", "Token authentication is enabled",
                 "worker processes have been started", "PlacementGroupCleaner", "Traceback")


def test_console_shows_one_bar_per_epoch_and_no_ingest_noise(tiny_prepared, tmp_path):
    """`jobs/train.py` as a user runs it (its own local Ray beside the session's, worker logs forwarded to
    the console): one progress bar per epoch with steps, loss, images/s and the validation TPR, and the
    summary; none of Ray Data's `split(2, equal=True)` bars or per-execution banners, no DDP grad-stride
    warning, none of CONSOLE_NOISE."""
    overrides = [
        f"data.uri={tiny_prepared}", "data.val_identities=2", "data.val_max_images=24",
        "data.shuffle_buffer=16", "schedule.epochs=2", "schedule.batch_size=8",
        f"schedule.steps_per_epoch={STEPS}", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
        "scaling.torch_threads=1", f"checkpoint.storage_path={tmp_path / 'ckpt'}", "tracking.enabled=false",
        "registered_model_name=null", "ray.num_cpus=2",  # the dashboard as users get it: Ray Train's
    ]  # placement-group cleaner asks its state API (without it, the cleaner says it cannot, every check)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "jobs" / "train.py"), "--config",
         str(PROJECT_ROOT / "configs" / "train_mobilefacenet_distill.yaml"), *overrides],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    for epoch in (1, 2):
        steps = rf"{STEPS}(\.00)?/{STEPS}(\.00)?"  # the driver draws it with unit_scale
        bar = rf"epoch {epoch}/2 loss \d+\.\d+ \d+\.\d img/s val TPR \d\.\d{{3}}: 100%.*\| {steps} "
        assert re.search(bar, console), console[-4000:]
    assert "split(" not in console and "Starting execution of Dataset" not in console, console[-4000:]
    assert "Grad strides do not match" not in console, console[-4000:]
    assert "Reporting training result" not in console, console[-4000:]
    assert "trained mobilefacenet-distill: {" in console, console[-4000:]
    for noise in CONSOLE_NOISE:
        assert noise not in console, f"{noise!r} in the console:\n{console[-4000:]}"
