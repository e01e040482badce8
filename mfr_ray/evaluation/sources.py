"""Aligned face crops for evaluation, per image key, from either source:

- `folder`: a raw image tree (e.g. deep-funneled LFW) read, optionally masked on the fly with the masking
  engine (on the full image, before alignment), and aligned with `FaceAligner`: prepare's
  `read_decode_align` path, so an image gets the same status and reason as in a prepared dataset;
- `parquet`: a dataset prepared by `mfr prepare` (aligned crops as encoded bytes), filtered by variant.

Crops are cached on local disk keyed by everything that changes them, so reruns skip detection.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfr_ray.config.common import StorageConfig
from mfr_ray.data.process import StageTimer
from mfr_ray.evaluation.config import ImageSourceConfig
from mfr_ray.evaluation.timing import EvaluationTimer, per_row_seconds
from mfr_ray.faces.geometry import CROP_TEMPLATES
from mfr_ray.faces.reading import ReadResult, read_decode_align
from mfr_ray.imageio import UNMASKED, USABLE_STATUSES, Status, decode_image

# AlignConfig fields that cannot change an evaluation crop: speed settings and how prepare cuts masked
# training twins (evaluation always aligns the image it is given).
EVAL_IRRELEVANT_ALIGN = {
    "num_threads", "batch_size", "masked_twin", "jitter_shift", "jitter_shift_y_mean", "jitter_scale",
    "jitter_scale_mean", "jitter_rotation_deg",
}


@dataclass
class CropSet:
    """Crops in the order of `keys`; an image that could not be read or aligned keeps a black crop and its
    status/reason, so it is counted in the report rather than dropped. A centre-box guess (no face found)
    is a real crop with status `ok_fallback`: the pair protocol needs every image."""

    keys: list[str]
    crops: np.ndarray  # (n, H, W, 3) uint8
    method: np.ndarray  # str (n,)
    status: np.ndarray  # str (n,)
    reason: np.ndarray  # str (n,)

    def index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(self.keys), crops=self.crops, method=self.method.astype(str),
                 status=self.status.astype(str), reason=self.reason.astype(str))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> CropSet:
        with np.load(path) as data:
            return cls(list(data["keys"]), data["crops"], data["method"], data["status"], data["reason"])


def source_fingerprint(source: ImageSourceConfig, keys: list[str]) -> str:
    """Hash of the source config (less the settings that cannot change a crop) and the key list: the
    cache key of its crops and embeddings."""
    config = source.model_dump(mode="json", exclude={"align": EVAL_IRRELEVANT_ALIGN})
    payload = json.dumps([config, keys], sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


CROPPER_PARTS = ("read", "decode", "mask", "align")  # what a cropper reports (mfr_ray.evaluation.timing)


class FolderCropper:
    """Read -> (mask) -> align a batch of keys; holds the aligner and mask engine (one per Ray actor)."""

    def __init__(self, source: ImageSourceConfig, storage: StorageConfig | None = None):
        from mfr_ray.faces.aligner import FaceAligner

        started = time.perf_counter()
        self.source = source
        self.storage = storage
        self.aligner = FaceAligner(source.align)
        self.masker = None
        if source.variant != UNMASKED:
            from mfr_ray.masking import MaskEngine, MaskingConfig

            self.masker = MaskEngine(MaskingConfig(mask_type=source.variant, seed=source.mask_seed))
        self.load_seconds = time.perf_counter() - started  # reported once, with the first batch

    def _read(self, key: str) -> ReadResult:
        from mfr_ray.storage import StorageError, join_uri, read_bytes

        try:
            return read_bytes(join_uri(self.source.uri, key), self.storage), "", ""
        except StorageError as exc:
            return None, Status.DECODE_ERROR, str(exc)

    def _mask_frame(self, image: np.ndarray, key: str) -> tuple[np.ndarray, str]:
        """The full frame with this variant's mask, or the frame as it was and why no mask was put on."""
        masked = self.masker.mask(image, key, aligned=True)
        frame = image if masked.image is None else masked.image
        if masked.image is None or masked.record.status != Status.OK:
            return frame, f"mask not applied: {masked.record.reason}".strip()
        return frame, ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        height, width = CROP_TEMPLATES[self.source.align.crop][0]
        crops = np.zeros((len(keys), height, width, 3), dtype=np.uint8)
        mask = self._mask_frame if self.masker is not None else None
        timer = StageTimer()
        found = read_decode_align(keys, self._read, self.aligner, mask, timer)
        for i, crop in enumerate(found):
            if crop.aligned is not None:
                crops[i] = crop.aligned.crop
        columns = ("method", "status", "reason")
        parts = {part: timer.seconds[part] for part in CROPPER_PARTS}
        parts["load_cropper"], self.load_seconds = self.load_seconds, 0.0
        return {"key": np.array(keys), "crop": crops, **per_row_seconds(parts, len(keys)),
                **{name: np.array([str(getattr(c, name)) for c in found]) for name in columns}}


