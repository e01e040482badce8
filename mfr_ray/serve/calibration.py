"""A package's thresholds from an evaluation run: its pair scores (and, per kind of comparison, the masked
ones in `pair_scores.npz`) read back from MLflow, and the threshold at each false accept rate."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mfr_ray.serve.package import OperatingPoint, PackageError

EVAL_ARTIFACT_EMBEDDINGS = "embeddings.npz"
EVAL_ARTIFACT_SUMMARY = "summary.json"
# Config sections of an evaluation run that cannot change a score (and may hold secrets).
_EVAL_SECTIONS_IGNORED = ("storage", "tracking", "ray")


def _parse_param(raw: str) -> Any:
    """An MLflow param back to config data: '' was None, lists/dicts were logged as their repr; scalars stay
    text for pydantic to coerce."""
    import yaml

    if raw == "":
        return None
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return parsed if isinstance(parsed, list | dict) else raw


def evaluation_config_from_params(params: dict[str, str]):
    """Rebuild an evaluation run's EvaluateConfig from its logged params (all but storage/tracking/ray)."""
    from mfr_ray.config.loader import set_dotted
    from mfr_ray.evaluation.config import EvaluateConfig

    data: dict[str, Any] = {}
    for key, raw in sorted(params.items()):
        if key.split(".", 1)[0] in _EVAL_SECTIONS_IGNORED:
            continue
        set_dotted(data, key, _parse_param(raw))
    try:
        return EvaluateConfig.model_validate(data)
    except ValueError as exc:
        raise PackageError(f"the evaluation run's params do not rebuild its config: {exc}") from None


def _evaluation_config(config_file: Path | None, params: dict[str, str]):
    """The evaluation's config from the resolved config it logged (`evaluate_config.json`), or, for runs made
    before it did, rebuilt from its params; the sections that cannot change a score are left out."""
    from mfr_ray.evaluation.config import EvaluateConfig

    if config_file is None:
        return evaluation_config_from_params(params)
    data = {k: v for k, v in json.loads(config_file.read_text()).items() if k not in _EVAL_SECTIONS_IGNORED}
    try:
        return EvaluateConfig.model_validate(data)
    except ValueError as exc:
        raise PackageError(f"the evaluation run's {config_file.name} does not load: {exc}") from None


@dataclass
class _Calibration:
    config: Any  # EvaluateConfig
    run_id: str
    scores: np.ndarray
    same: np.ndarray
    protocol: Any  # ProtocolSpec
    variant: str
    summary: dict
    kinds: Any = None  # comparison_kinds.KindScores, for evaluations that wrote pair_scores.npz


