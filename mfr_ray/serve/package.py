"""A model package (`mfr export RUN_OR_CHECKPOINT OUT`): what a deployed recogniser needs and nothing to
unpickle.

The folder is a model-files folder (`mfr_model.json` + `weights.pt`, a plain state dict read with
weights_only=True, so `models:/` of a registered package also evaluates), `model.onnx` (the same network
exported once, run by the package's inference runtime, `mfr_ray.runtime`) plus `package.json` - the exact
preprocessing of the evaluation (alignment config, crop, normalisation, flip and feature policy) and the
thresholds calibrated at fixed false accept rates on that evaluation's pairs - and `MODEL_CARD.md`.

`load_package(...).embed_images` is the evaluation's path for an image (decode_image -> FaceAligner ->
Embedder -> feature -> L2 norm), except that a centre box is never guessed: where the evaluation would have
fallen back to one, the service answers `no_face`.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mfr_ray.config.common import StorageConfig, TrackingConfig
from mfr_ray.imageio import Status
from mfr_ray.models.registry import (
    MODEL_SPEC_FILE,
    PIXEL_MEAN,
    PIXEL_SCALE,
    WEIGHTS_FILE,
    is_registry_uri,
    load_model_files,
    save_model_files,
)

PACKAGE_FORMAT = "mfr-ray/model-package/1"
PACKAGE_JSON = "package.json"
PACKAGE_ONNX = "model.onnx"
MODEL_CARD = "MODEL_CARD.md"
DEFAULT_FARS = (1e-2, 1e-3, 1e-4)
CENTRE_FALLBACK = "center"
EVAL_ARTIFACT_EMBEDDINGS = "embeddings.npz"
EVAL_ARTIFACT_SUMMARY = "summary.json"
# Config sections of an evaluation run that cannot change a score (and may hold secrets).
_EVAL_SECTIONS_IGNORED = ("storage", "tracking", "ray")


class PackageError(ValueError):
    """A package cannot be made or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold calibrated at `far_target` on the evaluation's pairs (in-sample, all folds pooled): a
    pair is accepted when its score >= threshold. `resolvable` is False when the set has too few impostor
    pairs for the target (1 / n_impostor > far_target): the threshold then only says "no impostor
    accepted on this set", not the claimed FAR."""

    far_target: float
    threshold: float
    far: float
    tpr: float
    false_accepts: int
    n_impostor: int
    n_genuine: int
    resolvable: bool
    calibration_set: str


@dataclass
class EmbedResult:
    """One input image: `embedding` is the L2-normalised feature (float32, the evaluation's feature mode)
    when status is `ok`, else None with the reason (`no_face`, `decode_error`, `too_large`, `unsupported`)."""

    status: str
    reason: str
    embedding: np.ndarray | None
    align_method: str
    mask_probability: float | None = None  # the aligned face is masked (or its lower half covered)
    synthetic: list = field(default_factory=list)  # SyntheticTemplates of an enrolment photo

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.embedding is not None