def _crops_from_folder(source, keys, storage, num_actors: int, batch_size: int, progress=None,
                       timer: EvaluationTimer | None = None) -> CropSet:
    """Align in-process for small sets, else on a pool of Ray actors (one aligner each); `progress(n)` is
    called with the size of every finished batch, `timer` sums the croppers' seconds per part."""
    from mfr_ray.pools import run_batches

    progress = progress or (lambda n: None)
    timer = timer or EvaluationTimer()
    height, width = CROP_TEMPLATES[source.align.crop][0]

    def crashed(item: dict, reason: str) -> dict[str, np.ndarray]:
        return {"key": np.array([item["key"]]), "crop": np.zeros((1, height, width, 3), dtype=np.uint8),
                "method": np.array(["none"]), "status": np.array([Status.CRASHED]), "reason": np.array([reason])}

    parts = []
    for part in run_batches([{"key": k} for k in keys], FolderCropper, key="key", batch_size=batch_size,
                            constructor_kwargs={"source": source, "storage": storage}, num_actors=num_actors,
                            on_crash=crashed):
        parts.append(timer.take(part))
        progress(len(part["key"]))
    merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = {k: i for i, k in enumerate(merged["key"].tolist())}
    idx = np.array([order[k] for k in keys])
    return CropSet(keys, merged["crop"][idx], merged["method"][idx], merged["status"][idx], merged["reason"][idx])


def _crops_from_parquet(source: ImageSourceConfig, keys: list[str], storage, size_hw) -> CropSet:
    """Read the prepared dataset's rows of this variant; resize crops whose size differs from `size_hw`."""
    import cv2

    from mfr_ray.data.reader import read_variant_table

    table = read_variant_table(
        source.uri, source.variant, storage, columns=["source_key", "image", "status", "reason", "align_method"]
    )
    rows = {k: i for i, k in enumerate(table.column("source_key").to_pylist())}
    height, width = size_hw
    n = len(keys)
    crops = np.zeros((n, height, width, 3), dtype=np.uint8)
    method, status, reason = np.full(n, "", dtype=object), np.full(n, "ok", dtype=object), np.full(n, "", dtype=object)
    images, statuses = table.column("image"), table.column("status")
    for i, key in enumerate(keys):
        row = rows.get(key)
        if row is None:
            status[i], reason[i] = Status.NO_FACE, f"not in the prepared dataset (variant {source.variant})"
            continue
        method[i] = table.column("align_method")[row].as_py() or ""
        status[i], reason[i] = statuses[row].as_py(), table.column("reason")[row].as_py() or ""
        if status[i] not in USABLE_STATUSES or images[row].as_py() is None:
            continue
        decoded = decode_image(images[row].as_py())
        if not decoded.ok:
            status[i], reason[i] = decoded.status, decoded.reason
            continue
        crop = decoded.image
        if crop.shape[:2] != (height, width):
            crop = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)
        crops[i] = crop
    return CropSet(list(keys), crops, method.astype(str), status.astype(str), reason.astype(str))


def load_crops(
    source: ImageSourceConfig,
    keys: list[str],
    cache_dir: str | Path | None = None,
    storage: StorageConfig | None = None,
    num_actors: int = 1,
    batch_size: int = 64,
    progress=None,
    timer: EvaluationTimer | None = None,
) -> CropSet:
    """Crops for `keys` from `source`, read from / written to `cache_dir` when given; `progress(n)` counts
    aligned images as they finish, `timer` sums the seconds of each part (a Parquet source: `read`)."""
    cache = Path(cache_dir) / f"crops-{source_fingerprint(source, keys)}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        return CropSet.load(cache)
    timer = timer or EvaluationTimer()
    if source.type == "folder":
        crops = _crops_from_folder(source, keys, storage, num_actors, batch_size, progress, timer)
    else:
        start = time.perf_counter()
        crops = _crops_from_parquet(source, keys, storage, CROP_TEMPLATES[source.align.crop][0])
        timer.add_part("read", time.perf_counter() - start)
    if cache is not None:
        crops.save(cache)
    return crops
