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


def test_doctor_reports_unreachable_s3_and_mlflow_without_secrets(tmp_path):
    """The failures doctor prints do carry secrets (the probed key repeats the AWS secret; MLflow's error
    quotes the tracking URI with its password): they must come out redacted, the rest of the detail kept."""
    secret, password = "sssssecret-0123", "pw-7a6b5c4d"
    config = tmp_path / "doctor.yaml"
    config.write_text(yaml.safe_dump({
        "kind": "doctor", "s3_uri": f"s3://mfr-b/{secret}/probe",
        "tracking": {"tracking_uri": f"http://alice:{password}@127.0.0.1:9"},
        "storage": {"max_attempts": 1, "connect_timeout_s": 1},  # a closed port: fail fast
    }))
    proc = run("doctor", "--config", str(config), "--services", check=False,
               env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k",
                    "AWS_SECRET_ACCESS_KEY": secret, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    rows = {line.split("│")[1].strip(): line.split("│")[3] for line in proc.stdout.splitlines()
            if line.count("│") >= 3 and line.split("│")[1].strip()}
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "checking s3://mfr-b/***/probe failed" in rows["s3"], proc.stdout
    assert "http://***@127.0.0.1:9" in rows["mlflow"], proc.stdout
    assert secret not in proc.stdout + proc.stderr and password not in proc.stdout + proc.stderr


def test_config_show_hides_credentials_in_uris_and_bad_secrets(tmp_path):
    config = tmp_path / "doctor.yaml"
    config.write_text(yaml.safe_dump({
        "kind": "doctor", "tracking": {"tracking_uri": "postgresql://mlflow:db-pa55word@db.internal/mlflow"},
        "storage": {"secret_access_key": "sk-shown-never-1"},
    }))
    shown = run("config", "show", str(config)).stdout
    assert yaml.safe_load(shown)["tracking"]["tracking_uri"] == "postgresql://***@db.internal/mlflow"
    assert "db-pa55word" not in shown and "sk-shown-never-1" not in shown
    proc = run("config", "show", str(config), "storage.secret_access_key=918273645546", check=False)
    assert proc.returncode == 2 and "storage.secret_access_key" in proc.stderr
    assert "918273645546" not in proc.stdout + proc.stderr


JOB_COMMANDS = {"prepare_dataset": "prepare", "train": "train", "tune": "tune", "evaluate": "evaluate",
                "quickstart": "quickstart"}


def run_job(job: str, *args, cwd: Path):
    import os

    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), *args], check=False, text=True,
                          capture_output=True, cwd=cwd, env={**os.environ, "COLUMNS": "200"})


def test_jobs_are_the_cli_commands(tmp_path):
    """Each `jobs/*.py` is its `mfr` command (what `ray job submit` runs): the command's help and options,
    its config errors and exit status, from any folder (no path of its own to the package)."""
    import typer

    from mfr_ray.cli import app

    commands = typer.main.get_command(app).commands
    for job, name in JOB_COMMANDS.items():
        proc = run_job(job, "--help", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"Usage: python {REPO / 'jobs' / job}.py [OPTIONS]" in proc.stdout, proc.stdout
        assert commands[name].help.splitlines()[0] in proc.stdout, proc.stdout
        options = [opt for param in commands[name].params for opt in param.opts if opt.startswith("--")]
        assert options and all(opt in proc.stdout for opt in options), (job, options, proc.stdout)
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: train\ndata: {uri: somewhere}\nschedule: {epochs: many}\n")
    for spelling in ([str(bad)], ["--config", str(bad)]):  # the CLI's, and the jobs' earlier one
        proc = run_job("train", *spelling, "scaling.num_workers=1", cwd=tmp_path)
        assert proc.returncode == 2 and "schedule.epochs" in proc.stderr and str(bad) in proc.stderr, proc.stderr
