"""MLflow tracking: embedded SQLite default and a real MLflow server, params redacted."""

import mlflow
from mlflow.tracking import MlflowClient

from mfr_ray.config.common import DoctorConfig, StorageConfig, TrackingConfig
from mfr_ray.tracking import log_config_params, resolve_tracking_uri, start_run


def test_default_is_sqlite_in_working_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri() == "http://127.0.0.1:1"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"


def _log_and_read_back(cfg: TrackingConfig):
    config = DoctorConfig(storage=StorageConfig(secret_access_key="top-secret-key-123"), tracking=cfg)
    with start_run(cfg, run_name="roundtrip") as run:
        log_config_params(config)
        mlflow.log_metric("tpr_at_far", 0.5, step=1)
        mlflow.log_dict({"hello": "world"}, "report/hello.json")
        with start_run(cfg, run_name="child", parent_run_id=run.info.run_id, nested=True) as child:
            mlflow.log_metric("acc", 0.9)
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    got = client.get_run(run.info.run_id)
    assert got.data.metrics["tpr_at_far"] == 0.5
    assert got.data.params["storage.secret_access_key"] == "***"
    assert "top-secret-key-123" not in str(got.data.params)
    assert client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == run.info.run_id
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/hello.json"]


def test_embedded_sqlite_round_trip(tmp_tracking_uri):
    _log_and_read_back(TrackingConfig(experiment="embedded"))


def test_server_round_trip(mlflow_server):
    _log_and_read_back(TrackingConfig(tracking_uri=mlflow_server, experiment="served"))


def test_tracking_uri_credentials_never_logged(mlflow_server):
    """A tracking URI with credentials (basic auth in the URI, which MLflow's client sends) still reaches the
    server, and neither the password nor a secret of a plain-dict config lands in the run's params."""
    from pydantic import SecretStr

    password = "pw-9f8e7d6c5b"
    authed = mlflow_server.replace("http://", f"http://alice:{password}@")
    cfg = TrackingConfig(tracking_uri=authed, experiment="authed")
    config = DoctorConfig(storage=StorageConfig(secret_access_key="sk-in-model-0042"), tracking=cfg)
    with start_run(cfg, run_name="authed") as run:
        logged = log_config_params(config)
        log_config_params({"sweep": {"secret": SecretStr("sk-in-dict-0043"), "store": authed}})
    params = MlflowClient(tracking_uri=mlflow_server).get_run(run.info.run_id).data.params
    assert params["tracking.tracking_uri"].startswith("http://***@127.0.0.1:") and logged == {
        k: v for k, v in params.items() if k in logged
    }
    for secret in (password, "sk-in-model-0042", "sk-in-dict-0043"):
        assert secret not in str(params), secret
    from mfr_ray.tracking import shown_tracking_uri

    assert shown_tracking_uri(cfg) == mlflow_server.replace("http://", "http://***@")
