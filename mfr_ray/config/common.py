"""Config sections shared by every job: storage, tracking, Ray. Stage configs embed these."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import Field, SecretStr, field_validator

from mfr_ray.config.base import ConfigError, StrictModel

LOOPBACK = "127.0.0.1"


class StorageConfig(StrictModel):
    """Object-storage access. Empty fields fall back to the standard AWS environment variables
    (AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN), and then to boto3/pyarrow's own chain (instance profiles on a cluster)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    max_attempts: int = Field(8, ge=1, le=50, description="S3 retries for transient errors")
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(60.0, gt=0)

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def resolved_region(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    def credentials(self) -> dict[str, str]:
        """Explicit credentials if configured or in the environment; empty means the default chain."""
        pairs = {
            "access_key_id": (self.access_key_id, "AWS_ACCESS_KEY_ID"),
            "secret_access_key": (self.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
            "session_token": (self.session_token, "AWS_SESSION_TOKEN"),
        }
        out = {}
        for name, (secret, env) in pairs.items():
            value = secret.get_secret_value() if secret else os.environ.get(env)
            if value:
                out[name] = value
        return out


class TrackingConfig(StrictModel):
    """MLflow. No URI: $MLFLOW_TRACKING_URI, else a SQLite file in the working folder (embedded default)."""

    tracking_uri: str | None = None
    experiment: str = "mfr-ray"
    enabled: bool = True


class RayConfig(StrictModel):
    """Where jobs run. No address: a running cluster from $RAY_ADDRESS, else a local Ray started here,
    listening on loopback only unless `node_ip_address` opens it up."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    namespace: str | None = None
    include_dashboard: bool | None = Field(
        None, description="local start only: the dashboard and its agent take ~150 MB and a few % of a core; "
        "None lets Ray decide (on when its dependencies are installed)"
    )
    node_ip_address: str = Field(
        LOOPBACK, description="local start only: 127.0.0.1 keeps every Ray server (GCS, raylet, agents, "
        "workers, dashboard) on loopback; this machine's network address lets other machines join, and then "
        "Ray listens on all interfaces, so token auth must stay on (RAY_AUTH_MODE not `disabled`)"
    )

    @field_validator("address")
    @classmethod
    def _no_blank(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("node_ip_address")
    @classmethod
    def _an_ip(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address (127.0.0.1 or this machine's address)") from None

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.node_ip_address).is_loopback


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Ray 2.60 binds its gRPC servers (GCS, raylet, object manager, workers) to loopback only when the node
    IP is 127.0.0.1, but on Linux it turns a given 127.0.0.1 into the machine's outward address
    (`services.resolve_ip_for_localhost`). Its single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the
    macOS/Windows default) keeps 127.0.0.1. Set for the start only: the env for the processes it spawns,
    the constant for this already-imported Ray."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def init_ray(cfg: RayConfig, **init_kwargs: Any) -> None:
    """Join the configured or ambient ($RAY_ADDRESS, e.g. under `ray job submit`) cluster, else start Ray here
    on loopback (or on `cfg.node_ip_address`, token auth required). `init_kwargs` go to `ray.init` as they are
    (e.g. `log_to_driver=False`)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, namespace=cfg.namespace, **init_kwargs)
        return
    local = dict(num_cpus=cfg.num_cpus, namespace=cfg.namespace, include_dashboard=cfg.include_dashboard,
                 dashboard_host=LOOPBACK, **init_kwargs)
    if cfg.loopback:
        with _loopback_node():
            ray.init(**local)
        return
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":  # unset: Ray 2.60 turns token auth on
        raise ConfigError(
            f"ray.node_ip_address={cfg.node_ip_address} opens Ray's servers to the network; that needs token "
            "auth (unset RAY_AUTH_MODE=disabled, or set RAY_AUTH_MODE=token)"
        )
    ray.init(_node_ip_address=cfg.node_ip_address, **local)


class DoctorConfig(StrictModel):
    """What `mfr doctor` checks against."""

    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    s3_uri: str | None = Field(None, description="s3://bucket/prefix to probe; default: list buckets")
