"""Shared fixtures: real local Ray, a real S3 server (SeaweedFS), a real MLflow server, real faces."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mfr_ray.paths import shared_dir
from tests.services import MlflowServer, SeaweedS3


@pytest.fixture(scope="session")
def shared() -> Path:
    root = shared_dir()
    if not (root / "datasets" / "lfw").is_dir():
        pytest.fail(f"shared datasets not found at {root}; set MFR_SHARED_DIR")
    return root


@pytest.fixture(scope="session")
def lfw_dir(shared: Path) -> Path:
    return shared / "datasets" / "lfw" / "lfw-deepfunneled"


@pytest.fixture(scope="session")
def celeba_dir(shared: Path) -> Path:
    return shared / "datasets" / "celeba299"


@pytest.fixture(scope="session")
def tiny_celeba_prepared(tmp_path_factory, ray_local, celeba_dir) -> str:
    """The first 100 CelebA-299 images (5 identities), aligned 112x96 with one masked copy each, prepared
    once per session by the real pipeline for the training and tuning tests."""
    from mfr_ray.data import run_prepare
    from mfr_ray.data.config import PrepareConfig

    out = tmp_path_factory.mktemp("train-data") / "celeba-tiny"
    cfg = PrepareConfig.model_validate(
        {
            "name": "train-test",
            "index": {"uri": str(celeba_dir), "limit": 100, "shard_size": 50},
            "align": {"crop": "112x96"},
            "masking": {"mix": {"surgical_blue": 1, "N95": 1, "cloth": 1}},
            "output": {"uri": str(out)},
            "compute": {"num_actors": 1},
            "tracking": {"enabled": False},
        }
    )
    summary = run_prepare(cfg, progress=False)
    assert summary.complete
    return str(out)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs for the whole session, started as the jobs start theirs (`init_ray`: loopback
    only, token auth on); ray.shutdown stops the processes it started."""
    import ray

    from mfr_ray.config.common import RayConfig
    from mfr_ray.raycluster import init_ray

    init_ray(RayConfig(num_cpus=2, include_dashboard=False), log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server.uri
    server.stop()


@pytest.fixture
def tmp_tracking_uri(tmp_path, monkeypatch) -> str:
    """An embedded SQLite MLflow store private to one test, also seen by subprocesses via the env."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    """Keep tests from writing into the checkout's embedded MLflow store by accident."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    if previous is None:
        db = tmp_path_factory.mktemp("mlflow-session") / "mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    yield
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory) -> dict:
    """The shared checkpoint evaluated on 20 LFW pairs and exported calibrated on that run."""
    from tests.serve_inputs import calibrated_evaluation

    return calibrated_evaluation(tmp_path_factory.mktemp("serve-export"))


# Files holding the longest end-to-end tests, scheduled first: `make test` runs two pytest workers, one file
# per worker at a time, so starting these early leaves short files to fill both workers at the end.
LONGEST_FIRST = (
    "test_quickstart.py", "test_tune.py", "test_train_ray.py", "test_evaluate_job.py", "test_cluster_two_node.py",
    "test_prepare_integrity.py", "test_teacher.py", "test_serve.py", "test_prepare_resume.py", "test_prepare_s3.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
