"""A model package (`mfr export RUN_OR_CHECKPOINT OUT`): what a deployed recogniser needs and nothing to
unpickle.

The folder is a model-files folder (`mfr_model.json` + `weights.pt`, a plain state dict read with
weights_only=True, so `models:/` of a registered package also evaluates), `model.onnx` (the same network
exported once, run by the package's inference runtime, `mfr_ray.runtime`) plus `package.json` - the exact
preprocessing of the evaluation (alignment config, crop, normalisation, flip and feature policy) and the
thresholds calibrated at fixed false accept rates on that evaluation's pairs - and `MODEL_CARD.md`.

`load_package(...).embed_images` is the evaluation's path for an image (decode_image -> FaceAligner ->
BatchEmbedder -> feature -> L2 norm), except that a centre box is never guessed: where the evaluation would
have fallen back to one, the service answers `no_face`. Making one is `serve.export` (thresholds from
`serve.calibration`, the card from `serve.card`); this module loads and runs one.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mfr_ray.config.common import StorageConfig, TrackingConfig
from mfr_ray.imageio import Status
from mfr_ray.models.backbone_config import Normalisation
from mfr_ray.models.store import WEIGHTS_FILE, is_registry_uri

PACKAGE_FORMAT = "mfr-ray/model-package/1"
PACKAGE_JSON = "package.json"
PACKAGE_ONNX = "model.onnx"
MODEL_CARD = "MODEL_CARD.md"
DEFAULT_FARS = (1e-2, 1e-3, 1e-4)
CENTRE_FALLBACK = "center"


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
            from mfr_ray.evaluation.embed import BatchEmbedder
            from mfr_ray.faces.aligner import FaceAligner
            from mfr_ray.faces.config import AlignConfig

            self._aligner = FaceAligner(AlignConfig.model_validate(self.serving_align()))
            self._embedder = BatchEmbedder(self.model_spec(), flip=self.preprocessing["flip"],
                                      num_threads=self.num_threads, bf16=self.preprocessing["bf16"],
                                      runtime=self.runtime, onnx_file=self.onnx_file(),
                                      normalisation=Normalisation.from_package(self.preprocessing))
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
    from mfr_ray.config.secrets import redact

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
        raise PackageError(f"{uri}: cannot resolve the alias: {redact(str(exc))[:300]}") from None
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
        actual = package_id_of(folder, spec.get("preprocessing", {}))
        if actual != spec.get("package_id") or actual != expect_id:
            raise PackageError(f"{path_or_uri} holds package {actual} (its package.json says "
                               f"{spec.get('package_id')}), not {expect_id} that this service was started with: "
                               "redeploy the service to change its model")
    return ModelPackage(folder, spec, num_threads)


def package_id_of(folder: Path, preprocessing: dict) -> str:
    """Weights, their ONNX export (when the backbone exports), the mask-presence classifier (it picks
    thresholds) and preprocessing."""
    from mfr_ray.masking.presence import PRESENCE_FILE

    digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes())
    for extra in (PACKAGE_ONNX, PRESENCE_FILE.name):
        if (folder / extra).is_file():
            digest.update((folder / extra).read_bytes())
    digest.update(json.dumps(preprocessing, sort_keys=True).encode())
    return digest.hexdigest()[:16]