class ModelPackage:
    """A loaded package: `embed_images`, `score`, `threshold`. Build one per process or Ray actor (it
    holds MTCNN, dlib and the network)."""

    def __init__(self, folder: str | Path, spec: dict[str, Any], num_threads: int | None = 1):
        self.folder = Path(folder)
        self.spec = spec
        self.num_threads = num_threads
        self._aligner = None
        self._embedder = None
        self._presence = None
        self._masker = None
        self._runtime: str | None = None

    # -- what the package says -------------------------------------------------------------------------
    @property
    def package_id(self) -> str:
        """Content hash of weights + preprocessing: galleries refuse embeddings of another package."""
        return self.spec["package_id"]

    @property
    def embedding_size(self) -> int:
        """Length of `EmbedResult.embedding` (twice the network's for the `concat` feature)."""
        return int(self.spec["embedding_size"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.spec["preprocessing"]

    @property
    def operating_points(self) -> list[OperatingPoint]:
        return [OperatingPoint(**p) for p in self.spec.get("calibration", {}).get("operating_points", [])]

    def operating_point(self, far: float, kind: str = "unmasked-unmasked") -> OperatingPoint:
        """The calibrated point at `far` (one of the exported FARs) for comparisons of `kind`, or a
        PackageError naming what the package has."""
        points = self.kind_points(kind)
        for point in points:
            if math.isclose(point.far_target, far, rel_tol=1e-6):
                return point
        known = ", ".join(f"{p.far_target:g}" for p in points) or "none (exported without --eval-run)"
        raise PackageError(f"no threshold calibrated at FAR={far:g} for {kind} comparisons; this package has: "
                           f"{known}")

    def kind_points(self, kind: str) -> list[OperatingPoint]:
        """Operating points of one kind of comparison; bare pairs fall back to the package's main list
        (packages made before kinds existed); an uncalibrated kind has none."""
        calibration = self.spec.get("calibration", {})
        found = calibration.get("kinds", {}).get(kind, {}).get("operating_points")
        if found is None and kind == "unmasked-unmasked":
            found = calibration.get("operating_points", [])
        return [OperatingPoint(**p) for p in found or []]

    def decision_point(self, far: float, kinds: set[str]) -> tuple[OperatingPoint, str, bool]:
        """The threshold a decision uses when the comparison may be of any of `kinds` (several when the
        mask classifier is unsure): the strictest of their calibrated points. A kind without its own
        calibration takes the strictest point of every kind calibrated, flagged False: never a lower
        false-accept promise than measured. Returns (point, kind it came from, all kinds calibrated)."""
        from mfr_ray.evaluation.comparison_kinds import KINDS

        calibrated = {k: self.operating_point(far, k) for k in KINDS if self.kind_points(k)}
        if not calibrated:
            self.operating_point(far)  # raises, naming the FARs
        chosen = {k: calibrated[k] for k in kinds if k in calibrated}
        complete = len(chosen) == len(kinds)
        pool = chosen if complete else calibrated
        kind = max(pool, key=lambda k: pool[k].threshold)
        return pool[kind], kind, complete

    def threshold(self, far: float) -> float:
        """Similarity threshold at `far`: accept a pair when score >= threshold."""
        return self.operating_point(far).threshold

    @property
    def runtime(self) -> str:
        """What runs the network: the serve/enrol option, else the package's choice (older packages have
        none: the default runtime)."""
        from mfr_ray.runtime import DEFAULT_RUNTIME

        return self._runtime or self.spec.get("runtime") or DEFAULT_RUNTIME

    def use_runtime(self, runtime: str | None) -> ModelPackage:
        """Run the network on `runtime` instead of the package's choice (None: keep it); before the first
        embedding."""
        from mfr_ray.registry import RUNTIMES

        if runtime is not None:
            self._runtime = RUNTIMES.check(runtime)
            self._embedder = self._aligner = None
        return self

    def onnx_file(self) -> Path:
        """The package's own ONNX export; a package made before it had one is exported once into the cache,
        keyed by its package id (the package folder itself is never written to)."""
        from mfr_ray.runtime.onnx import onnx_cache_file

        packaged = self.folder / PACKAGE_ONNX
        return packaged if packaged.is_file() else onnx_cache_file(f"package-{self.package_id}")

    # -- embedding and scoring -------------------------------------------------------------------------
    def _models(self):
        if self._aligner is None:
            from mfr_ray.evaluation.embed import Embedder
            from mfr_ray.faces.aligner import FaceAligner
            from mfr_ray.faces.config import AlignConfig

            self._aligner = FaceAligner(AlignConfig.model_validate(self.serving_align()))
            self._embedder = Embedder(self.model_spec(), flip=self.preprocessing["flip"],
                                      num_threads=self.num_threads, bf16=self.preprocessing["bf16"],
                                      runtime=self.runtime, onnx_file=self.onnx_file())
        return self._aligner, self._embedder

    def model_spec(self):
        """The packaged weights as the evaluation's ModelSpec (a plain state dict, read weights-only)."""
        from mfr_ray.models.spec import ModelSpec

        return ModelSpec(backbone=self.spec["backbone"], checkpoint=str(self.folder / WEIGHTS_FILE),
                         kwargs=self.spec["kwargs"], label=self.spec["model"])

    def serving_align(self) -> dict[str, Any]:
        """The evaluation's alignment config without the centre-box fallback: a service never guesses a face."""
        align = dict(self.preprocessing["align"])
        align["fallbacks"] = [f for f in align["fallbacks"] if f != CENTRE_FALLBACK]
        if self._runtime:  # the serve/enrol choice runs the detector too
            align["runtime"] = self._runtime
        if self.num_threads and not align.get("num_threads"):
            align["num_threads"] = self.num_threads
        return align

    def embed_images(self, images: list[bytes], max_pixels: int | None = None,
                     synthetic=None) -> list[EmbedResult]:
        """Embed encoded images (JPEG/PNG/... bytes) in one batch, through preparation's and evaluation's
        read -> decode -> align path; every input gets a result, bad input a status and a reason (never an
        exception, never a guessed box). `max_pixels` (a service's limit) refuses larger images from their
        header, before decoding; the alignment config's own limit applies either way. `synthetic`
        (`synthetic.SyntheticMasks`, enrolment) adds masked copies of each face as extra templates."""
        from mfr_ray.faces.reading import read_decode_align

        def read(key: str) -> tuple[bytes | None, str, str]:
            data = images[int(key)]
            pixels = _header_pixels(data) if max_pixels else None
            if pixels is not None and pixels > max_pixels:
                return None, Status.TOO_LARGE, f"{pixels} pixels exceeds the limit of {max_pixels}"
            return data, "", ""

        aligner, _ = self._models()
        found = read_decode_align([str(i) for i in range(len(images))], read, aligner)
        results = [EmbedResult(crop.status, crop.reason, None, crop.method) for crop in found]
        for result in results:
            if result.status in (Status.NO_FACE, Status.OK_FALLBACK):
                result.status, result.reason = Status.NO_FACE, f"no face found: {result.reason or 'no detector'}"
        faces = [i for i, crop in enumerate(found) if crop.aligned is not None and crop.status == Status.OK]
        if faces:
            crops = np.stack([found[i].aligned.crop for i in faces])
            features, masked = self.embed_crops(crops), self.mask_presence().probability(crops)
            for i, feature, probability in zip(faces, features, masked, strict=True):
                results[i].embedding, results[i].mask_probability = feature, float(probability)
            if synthetic is not None and synthetic.count:
                for i, crop in zip(faces, crops, strict=True):
                    results[i].synthetic = self.synthetic_templates(crop, images[i], synthetic)
        return results

    def synthetic_templates(self, crop: np.ndarray, data: bytes, cfg) -> list:
        """The masked copies of one aligned enrolment crop, embedded (`synthetic.SyntheticTemplate`s)."""
        from mfr_ray.serve.synthetic import SYNTHETIC_PREFIX, SyntheticMasker, SyntheticTemplate, photo_key

        if self._masker is None or self._masker.cfg != cfg:
            self._masker = SyntheticMasker(cfg)
        copies = self._masker.copies(crop, photo_key(data))
        if not copies:
            return []
        masked = np.stack([image for _, image in copies])
        features, probability = self.embed_crops(masked), self.mask_presence().probability(masked)
        return [SyntheticTemplate(SYNTHETIC_PREFIX + kind, feature, float(p))
                for (kind, _), feature, p in zip(copies, features, probability, strict=True)]

    def mask_presence(self):
        """The package's mask-presence classifier (the shipped one for packages made before they had one)."""
        from mfr_ray.masking.presence import PRESENCE_FILE, MaskPresence

        if self._presence is None:
            packaged = self.folder / PRESENCE_FILE.name
            self._presence = MaskPresence.load(packaged if packaged.is_file() else PRESENCE_FILE)
        return self._presence

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Aligned uint8 (n, H, W, 3) RGB crops -> (n, embedding_size) L2-normalised float32 features."""
        from mfr_ray.evaluation.embed import EmbeddingSet
        from mfr_ray.evaluation.verification import l2_normalize

        _, embedder = self._models()
        out = embedder({"crop": crops})
        features = EmbeddingSet([], out["embedding"], out.get("embedding_flip")).features(
            self.preprocessing["feature"]
        )
        return l2_normalize(features).astype(np.float32)

    @staticmethod
    def score(a: np.ndarray | EmbedResult, b: np.ndarray | EmbedResult) -> float:
        """Cosine similarity of two features from `embed_images` (the evaluation's pair score)."""
        from mfr_ray.evaluation.verification import cosine_scores

        left = a.embedding if isinstance(a, EmbedResult) else a
        right = b.embedding if isinstance(b, EmbedResult) else b
        return float(cosine_scores(np.asarray(left)[None], np.asarray(right)[None])[0])


def _header_pixels(data: bytes) -> int | None:
    """Width x height from an image's header (no pixel is decoded), None when it has no readable header
    (decoding then says why)."""
    import io

    from PIL import Image

    from mfr_ray.imageio import DECODE_FORMATS

    try:
        with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as img:
            return img.size[0] * img.size[1]
    except Exception:  # noqa: BLE001 - not an image: decode_image gives the status and reason
        return None


# -- loading ---------------------------------------------------------------------------------------------
def _temporary_folder() -> Path:
    """A download folder removed when this process exits (a replica's or a CLI's)."""
    import atexit
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="mfr-package-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def pin_package_uri(uri: str, tracking_uri: str | None = None) -> str:
    """`models:/NAME@ALIAS` resolved to the version the alias names now (`models:/NAME/VERSION`), so every
    replica started later loads the same weights; any other URI is returned as it is."""
    from mfr_ray.config.loader import redact_uri

    if not (is_registry_uri(uri) and "@" in uri):
        return uri
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mfr_ray.tracking import resolve_tracking_uri

    name, alias = uri[len("models:/"):].split("@", 1)
    client = MlflowClient(tracking_uri=resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri)))
    try:
        version = client.get_model_version_by_alias(name, alias).version
    except MlflowException as exc:
        raise PackageError(f"{uri}: cannot resolve the alias: {redact_uri(str(exc))[:300]}") from None
    return f"models:/{name}/{version}"


def _fetch(uri: str, storage: StorageConfig | None, tracking_uri: str | None) -> Path:
    """A local folder holding the package at `uri` (a folder, s3://, models:/ or runs:/)."""
    from mfr_ray.storage import StorageError, is_s3, iter_files, join_uri, local_target, read_bytes

    if is_registry_uri(uri) or uri.startswith("runs:/"):
        import mlflow

        from mfr_ray.tracking import resolve_tracking_uri

        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, tracking_uri=resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri)),
            dst_path=str(_temporary_folder()),
        )
        return Path(local)
    if is_s3(uri):
        folder = _temporary_folder()
        try:
            for key, _ in iter_files(uri, storage):
                target = local_target(folder, key)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(read_bytes(join_uri(uri, key), storage))
        except StorageError as exc:
            raise PackageError(f"cannot fetch package {uri}: {exc}") from None
        return folder
    return Path(uri).expanduser()


