"""A real two-node Ray cluster on loopback with token auth on (a head and a second `ray start --address` node,
one CPU each): submit jobs/prepare_dataset.py through the Jobs API with the repo as working_dir, and check
that the job ran the uploaded package, actors ran on both nodes, the output is complete and no node listened
beyond loopback."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mfr_ray.paths import shared_dir
from tests.prepare_inputs import REPO, make_face_tree, prepare_config, read_variant, write_config
from tests.services import descendants, free_port, listening_sockets, stop_process, wait_for_port

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
WHICH_PACKAGE = "import mfr_ray; print('mfr_ray from', mfr_ray.__file__)"
WORKING_DIR_EXCLUDES = [".venv", ".git", "outputs", "mlruns", "mlflow.db", "*.egg-info", ".pytest_cache",
                        ".ruff_cache", "ray_results", "mfr_runs"]


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _agent_ports(ports: list[int]) -> list[str]:
    """Ports every node's agents would otherwise take by default (52365...), which another Ray on the
    machine may hold: clashing agents fail and the Jobs API then has no agent to submit through."""
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port")
    return [f"--{name}={port}" for name, port in zip(names, ports, strict=True)]


# Ray 2.60's CLI cannot start a second node on loopback: it rewrites 127.0.0.1 (in --address and
# --node-ip-address) to the machine's outward address, except in its single-machine mode
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), where `ray start --address` refuses to run. So the joining node is
# `ray start` itself with that rewrite turned off; the head runs in single-machine mode (as `init_ray` does).
RAY_START_ON_LOOPBACK = [
    sys.executable, "-c",
    ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
     "from ray.scripts.scripts import main; sys.exit(main())"),
]


def _start_node(args: list[str], log: Path, env: dict, ray: list[str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen([*(ray or [RAY]), "start", "--block", *args], env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop_node(proc: subprocess.Popen | None) -> None:
    """SIGTERM `ray start --block` alone so it stops and reaps its daemons, then end any straggler of its
    process group."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    stop_process(proc)


def _token_auth_here(monkeypatch) -> None:
    """Token auth for this process's clients (Jobs API, state API), with the default token the nodes read
    too (~/.ray/auth_token, as a local `ray.init` leaves it)."""
    from ray._private.authentication.authentication_token_setup import (
        _get_default_token_path,
        generate_and_save_token,
    )
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray._raylet import Config

    if not _get_default_token_path().is_file():
        generate_and_save_token()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    if not is_token_auth_enabled():
        Config.initialize("")


def test_two_node_cluster_job(tmp_path, lfw_dir, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_nodes

    _token_auth_here(monkeypatch)

    keys = make_face_tree(lfw_dir, tmp_path / "in", count=31)  # + the broken file = 32 inputs, 4 shards
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "prepare.yaml",
        prepare_config(str(tmp_path / "in"), str(out), compute={"num_actors": 2}),
    )
    gcs_port, dashboard_port, client_port, *agent_ports = _distinct_free_ports(11)
    ray_tmp = tempfile.mkdtemp(prefix="mfr-ray-")  # short: Ray's socket paths must fit in 107 characters
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # `python` in the entrypoint is this venv's, as on a cluster whose image has the project installed
    env.update(RAY_AUTH_MODE="token", MFR_SHARED_DIR=str(shared_dir()),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    head = _start_node(
        [f"--port={gcs_port}", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--temp-dir={ray_tmp}", "--disable-usage-stats", f"--ray-client-server-port={client_port}",
         *_agent_ports(agent_ports[:4])],
        tmp_path / "head.log", {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    worker = None
    try:
        wait_for_port(dashboard_port, 120, head, tmp_path / "head.log")
        worker = _start_node(
            [f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             *_agent_ports(agent_ports[4:])],
            tmp_path / "worker.log", env, RAY_START_ON_LOOPBACK,
        )
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + 120
        while sum(1 for n in list_nodes(address=dashboard) if n.state == "ALIVE") < 2:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "second node did not join"
            time.sleep(1)

        client = JobSubmissionClient(dashboard)
        job_id, deadline = None, time.monotonic() + 300
        while job_id is None:  # the head's job agent registers a little after the dashboard opens
            try:
                job_id = client.submit_job(
                    entrypoint=(f"python -c {shlex.quote(WHICH_PACKAGE)} && "
                                f"python jobs/prepare_dataset.py {config} --no-progress"),
                    runtime_env={
                        "working_dir": str(REPO),
                        "excludes": WORKING_DIR_EXCLUDES,
                        "env_vars": {"MFR_SHARED_DIR": str(shared_dir())},
                    },
                )
            except RuntimeError as exc:
                assert "No available agent" in str(exc) and time.monotonic() < deadline, exc
                time.sleep(2)
        deadline = time.monotonic() + 420
        while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED}:
            assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
            time.sleep(2)
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert "check: images in 32 = unmasked rows out 32" in logs
        package = re.search(r"mfr_ray from (\S+)", logs).group(1)  # the working_dir's copy, not the checkout
        assert "working_dir_files" in package and not package.startswith(str(REPO)), package

        card = json.loads((out / "dataset_card.json").read_text())
        node_ids = {n.node_id for n in list_nodes(address=dashboard)}
        used = set(card["counts"]["shards_per_node"])
        assert len(used) == 2 and used <= node_ids, (used, node_ids, logs[-6000:])
        assert sorted(read_variant(out, "unmasked")["source_key"].to_pylist()) == keys
        assert {n.node_ip for n in list_nodes(address=dashboard)} == {"127.0.0.1"}
        sockets = listening_sockets(descendants([head.pid, worker.pid]))
        assert {"gcs_server", "raylet"} <= {name for _, name, _, _ in sockets}, sockets
        assert not [s for s in sockets if s[2] not in {"127.0.0.1", "::1"}], sockets
    finally:
        for proc in (worker, head):
            _stop_node(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)
