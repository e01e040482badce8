"""Where a job's Ray comes from: the configured or ambient cluster, else a Ray started here on loopback
(`RayConfig` says which)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mfr_ray.config.base import ConfigError
from mfr_ray.config.common import LOOPBACK, RayConfig


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