def load_package(
    path_or_uri: str | Path, storage: StorageConfig | None = None, tracking_uri: str | None = None,
    num_threads: int | None = 1, expect_id: str | None = None,
) -> ModelPackage:
    """Open a package folder (local, s3://, or an MLflow `models:/` / `runs:/` URI). Models load lazily,
    on the first embedding. With `expect_id`, a package whose id differs is refused: the replicas of one
    service must embed, threshold and search with the same package."""
    folder = _fetch(str(path_or_uri), storage, tracking_uri)
    spec_path = folder / PACKAGE_JSON
    if not spec_path.is_file():
        raise PackageError(f"{path_or_uri}: no {PACKAGE_JSON}; make a package with `mfr export`")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{spec_path}: format {spec.get('format')!r} is not {PACKAGE_FORMAT!r}")
    if expect_id is not None:
        actual = _package_id(folder, spec.get("preprocessing", {}))
        if actual != spec.get("package_id") or actual != expect_id:
            raise PackageError(f"{path_or_uri} holds package {actual} (its package.json says "
                               f"{spec.get('package_id')}), not {expect_id} that this service was started with: "
                               "redeploy the service to change its model")
    return ModelPackage(folder, spec, num_threads)


# -- export ----------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: str
    operating_points: list[OperatingPoint]
    run_id: str | None = None
    model_version: str | None = None
    kinds: dict = field(default_factory=dict)  # package.json's calibration.kinds


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


