"""`mfr export`: a checkpoint, registered model or run -> a model package folder (weights, ONNX, the
mask-presence classifier, preprocessing, thresholds from an evaluation, model card), logged to MLflow."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mfr_ray.config.common import TrackingConfig
from mfr_ray.models.store import download_model_files, is_registry_uri, save_model_files
from mfr_ray.serve.calibration import calibration_spec, evaluation_config_from_params, evaluation_scores
from mfr_ray.serve.card import model_card
from mfr_ray.serve.package import (
    DEFAULT_FARS,
    MODEL_CARD,
    PACKAGE_FORMAT,
    PACKAGE_JSON,
    PACKAGE_ONNX,
    OperatingPoint,
    PackageError,
    package_id_of,
)


@dataclass
class ExportResult:
    path: str
    operating_points: list[OperatingPoint]
    run_id: str | None = None
    model_version: str | None = None
    kinds: dict = field(default_factory=dict)  # package.json's calibration.kinds


@dataclass
class _Source:
    model: Any  # nn.Module
    backbone: str
    kwargs: dict
    label: str
    eval_run: str | None = None  # the source itself is an evaluation run


def _source_model(source: str, backbone: str, kwargs: dict, tracking_uri: str) -> _Source:
    """What `mfr export` was given: a checkpoint (a path or s3://), a `models:/` URI, or an MLflow run id (a
    training run's `model/`, or an evaluation run's model)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mfr_ray.config.secrets import redact
    from mfr_ray.models.spec import ModelSpec, load_stored
    from mfr_ray.storage import is_s3

    def from_model_files(uri: str, label: str) -> _Source:
        with tempfile.TemporaryDirectory(prefix="mfr-model-") as folder:
            stored = download_model_files(uri, tracking_uri, folder)
            return _Source(load_stored(stored), stored.backbone, stored.kwargs, label)

    if is_registry_uri(source):
        return from_model_files(source, source)
    if is_s3(source) or Path(source).expanduser().is_file():
        spec = ModelSpec(backbone=backbone, checkpoint=source if is_s3(source) else str(Path(source).expanduser()),
                         kwargs=kwargs)
        return _Source(spec.load(), backbone, kwargs, spec.display_name())
    try:
        run = MlflowClient(tracking_uri=tracking_uri).get_run(source)
    except MlflowException:
        raise PackageError(f"{source!r} is neither a checkpoint file, a models:/ URI nor an MLflow run id "
                           f"in {redact(tracking_uri)}") from None
    if run.data.tags.get("mfr.stage") == "evaluate":
        spec = evaluation_config_from_params(run.data.params).model
        return _Source(spec.load(), spec.backbone, dict(spec.kwargs), spec.display_name(), eval_run=source)
    return from_model_files(f"runs:/{source}/model", f"run {source}")


