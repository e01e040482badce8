"""Where a job's Ray comes from: the configured or ambient cluster, else a Ray started here on loopback
(`RayConfig` says which)."""

from __future__ import annotations

import logging
import os
import socket
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


# Processes a job of this project runs at once on one node: Ray Train's controller, its placement-group
# cleaner and preemption watcher, the training workers, the dataset manager and split coordinator, masking
# actors and ingest tasks (most hold no CPU). Ray warns ("N PYTHON worker processes have been started")
# at 4x its startup concurrency, which is one per CPU: 8 on 2 CPUs, what a training run uses by design.
# Four concurrent starts put the warning at 16, where it again means something is wrong.
MIN_STARTUP_CONCURRENCY = 4
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropTokenNotice(logging.Filter):
    """Ray's notice that token auth is on, at every local start: the project turns it on on purpose (README,
    "Trust"); a start that fails for want of a token still says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_NOTICE)


_TOKEN_FILTER = _DropTokenNotice()


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@contextmanager
def _start_env(num_cpus: int | None, node_ip: str) -> Iterator[None]:
    """Environment for a local start only (the processes it spawns keep it): the GCS on a port chosen here,
    announced to every worker as the API server's address (Ray Train's placement-group cleaner asks the
    state API for it; without it, a second Ray on the machine makes the lookup ambiguous and the cleaner
    prints a traceback), and the startup concurrency above."""
    port = _free_loopback_port()
    concurrency = max(MIN_STARTUP_CONCURRENCY, num_cpus or os.cpu_count() or 1)
    values = {"RAY_GCS_SERVER_PORT": str(port), "RAY_API_SERVER_ADDRESS": f"{node_ip}:{port}",
              "RAY_worker_maximum_startup_concurrency": str(concurrency)}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TOKEN_FILTER)
    if cfg.loopback:
        with _loopback_node(), _start_env(cfg.num_cpus, LOOPBACK):
            ray.init(**local)
        return
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":  # unset: Ray 2.60 turns token auth on
        raise ConfigError(
            f"ray.node_ip_address={cfg.node_ip_address} opens Ray's servers to the network; that needs token "
            "auth (unset RAY_AUTH_MODE=disabled, or set RAY_AUTH_MODE=token)"
        )
    with _start_env(cfg.num_cpus, cfg.node_ip_address):
        ray.init(_node_ip_address=cfg.node_ip_address, **local)