def _evaluation_scores(eval_run: str, tracking_uri: str) -> _Calibration:
    """The evaluation's pair scores, recomputed exactly as it did from its logged embeddings and config,
    and its scores per kind of comparison where it logged them."""
    from mlflow import MlflowClient

    from mfr_ray.evaluation.comparison_kinds import PAIR_SCORES_FILE, KindScores, plain_protocol
    from mfr_ray.evaluation.embed import EmbeddingSet
    from mfr_ray.evaluation.runner import load_pairs
    from mfr_ray.evaluation.verification import cosine_scores

    run = MlflowClient(tracking_uri=tracking_uri).get_run(eval_run)
    if run.data.tags.get("mfr.stage") != "evaluate":
        raise PackageError(f"run {eval_run} is not an evaluation run (tag mfr.stage={run.data.tags.get('mfr.stage')!r})")
    cfg = evaluation_config_from_params(run.data.params)
    protocol = plain_protocol(cfg.protocols)
    if protocol is None:
        raise PackageError(f"evaluation {eval_run}: every protocol subtracts a training-fold mean, which a "
                           "service cannot reproduce per pair; evaluate with a plain protocol (feature sum/single)")
    with tempfile.TemporaryDirectory(prefix="mfr-eval-") as folder:
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
    scores = cosine_scores(features[[index[k] for k in pairs.left]], features[[index[k] for k in pairs.right]])
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
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mfr_ray.config.loader import redact_uri
    from mfr_ray.models.spec import ModelSpec
    from mfr_ray.storage import is_s3

    def from_model_files(uri: str, label: str) -> _Source:
        with tempfile.TemporaryDirectory(prefix="mfr-model-") as folder:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri,
                                                             dst_path=folder))
            spec = json.loads((local / MODEL_SPEC_FILE).read_text())
            return _Source(load_model_files(local), spec["backbone"], spec.get("kwargs", {}), label)

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
                           f"in {redact_uri(tracking_uri)}") from None
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


