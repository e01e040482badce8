"""MLflow helpers. Embedded default: a SQLite store `mlflow.db` in the working folder, artifacts in
`./mlruns`; `$MLFLOW_TRACKING_URI` or the config's `tracking_uri` point at a shared server instead."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mfr_ray.config import flatten_config
from mfr_ray.config.common import TrackingConfig

__all__ = [
    "TrackingConfig",
    "log_config_params",
    "resolve_tracking_uri",
    "shown_tracking_uri",
    "start_run",
    "ui_command",
]

DEFAULT_DB = "mlflow.db"
MLFLOW_PARAM_LIMIT = 6000  # characters MLflow accepts in one param value


def resolve_tracking_uri(cfg: TrackingConfig | None = None) -> str:
    """Config first, then $MLFLOW_TRACKING_URI, then `sqlite:///<cwd>/mlflow.db`."""
    if cfg is not None and cfg.tracking_uri:
        return cfg.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def shown_tracking_uri(cfg: TrackingConfig | None = None) -> str:
    """The store as it may be printed or logged: credentials inside the URI (`https://user:pass@host`,
    `postgresql://u:p@h/db`) replaced by `***`."""
    from mfr_ray.config.secrets import redact

    return redact(resolve_tracking_uri(cfg))


def local_artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts live in `mlruns/` beside the database file; servers decide their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()


def _use(cfg: TrackingConfig | None):
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(cfg))
    experiment = (cfg or TrackingConfig()).experiment
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=local_artifact_root(resolve_tracking_uri(cfg)))
    mlflow.set_experiment(experiment)
    return mlflow


@contextmanager
def start_run(
    cfg: TrackingConfig | None = None,
    *,
    run_name: str | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """Open an MLflow run in the configured store; `parent_run_id` nests it under an existing run
    (e.g. an evaluation under its training run) even from another process; `run_id` reopens a run
    (a resumed job keeps logging where it left off)."""
    mlflow = _use(cfg)
    if run_id:
        with mlflow.start_run(run_id=run_id, nested=nested) as run:
            yield run
        return
    run_tags = dict(tags or {})
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=run_name, nested=nested, tags=run_tags) as run:
        yield run


def log_config_params(config: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """Log a config (a model or a plain dict) as flat params; `flatten_config` has replaced SecretStr values
    and credentials inside URIs by `***`. Returns what was logged."""
    import mlflow

    params = {k: ("" if v is None else str(v))[:MLFLOW_PARAM_LIMIT] for k, v in flatten_config(config).items()}
    items = list(params.items())
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start : start + 100]))
    return params


def ui_command(cfg: TrackingConfig | None = None, port: int = 5000, host: str = "127.0.0.1") -> list[str]:
    """The `mlflow server` command line for browsing the configured store (lean: one worker, no jobs)."""
    uri = resolve_tracking_uri(cfg)
    cmd = ["mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    if local_artifact_root(uri):
        cmd += ["--default-artifact-root", local_artifact_root(uri)]
    return cmd
