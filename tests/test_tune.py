"""Ray Tune search end to end on tiny real data: trials are Ray Train runs, each an MLflow run under the
search's parent run; the best config is a train YAML `mfr train` accepts; an interrupted search resumes."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mfr_ray.config import load_config
from mfr_ray.paths import PROJECT_ROOT
from mfr_ray.train import TrainConfig
from mfr_ray.tune import SearchDimension, TuneConfig

pytestmark = pytest.mark.slow


def search_yaml(tmp_path: Path, data_uri: str, tracking_uri: str, name: str, num_samples: int) -> Path:
    base_overrides = [
        f"data.uri={data_uri}",
        "data.val_identities=2",
        "data.val_max_images=24",
        "data.shuffle_buffer=16",
        "schedule.epochs=2",
        "schedule.batch_size=8",
        "schedule.steps_per_epoch=2",
        "schedule.log_every_steps=1",
        "scaling.num_workers=1",  # data-parallel training is tested in test_train_ray; a trial needs one
        "scaling.cpus_per_worker=1",
        "scaling.torch_threads=1",
        f"checkpoint.storage_path={tmp_path / 'train'}",
        f"tracking.tracking_uri={tracking_uri}",
        "tracking.experiment=tune-test",
        "registered_model_name=null",
    ]
    data = {
        "kind": "tune",
        "name": name,
        "base_config": str(PROJECT_ROOT / "configs" / "train_mobilefacenet_distill.yaml"),
        "base_overrides": base_overrides,
        "search_space": {
            "loss.beta": {"type": "loguniform", "low": 0.1, "high": 10.0},
            "loss.distillation": {"type": "choice", "values": ["mse", "cosine", "margin_cosine"]},
            "model.head_kwargs.m": {"type": "uniform", "low": 0.2, "high": 0.5},
        },
        "searcher": "random",
        "num_samples": num_samples,
        "max_concurrent_trials": 1,
        "scheduler": {"type": "asha", "grace_period": 1},
        "storage_path": str(tmp_path / "tune"),
        "best_config_out": str(tmp_path / "best_train.yaml"),
        "tracking": {"tracking_uri": tracking_uri, "experiment": "tune-test"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def child_runs(tracking_uri: str, parent_id: str):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tune-test")
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def tune_command(path: Path) -> list[str]:
    """The search runs as a user runs it: its own driver process with its own local Ray."""
    return [sys.executable, str(PROJECT_ROOT / "jobs" / "tune.py"), "--config", str(path), "ray.num_cpus=2"]


def run_search(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def test_search_killed_midway_resumes_and_logs_every_trial(tmp_path, tiny_celeba_prepared, tmp_tracking_uri):
    """kill -9 of the search after its first trial result; the rerun continues from Tune's state, every
    trial ends as an MLflow run under the one parent run, and the best config is a train YAML."""
    path = search_yaml(tmp_path, tiny_celeba_prepared, tmp_tracking_uri, "search-a", 2)
    cfg = load_config(path, expected=TuneConfig)
    cmd = tune_command(path)
    state = tmp_path / "tune" / "search-a"
    first = run_search(cmd, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None:
            if any(p.stat().st_size > 0 for p in state.glob("*/result.json")):
                break
            time.sleep(1)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (tmp_path / "best_train.yaml").exists(), "the first run was meant to be cut off"
    parent = json.loads((state / "mlflow_parent_run.json").read_text())["run_id"]

    second = run_search(cmd, tmp_path / "second.log")
    try:
        assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-4000:]
    finally:
        if second.poll() is None:  # timed out: stop the search's own Ray with it
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
    assert f"resuming search search-a from {state}" in (tmp_path / "second.log").read_text()
    assert json.loads((state / "mlflow_parent_run.json").read_text())["run_id"] == parent  # same parent run

    client = MlflowClient(tmp_tracking_uri)
    table = Path(client.download_artifacts(parent, "search/trials.csv", str(tmp_path))).read_text()
    rows = list(csv.DictReader(io.StringIO(table)))
    assert len(rows) == cfg.num_samples
    finished = [r for r in rows if r["val_tpr_at_far"]]
    assert len(finished) == cfg.num_samples, rows
    best = max(finished, key=lambda r: float(r["val_tpr_at_far"]))

    trained = load_config(cfg.best_config_out, expected=TrainConfig)  # what `mfr train` does with it
    assert trained.loss.beta == pytest.approx(float(best["loss.beta"]))
    assert trained.loss.distillation == best["loss.distillation"]
    assert trained.model.head_kwargs["m"] == pytest.approx(float(best["model.head_kwargs.m"]))

    children = child_runs(tmp_tracking_uri, parent)
    finished_children = [r for r in children if "val_tpr_at_far" in r.data.metrics]
    assert len({r.info.run_name for r in finished_children}) == cfg.num_samples
    assert {round(float(r.data.params["loss.beta"]), 6) for r in finished_children} == {
        round(float(row["loss.beta"]), 6) for row in rows
    }
    artifacts = {a.path for a in client.list_artifacts(parent, "search")}
    assert {"search/trials.csv", "search/best_train.yaml", "search/objective.png"} <= artifacts
    assert client.get_run(parent).data.metrics["best_val_tpr_at_far"] == pytest.approx(float(best["val_tpr_at_far"]))


SECRET = "Tune-S3cret-wJalrXUtnFEMI-K7MDENG"


def test_resume_guard_restart_and_no_secret_anywhere(tmp_path, tiny_celeba_prepared, tmp_tracking_uri, ray_local):
    """A one-trial search with a real secret in base_overrides: no MLflow param, artifact, best config or
    file the search wrote holds it. Resumed with a changed search space it is refused with the changed
    keys named (no MLflow crash); resumed unchanged (Ray on other settings) it continues the same parent
    run; with resume=false (`--restart`) it starts a new parent run."""
    from mfr_ray.tune import SearchChangedError
    from mfr_ray.tune import run_search as search

    path = search_yaml(tmp_path, tiny_celeba_prepared, tmp_tracking_uri, "guarded", 1)
    data = yaml.safe_load(path.read_text())
    data["base_overrides"] += [
        "schedule.epochs=1", "schedule.steps_per_epoch=1", f"storage.secret_access_key={SECRET}",
        "storage.access_key_id=AKIATUNEGUARD",
    ]
    data["search_space"] = {"loss.beta": {"type": "loguniform", "low": 0.1, "high": 10.0}}
    data["scheduler"] = {"type": "fifo"}
    cfg = TuneConfig.model_validate({k: v for k, v in data.items() if k != "kind"})
    first = search(cfg)

    client = MlflowClient(tmp_tracking_uri)
    parent = client.get_run(first.parent_run_id)
    assert "storage.secret_access_key=***" in parent.data.params["base_overrides"]
    best = Path(cfg.best_config_out).read_text()
    assert "Secrets left out: storage.access_key_id, storage.secret_access_key" in best
    assert load_config(cfg.best_config_out, expected=TrainConfig).storage.secret_access_key is None
    logged = Path(client.download_artifacts(parent.info.run_id, "search/best_train.yaml", str(tmp_path / "dl")))
    assert logged.read_text() == best
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []  # params, artifacts, Tune state, checkpoints, the MLflow database itself

    changed = cfg.model_copy(
        update={"search_space": {"loss.beta": SearchDimension(type="loguniform", low=0.1, high=30.0)}}
    )
    with pytest.raises(SearchChangedError, match=r"search_space\.loss\.beta\.high: 10\.0 -> 30\.0.*--restart"):
        search(changed)
    assert client.get_run(first.parent_run_id).data.params == parent.data.params

    again = search(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"num_cpus": 1})}))
    assert again.parent_run_id == first.parent_run_id and again.best_params == first.best_params

    restarted = search(changed.model_copy(update={"resume": False}))
    assert restarted.parent_run_id != first.parent_run_id
    assert client.get_run(restarted.parent_run_id).data.params["search_space.loss.beta.high"] == "30.0"
    assert json.loads((tmp_path / "tune" / "guarded" / "mlflow_parent_run.json").read_text())["run_id"] == (
        restarted.parent_run_id
    )