def _download(eval_run: str, tracking_uri: str, folder: str, name: str) -> Path | None:
    """One artifact of the evaluation run, or None when the run has none by that name."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=eval_run, artifact_path=name,
                                                        tracking_uri=tracking_uri, dst_path=folder))
    except (MlflowException, OSError):
        return None


def evaluation_scores(eval_run: str, tracking_uri: str) -> _Calibration:
    """The evaluation's pair scores, recomputed exactly as it did from its logged embeddings and config,
    and its scores per kind of comparison where it logged them."""
    from mlflow import MlflowClient

    from mfr_ray.evaluation.comparison_kinds import PAIR_SCORES_FILE, KindScores, plain_protocol
    from mfr_ray.evaluation.embed import EmbeddingSet
    from mfr_ray.evaluation.runner import CONFIG_FILE, load_pairs, protocol_scores

    run = MlflowClient(tracking_uri=tracking_uri).get_run(eval_run)
    if run.data.tags.get("mfr.stage") != "evaluate":
        raise PackageError(f"run {eval_run} is not an evaluation run (tag mfr.stage={run.data.tags.get('mfr.stage')!r})")
    with tempfile.TemporaryDirectory(prefix="mfr-eval-") as folder:
        cfg = _evaluation_config(_download(eval_run, tracking_uri, folder, CONFIG_FILE), run.data.params)
        protocol = plain_protocol(cfg.protocols)
        if protocol is None:
            raise PackageError(f"evaluation {eval_run}: every protocol subtracts a training-fold mean, which a "
                               "service cannot reproduce per pair; evaluate with a plain protocol (feature sum/single)")
        embeddings = EmbeddingSet.load(_download(eval_run, tracking_uri, folder, EVAL_ARTIFACT_EMBEDDINGS))
        summary = json.loads(_download(eval_run, tracking_uri, folder, EVAL_ARTIFACT_SUMMARY).read_text())
        kinds_file = _download(eval_run, tracking_uri, folder, PAIR_SCORES_FILE)
        kinds = KindScores.load(kinds_file) if kinds_file else None
    pairs = load_pairs(cfg)
    index = {k: i for i, k in enumerate(embeddings.keys)}
    pair_keys = pairs.keys()
    missing = [k for k in pair_keys if k not in index]
    if missing:
        raise PackageError(f"evaluation {eval_run}: {len(missing)} pair images are not in its embeddings "
                           f"(e.g. {missing[0]}); the pair list changed since it ran")
    features = embeddings.features(protocol.feature)
    left, right = features[[index[k] for k in pairs.left]], features[[index[k] for k in pairs.right]]
    scores = protocol_scores(left, right, pairs, protocol)  # the runner's own scoring
    return _Calibration(cfg, eval_run, scores, pairs.same, protocol, cfg.primary_variant(), summary, kinds)


def calibrate(scores: np.ndarray, same: np.ndarray, fars, calibration_set: str) -> list[OperatingPoint]:
    """Thresholds at each FAR on all impostor pairs of the set, with the FAR and TPR they reach there."""
    from mfr_ray.evaluation.verification import far_threshold, rates

    impostor = scores[~same]
    points = []
    for target in fars:
        threshold = far_threshold(impostor, target)
        measured = rates(scores, same, threshold)
        points.append(OperatingPoint(
            far_target=float(target), threshold=float(threshold), far=float(measured["far"]),
            tpr=float(measured["tpr"]), false_accepts=int(measured["false_accepts"]),
            n_impostor=int(measured["n_impostor"]), n_genuine=int(same.sum()),
            resolvable=bool(len(impostor) and 1.0 / len(impostor) <= target), calibration_set=calibration_set,
        ))
    return points


def calibration_spec(calibration: _Calibration, fars) -> tuple[list[OperatingPoint], dict]:
    """The bare pairs' operating points and `package.json`'s calibration section: those points, and one
    list per kind of comparison the evaluation scored (masked-unmasked, masked-masked: its masked variants
    pooled), each naming the set it was measured on."""
    from mfr_ray.evaluation.comparison_kinds import KINDS, UNMASKED_UNMASKED

    n = len(calibration.same)
    where = f"evaluation run {calibration.run_id}"
    points = calibrate(calibration.scores, calibration.same, fars, f"{Path(calibration.config.pairs.path).name} "
                       f"({calibration.variant}, {n} pairs, {where})")
    kinds = {UNMASKED_UNMASKED: {"variants": [calibration.variant], "operating_points": [asdict(p) for p in points]}}
    for kind in KINDS[1:]:
        pooled = calibration.kinds.pooled(kind) if calibration.kinds is not None else None
        if pooled is not None:
            variants = calibration.kinds.variants(kind)
            kind_points = calibrate(*pooled, fars, f"{kind} pairs of {', '.join(variants)} ({len(pooled[1])} "
                                    f"pairs, {where})")
            kinds[kind] = {"variants": variants, "operating_points": [asdict(p) for p in kind_points]}
    return points, {
        "eval_run": calibration.run_id, "evaluation": calibration.summary.get("name"),
        "pairs_file": calibration.config.pairs.path, "variant": calibration.variant,
        "protocol": calibration.protocol.name, "n_pairs": n,
        "score": "cosine similarity of L2-normalised features; accept when score >= threshold",
        "operating_points": [asdict(p) for p in points], "kinds": kinds,
    }
