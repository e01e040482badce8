"""The `mfr` command as a user runs it (real subprocesses)."""

import subprocess
import sys
from pathlib import Path

import yaml

from mfr_ray import __version__

MFR = str(Path(sys.executable).parent / "mfr")
REPO = Path(__file__).resolve().parent.parent


def run(*args, env=None, check=True):
    import os

    proc = subprocess.run([MFR, *args], check=False, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_version_and_help():
    assert run("--version").stdout.strip() == f"mfr-ray {__version__}"
    for sub in (["config", "show"], ["doctor"], ["ui"]):
        assert "--help" in run(*sub, "--help").stdout


def test_config_show_resolves_and_reports_errors(tmp_path):
    shown = yaml.safe_load(run("config", "show", "configs/doctor.yaml", "storage.region=eu-north-1").stdout)
    assert shown["storage"]["region"] == "eu-north-1" and shown["storage"]["max_attempts"] == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: doctor\nstorage:\n  max_attempts: many\n")
    proc = run("config", "show", str(bad), check=False)
    assert proc.returncode == 2 and "storage.max_attempts" in proc.stderr and str(bad) in proc.stderr


def test_doctor_all_green_with_s3(s3_server, tmp_path):
    env = {**s3_server.env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = run("doctor", env=env)
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in proc.stdout.splitlines() if line.count("│") >= 3}
    for check in ("torch", "torchvision", "dlib", "face models", "facenet-pytorch", "ray", "mlflow", "s3"):
        assert rows.get(check) == "ok", proc.stdout
    assert s3_server.secret_key not in proc.stdout


def test_doctor_reports_unreachable_s3():
    proc = run("doctor", "--config", "configs/doctor.yaml", "--services", check=False,
               env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "sssssecret"})
    assert proc.returncode == 1 and "FAIL" in proc.stdout and "sssssecret" not in proc.stdout