def _same_weights(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _copy_presence(out: Path) -> None:
    """The mask-presence classifier goes into the package: the thresholds it chooses were exported with it."""
    import shutil

    from mfr_ray.masking.presence import PRESENCE_FILE

    shutil.copyfile(PRESENCE_FILE, out / PRESENCE_FILE.name)


def _export_runtime(model, out: Path, runtime: str) -> str:
    """Write `model.onnx` into the package; the runtime it will run on (torch where it cannot export)."""
    import warnings

    from mfr_ray.registry import RUNTIMES
    from mfr_ray.runtime import ExportError, export_onnx

    RUNTIMES.check(runtime)
    (out / PACKAGE_ONNX).unlink(missing_ok=True)  # a previous export's file must not outlive its weights
    try:
        export_onnx(model, out / PACKAGE_ONNX)
    except ExportError as exc:
        warnings.warn(f"{exc}; the package runs on torch", RuntimeWarning, stacklevel=2)
        return "torch"
    return runtime


def export_package(
    source: str,
    out: str | Path,
    eval_run: str | None = None,
    fars: tuple[float, ...] | list[float] = DEFAULT_FARS,
    backbone: str = "mobilefacenet",
    backbone_kwargs: dict | None = None,
    tracking: TrackingConfig | None = None,
    register_name: str | None = None,
    runtime: str | None = None,
) -> ExportResult:
    """Write the package for `source` (checkpoint file, `models:/` URI or MLflow run id) into `out`, with
    thresholds at `fars` calibrated on evaluation run `eval_run` (an evaluation run as `source` is its own
    eval_run); the evaluation must have evaluated these very weights. Logged to MLflow as artifacts
    `package/` of an `export` run (unless tracking.enabled is false) and, with `register_name`, registered
    as a new version of that model (its source is the package folder, which is also plain model files).
    `runtime` (default: `mfr_ray.runtime.DEFAULT_RUNTIME`) is what loading the package runs it on."""
    from mfr_ray.runtime import DEFAULT_RUNTIME
    from mfr_ray.tracking import resolve_tracking_uri

    tracking = tracking or TrackingConfig()
    tracking_uri = resolve_tracking_uri(tracking)
    found = _source_model(str(source), backbone, dict(backbone_kwargs or {}), tracking_uri)
    eval_run = eval_run or found.eval_run
    calibration = evaluation_scores(eval_run, tracking_uri) if eval_run else None
    out = Path(out).expanduser()
    save_model_files(found.model, found.backbone, found.kwargs, out)
    _copy_presence(out)
    runtime = _export_runtime(found.model, out, runtime or DEFAULT_RUNTIME)
    spec = _package_spec(found, _preprocessing(found, calibration, eval_run), runtime, out)
    points: list[OperatingPoint] = []
    if calibration is not None:
        points, spec["calibration"] = calibration_spec(calibration, fars)
    (out / PACKAGE_JSON).write_text(json.dumps(spec, indent=2, sort_keys=True))
    (out / MODEL_CARD).write_text(model_card(spec))
    result = ExportResult(str(out), points, kinds=spec.get("calibration", {}).get("kinds", {}))
    if tracking.enabled:
        result.run_id, result.model_version = _log_package(out, spec, tracking, register_name)
    return result


def _evaluated_policy(found: _Source, calibration, eval_run: str) -> tuple[dict, bool, str, bool]:
    """The calibrating evaluation's alignment, flip, feature and precision, once it is shown to have scored
    these weights on faces it detected and aligned itself (what a service does to a camera image)."""
    if not _same_weights(found.model, calibration.config.model.load()):
        raise PackageError(f"evaluation {eval_run} evaluated {calibration.config.model.display_name()}, not "
                           f"{found.label}: its thresholds would not hold for these weights")
    source_cfg = calibration.config.sources[calibration.variant]
    if source_cfg.type != "folder" or source_cfg.align.skip_detection:
        raise PackageError(f"evaluation {eval_run} read prepared or pre-aligned crops ({source_cfg.uri}); "
                           "export from an evaluation that detects and aligns faces in an image folder: its "
                           "alignment is what a service applies to a camera image")
    config = calibration.config
    return source_cfg.align.model_dump(mode="json"), config.flip, calibration.protocol.feature, config.compute.bf16


def _preprocessing(found: _Source, calibration, eval_run: str | None) -> dict[str, Any]:
    """package.json's `preprocessing`: the evaluation's (defaults without one) and the backbone's input."""
    from mfr_ray.faces.config import AlignConfig
    from mfr_ray.faces.geometry import CROP_TEMPLATES

    if calibration is not None:
        align, flip, feature, bf16 = _evaluated_policy(found, calibration, eval_run)
    else:
        align, flip, feature, bf16 = AlignConfig().model_dump(mode="json"), True, "sum", False
    config = found.model.backbone_config
    return {
        "align": align,
        "crop": align["crop"],
        "crop_size_hw": list(CROP_TEMPLATES[align["crop"]][0]),
        "input_size_hw": list(config.input_size),
        "normalisation": {**asdict(config.normalisation), "channels": "RGB",
                          "formula": "(x - pixel_mean) / pixel_scale"},
        "flip": flip,
        "feature": feature,
        "bf16": bf16,
        "no_face": "a face no detector finds is refused (no_face); the centre-box fallback is never used",
    }


def _package_spec(found: _Source, preprocessing: dict, runtime: str, out: Path) -> dict[str, Any]:
    concat = preprocessing["feature"] == "concat"
    return {
        "format": PACKAGE_FORMAT,
        "model": found.label,
        "backbone": found.backbone,
        "kwargs": found.kwargs,
        "embedding_size": int(found.model.embedding_size) * (2 if concat else 1),
        "preprocessing": preprocessing,
        "runtime": runtime,
        "package_id": package_id_of(out, preprocessing),
    }


def _log_package(out: Path, spec: dict, tracking: TrackingConfig, register_name: str | None):
    import mlflow

    from mfr_ray.models.store import register_model_version
    from mfr_ray.tracking import start_run

    tags = {"mfr.stage": "export", "mfr.model": spec["model"], "mfr.package_id": spec["package_id"]}
    if spec.get("calibration"):
        tags["mfr.eval_run"] = spec["calibration"]["eval_run"]
    with start_run(tracking, run_name=f"export-{out.name}", tags=tags) as run:
        mlflow.log_params({"backbone": spec["backbone"], "feature": spec["preprocessing"]["feature"],
                           "flip": spec["preprocessing"]["flip"], "crop": spec["preprocessing"]["crop"]})
        for point in spec.get("calibration", {}).get("operating_points", []):
            tag = f"far{point['far_target'] * 100:g}pct"
            mlflow.log_metrics({f"threshold_at_{tag}": point["threshold"], f"tpr_at_{tag}": point["tpr"],
                                f"far_at_{tag}": point["far"]})
        mlflow.log_artifacts(str(out), artifact_path="package")
        version = None
        if register_name:
            version = register_model_version(register_name, "package", run.info.run_id,
                                             {"mfr.format": PACKAGE_FORMAT, "mfr.backbone": spec["backbone"]})
        return run.info.run_id, version