def _package_id(folder: Path, preprocessing: dict) -> str:
    """Weights, their ONNX export (when the backbone exports), the mask-presence classifier (it picks
    thresholds) and preprocessing."""
    from mfr_ray.masking.presence import PRESENCE_FILE

    digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes())
    for extra in (PACKAGE_ONNX, PRESENCE_FILE.name):
        if (folder / extra).is_file():
            digest.update((folder / extra).read_bytes())
    digest.update(json.dumps(preprocessing, sort_keys=True).encode())
    return digest.hexdigest()[:16]


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
    from mfr_ray.faces.config import AlignConfig
    from mfr_ray.faces.geometry import CROP_TEMPLATES
    from mfr_ray.runtime import DEFAULT_RUNTIME
    from mfr_ray.tracking import resolve_tracking_uri

    tracking = tracking or TrackingConfig()
    tracking_uri = resolve_tracking_uri(tracking)
    found = _source_model(str(source), backbone, dict(backbone_kwargs or {}), tracking_uri)
    model, backbone, kwargs, label = found.model, found.backbone, found.kwargs, found.label
    eval_run = eval_run or found.eval_run
    calibration = _evaluation_scores(eval_run, tracking_uri) if eval_run else None
    if calibration is not None:
        evaluated = calibration.config.model.load()
        if not _same_weights(model, evaluated):
            raise PackageError(f"evaluation {eval_run} evaluated {calibration.config.model.display_name()}, not "
                               f"{label}: its thresholds would not hold for these weights")
        source_cfg = calibration.config.sources[calibration.variant]
        align = source_cfg.align.model_dump(mode="json")
        flip, feature, bf16 = calibration.config.flip, calibration.protocol.feature, calibration.config.compute.bf16
        if source_cfg.type != "folder" or source_cfg.align.skip_detection:
            raise PackageError(f"evaluation {eval_run} read prepared or pre-aligned crops ({source_cfg.uri}); "
                               "export from an evaluation that detects and aligns faces in an image folder: its "
                               "alignment is what a service applies to a camera image")
    else:
        align, flip, feature, bf16 = AlignConfig().model_dump(mode="json"), True, "sum", False
    out = Path(out).expanduser()
    save_model_files(model, backbone, kwargs, out)
    _copy_presence(out)
    runtime = _export_runtime(model, out, runtime or DEFAULT_RUNTIME)
    preprocessing = {
        "align": align,
        "crop": align["crop"],
        "crop_size_hw": list(CROP_TEMPLATES[align["crop"]][0]),
        "input_size_hw": list(model.input_size),
        "normalisation": {"pixel_mean": PIXEL_MEAN, "pixel_scale": PIXEL_SCALE, "channels": "RGB",
                          "formula": "(x - pixel_mean) / pixel_scale"},
        "flip": flip,
        "feature": feature,
        "bf16": bf16,
        "no_face": "a face no detector finds is refused (no_face); the centre-box fallback is never used",
    }
    points: list[OperatingPoint] = []
    spec: dict[str, Any] = {
        "format": PACKAGE_FORMAT,
        "model": label,
        "backbone": backbone,
        "kwargs": kwargs,
        "embedding_size": int(model.embedding_size) * (2 if feature == "concat" else 1),
        "preprocessing": preprocessing,
        "runtime": runtime,
        "package_id": _package_id(out, preprocessing),
    }
    if calibration is not None:
        points, spec["calibration"] = calibration_spec(calibration, fars)
    (out / PACKAGE_JSON).write_text(json.dumps(spec, indent=2, sort_keys=True))
    (out / MODEL_CARD).write_text(model_card(spec))
    result = ExportResult(str(out), points, kinds=spec.get("calibration", {}).get("kinds", {}))
    if tracking.enabled:
        result.run_id, result.model_version = _log_package(out, spec, tracking, register_name)
    return result


