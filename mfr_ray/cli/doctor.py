"""`mfr doctor`: check that every part the pipeline needs is installed and every service is reachable."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import typer

from mfr_ray.cli.common import load_or_exit
from mfr_ray.config.common import StorageConfig

Check = tuple[str, Callable[[], str]]


class Skip(Exception):
    """The check does not apply here (e.g. no S3 endpoint configured)."""


def _torch() -> str:
    import torch

    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "CPU only"
    return f"{torch.__version__} ({cuda})"


def _torchvision() -> str:
    import torchvision

    return torchvision.__version__


def _dlib() -> str:
    import dlib

    from mfr_ray.paths import face_model_file

    dlib.get_frontal_face_detector()
    dlib.shape_predictor(str(face_model_file("shape_predictor_68_face_landmarks.dat")))
    return f"{dlib.__version__}, HOG detector + 68-point predictor load"


def _face_models() -> str:
    from mfr_ray.paths import face_model_file

    names = [
        "shape_predictor_68_face_landmarks.dat",
        "shape_predictor_5_face_landmarks.dat",
        "mmod_human_face_detector.dat",
        "dlib_face_recognition_resnet_model_v1.dat",
    ]
    paths = [face_model_file(n) for n in names]
    return f"{len(paths)} files in {paths[0].parent}"


def _facenet() -> str:
    import facenet_pytorch

    data = Path(facenet_pytorch.__file__).parent / "data"
    missing = [n for n in ("pnet.pt", "rnet.pt", "onet.pt") if not (data / n).is_file()]
    if missing:
        raise RuntimeError(f"MTCNN weights missing: {missing}")
    return f"{data}: MTCNN weights present"


def _runtime() -> str:
    """The runtime every embedding outside training uses by default, and each runtime's library."""
    from mfr_ray.runtime import DEFAULT_RUNTIME, runtime_versions

    versions = runtime_versions()
    if not versions[DEFAULT_RUNTIME][0].isdigit():
        raise RuntimeError(f"default runtime {DEFAULT_RUNTIME}: {versions[DEFAULT_RUNTIME]}")
    others = ", ".join(f"{name} {version}" for name, version in versions.items() if name != DEFAULT_RUNTIME)
    return (f"{DEFAULT_RUNTIME} {versions[DEFAULT_RUNTIME]} in use by default (compute.runtime / --runtime); "
            f"also {others}")


def _opencv() -> str:
    import cv2

    return cv2.__version__


def _pyarrow() -> str:
    import pyarrow

    return pyarrow.__version__


def _ray() -> str:
    import ray

    from mfr_ray.config.common import RayConfig
    from mfr_ray.raycluster import init_ray

    started = time.perf_counter()
    already = ray.is_initialized()
    if not already:
        init_ray(RayConfig(num_cpus=1, include_dashboard=False), log_to_driver=False, configure_logging=False)
    try:
        value = ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60)
        if value != 42:
            raise RuntimeError("remote task returned a wrong value")
        nodes = len(ray.nodes())
    finally:
        if not already:
            ray.shutdown()
    return f"{ray.__version__}, task ran on {nodes} node(s) in {time.perf_counter() - started:.1f}s"


def _mlflow(cfg) -> Callable[[], str]:
    def check() -> str:
        import mlflow
        from mlflow.tracking import MlflowClient

        from mfr_ray.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(cfg.tracking)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return f"{mlflow.__version__}, store {uri}"  # run_checks redacts credentials inside the URI

    return check


def _s3(cfg) -> Callable[[], str]:
    def check() -> str:
        from mfr_ray.config.secrets import redact
        from mfr_ray.storage import boto3_client, exists

        endpoint = cfg.storage.resolved_endpoint()
        if not endpoint and not cfg.s3_uri:
            raise Skip("no endpoint configured (set AWS_ENDPOINT_URL or storage.endpoint_url)")
        try:
            if cfg.s3_uri:
                exists(cfg.s3_uri, cfg.storage)
                return f"{cfg.s3_uri} reachable"
            count = len(boto3_client(cfg.storage).list_buckets().get("Buckets", []))
        except Exception as exc:  # noqa: BLE001 - any failure is the check's message, redacted
            raise RuntimeError(redact(str(exc), cfg.storage)) from None
        return f"{endpoint}: {count} bucket(s) listed"

    return check


def _shared() -> str:
    from mfr_ray.paths import shared_dir

    root = shared_dir()
    found = [p for p in ("datasets/lfw", "datasets/celeba299", "weights/mobilefacenet_casia.ckpt") if (root / p).exists()]
    if not found:
        raise Skip(f"{root} has no shared datasets (set MFR_SHARED_DIR)")
    return f"{root}: {', '.join(found)}"


def run_checks(checks: list[Check], storage: StorageConfig | None = None) -> list[tuple[str, str, str]]:
    """Run each check; every detail, ok or failed, is redacted (storage secrets, credentials in URIs such as
    a tracking URI `https://user:pass@host`) before anyone sees it."""
    from mfr_ray.config.secrets import redact

    rows = []
    for name, check in checks:
        try:
            status, detail = "ok", check()
        except Skip as exc:
            status, detail = "skip", str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure is a FAIL row, redacted below
            status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        rows.append((name, status, redact(detail, storage)))
    return rows


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        config: Path = typer.Option(None, "--config", help="A config whose storage/tracking sections to check."),
        services: bool = typer.Option(True, "--services/--no-services", help="Also start Ray, reach MLflow and S3."),
    ) -> None:
        """Check torch, the inference runtime, dlib and its face models, MTCNN, Ray, MLflow and S3; print a table."""
        from rich.console import Console
        from rich.table import Table

        from mfr_ray.config.common import DoctorConfig

        cfg = load_or_exit(config, None, expected=DoctorConfig) if config else DoctorConfig()
        checks: list[Check] = [
            ("python", lambda: platform.python_version()),
            ("torch", _torch),
            ("torchvision", _torchvision),
            ("inference runtime", _runtime),
            ("opencv", _opencv),
            ("pyarrow", _pyarrow),
            ("dlib", _dlib),
            ("face models", _face_models),
            ("facenet-pytorch", _facenet),
            ("shared data", _shared),
        ]
        if services:
            checks += [("ray", _ray), ("mlflow", _mlflow(cfg)), ("s3", _s3(cfg))]
        rows = run_checks(checks, cfg.storage)
        table = Table(title="mfr doctor")
        for column in ("check", "status", "detail"):
            table.add_column(column)
        colours = {"ok": "green", "skip": "yellow", "FAIL": "red"}
        for name, status, detail in rows:
            table.add_row(name, f"[{colours[status]}]{status}[/]", detail)
        Console(width=160).print(table)
        if any(status == "FAIL" for _, status, _ in rows):
            raise typer.Exit(1)
