"""Config sections shared by every job: storage, tracking, Ray. Stage configs embed these."""

from __future__ import annotations

import ipaddress
import os

from pydantic import Field, SecretStr, field_validator

from mfr_ray.config.base import StrictModel

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


class DoctorConfig(StrictModel):
    """What `mfr doctor` checks against."""

    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    s3_uri: str | None = Field(None, description="s3://bucket/prefix to probe; default: list buckets")