def _log_package(out: Path, spec: dict, tracking: TrackingConfig, register_name: str | None):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

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
            client = MlflowClient()
            try:
                client.create_registered_model(register_name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = str(client.create_model_version(
                register_name, source=mlflow.get_artifact_uri("package"), run_id=run.info.run_id,
                tags={"mfr.format": PACKAGE_FORMAT, "mfr.backbone": spec["backbone"]},
            ).version)
        return run.info.run_id, version


def _kinds_card(kinds: dict) -> list[str]:
    """The model card's thresholds per kind of comparison, each with the set it was measured on."""
    if len(kinds) <= 1:
        return ["", ("Only bare pairs were calibrated: a masked face is judged by the strictest threshold above "
                     "and answers say `kind_calibrated: false`. Export from an evaluation with masked variants "
                     "aligned as deployed to calibrate masked-unmasked and masked-masked comparisons.")]
    lines = ["", "### Per kind of comparison", "",
             ("The service judges each face masked or bare (the packaged mask-presence classifier: masked at "
              "p >= 0.7, bare at p <= 0.3, else unsure) and uses the threshold of the comparison's kind; "
              "unsure, the stricter of the kinds it could be."), "",
             "| kind | FAR target | threshold | FAR measured | TPR measured | impostor pairs | resolvable | set |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, entry in kinds.items():
        for p in entry["operating_points"]:
            lines.append(f"| {kind} | {p['far_target']:g} | {p['threshold']:.4f} | {p['far']:.5f} | {p['tpr']:.4f} "
                         f"| {p['n_impostor']} | {'yes' if p['resolvable'] else '**no**'} | {p['calibration_set']} |")
    return lines


def model_card(spec: dict) -> str:
    """The package's MODEL_CARD.md: what it is, how it sees a face, where its thresholds hold."""
    pre = spec["preprocessing"]
    lines = [f"# Model card: {spec['model']}", "",
             f"- backbone: `{spec['backbone']}` {json.dumps(spec['kwargs'])}; embedding size {spec['embedding_size']}",
             f"- package id: `{spec['package_id']}` (weights, their ONNX export + preprocessing)",
             (f"- inference runtime: `{spec.get('runtime', 'default')}` (`mfr serve|enrol|verify|identify "
              "--runtime` choose another)"),
             (f"- preprocessing: alignment `{pre['align']['crop']}` crop (MTCNN 5 points, fallbacks "
             f"{[f for f in pre['align']['fallbacks'] if f != CENTRE_FALLBACK] or 'none'}, landmark fit "
             f"`{pre['align']['landmark_fit']}`), pixels (x - {PIXEL_MEAN}) / {PIXEL_SCALE}, RGB; flip "
             f"{'on' if pre['flip'] else 'off'}, feature `{pre['feature']}`"),
             f"- no face: {pre['no_face']}", ""]
    calibration = spec.get("calibration")
    if not calibration:
        lines += ["## Thresholds", "", "None: exported without an evaluation run (`mfr export ... --eval-run RUN`)."]
        return "\n".join(lines) + "\n"
    lines += ["## Thresholds", "",
              (f"Calibrated on evaluation run `{calibration['eval_run']}` ({calibration['evaluation']}): "
              f"`{calibration['pairs_file']}`, variant `{calibration['variant']}`, protocol "
              f"`{calibration['protocol']}`, {calibration['n_pairs']} pairs. {calibration['score']}."), "",
              "| FAR target | threshold | FAR measured | TPR measured | false accepts | impostor pairs | resolvable |",
              "|---|---|---|---|---|---|---|"]
    for p in calibration["operating_points"]:
        lines.append(f"| {p['far_target']:g} | {p['threshold']:.4f} | {p['far']:.5f} | {p['tpr']:.4f} | "
                     f"{p['false_accepts']} | {p['n_impostor']} | {'yes' if p['resolvable'] else '**no**'} |")
    lines += _kinds_card(calibration.get("kinds", {}))
    lines += ["", ("Thresholds and rates are measured on the same pairs (in-sample); the evaluation report has "
              "the held-out k-fold figures. A FAR marked **no** is below 1 / impostor pairs: the set cannot "
              "show that FAR, only that no impostor got through; calibrate on a larger set before relying on it."),
              "", "## Intended use", "",
              ("1:1 verification and open-set 1:N identification of cooperative, frontal faces, masked or not, "
              "at the FARs above. Not for surveillance of people who have not enrolled. Check the evaluation's "
              "mask-pair table for the masks your users wear.")]
    return "\n".join(lines) + "\n"
