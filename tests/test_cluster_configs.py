"""Cluster deployment files, checked structurally (no Docker or cloud here): node types and resources,
token auth, no keys in files, and every job entrypoint points at a job script and a config that loads
with the same overrides the manifest passes."""

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import typer
import yaml

from mfr_ray.cli import app, job_arguments
from mfr_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
STAGES = ("prepare", "train", "tune", "evaluate")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_no_credentials_in_cluster_files():
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
            assert not re.search(r"(?i)aws_secret_access_key\s*[:=]", text), path


def test_aws_launcher_has_cpu_and_gpu_node_types():
    cfg = load("aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    cpu = nodes["cpu_masking"]
    gpu = nodes["gpu_training"]
    assert re.match(r"^[cm]\d", cpu["node_config"]["InstanceType"])
    assert re.match(r"^(g|p)\d", gpu["node_config"]["InstanceType"])
    for node in nodes.values():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cfg["max_workers"]
        assert "instance-profile" in node["node_config"]["IamInstanceProfile"]["Arn"]
    assert any("mfr" in cmd for cmd in cfg["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c)


def test_aws_nodes_get_the_token_they_require():
    """`ray start` in token mode refuses to run without a token (Ray makes one only for a local ray.init):
    every node gets the launcher's token file, and the file holds no token itself."""
    cfg = load("aws.yaml")
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN=" not in (CLUSTER / "aws.yaml").read_text()


def test_raycluster_token_auth_and_worker_groups():
    cluster = load("kuberay/raycluster.yaml")
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["authOptions"]["mode"] == "token"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu_limits = {
        name: g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for name, g in groups.items()
    }
    assert gpu_limits["gpu-training"] and not gpu_limits["cpu-masking"]
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["serviceAccountName"] == "mfr-ray"


@pytest.mark.parametrize("stage", STAGES)
def test_rayjob_entrypoint_points_at_real_job_and_valid_config(stage):
    job = load(f"kuberay/rayjob-{stage}.yaml")
    cluster = load("kuberay/raycluster.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), argv[1]
    command = re.search(r'run_job\("(\w+)"\)', (ROOT / argv[1]).read_text()).group(1)
    cli_command = typer.main.get_command(app).commands[command]
    with cli_command.make_context(argv[1], job_arguments(argv[2:])) as parsed:  # parsed as the job parses it
        config, overrides = parsed.params["config"], parsed.params["overrides"]
    assert (ROOT / config).is_file(), config
    load_config(ROOT / config, overrides or [])


def test_dockerfile_pins_match_pyproject():
    docker = (CLUSTER / "Dockerfile").read_text()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in [d for d in deps if d.startswith(("torch==", "torchvision=="))]:
        assert pin in docker
    makefile = (ROOT / "Makefile").read_text()
    facenet = re.search(r"facenet-pytorch==[\d.]+", makefile).group(0)
    assert facenet in docker and "--no-deps" in docker
