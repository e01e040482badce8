"""The local Ray listens on loopback only, with token auth on: every TCP socket that a process of the Ray we
started (GCS, raylet, dashboard and its agents, workers, Ray Data actors) listens on is 127.0.0.1 or ::1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mfr_ray.config.common import RayConfig
from tests.services import descendants, listening_sockets

LOOPBACK = {"127.0.0.1", "::1"}

# Starts Ray as a job does (init_ray with the default RayConfig: dashboard on), runs a task, an actor and a
# Ray Data actor pool so that workers open their servers, then lists what its process tree listens on.
JOB = """
import json, os, ray, ray.data
from mfr_ray.config.common import RayConfig
from mfr_ray.raycluster import init_ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from tests.services import descendants, listening_sockets

init_ray(RayConfig(num_cpus=2))

class Double:
    def __call__(self, batch):  # a Ray Data actor reports its own sockets: the pool is gone after the run
        mine = json.dumps(listening_sockets([os.getpid()]))
        return {"id": batch["id"] * 2, "sockets": [mine] * len(batch["id"])}

@ray.remote
class Counter:
    def ping(self):
        return os.getpid()

ray.get([ray.remote(lambda: os.getpid()).remote(), Counter.remote().ping.remote()])
rows = ray.data.range(8).map_batches(Double, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
assert sorted(r["id"] for r in rows) == list(range(0, 16, 2))
data_actor = [tuple(s) for r in rows for s in json.loads(r["sockets"])]
assert data_actor, "the Ray Data actor listens on nothing?"
print("RESULT " + json.dumps({"sockets": sorted(set(listening_sockets(descendants([os.getpid()])) + data_actor)),
                              "token_auth": is_token_auth_enabled(),
                              "dashboard": ray._private.worker._global_node.webui_url}))
ray.shutdown()
"""


def _repo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "RAY_AUTH_MODE"}}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    return env


def test_init_ray_listens_on_loopback_only_with_token_auth():
    proc = subprocess.run([sys.executable, "-c", JOB], check=False, env=_repo_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    sockets = result["sockets"]
    names = {name for _, name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names and len(sockets) >= 8, sockets  # the servers were seen
    assert any(name.startswith(("ray::Double", "ray::MapWorker")) for name in names), names
    exposed = [s for s in sockets if s[2] not in LOOPBACK]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
    assert result["token_auth"], "token auth must stay on"
    assert result["dashboard"].startswith("127.0.0.1:"), result["dashboard"]


def test_ray_local_fixture_listens_on_loopback_only(ray_local):
    """The session's Ray that most tests share: the same check on its processes in this pytest run."""
    node = ray_local._private.worker._global_node
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos]

    @ray_local.remote
    class Echo:
        def pid(self):
            return os.getpid()

    actor = Echo.remote()
    ray_local.get(actor.pid.remote())
    sockets = listening_sockets(descendants(pids))
    ray_local.kill(actor)
    assert {"gcs_server", "raylet"} <= {name for _, name, _, _ in sockets}, sockets
    assert not [s for s in sockets if s[2] not in LOOPBACK], sockets
    assert os.environ.get("RAY_AUTH_MODE") == "token"


def test_opening_ray_up_requires_token_auth():
    """A network-facing local Ray with token auth switched off is refused before anything starts."""
    job = ("from mfr_ray.config.common import RayConfig\nfrom mfr_ray.raycluster import init_ray\n"
           "init_ray(RayConfig(node_ip_address='192.0.2.10'))")
    proc = subprocess.run([sys.executable, "-c", job], check=False, env={**_repo_env(), "RAY_AUTH_MODE": "disabled"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ConfigError" in proc.stderr, proc.stderr[-3000:]
    assert "needs token auth" in proc.stderr


def test_node_ip_address_must_be_an_ip():
    with pytest.raises(ValueError, match="not an IP address"):
        RayConfig(node_ip_address="0.0.0.0; rm -rf /")
    assert RayConfig().loopback and not RayConfig(node_ip_address="10.1.2.3").loopback
