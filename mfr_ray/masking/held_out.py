"""Masks no shipped training config draws, for measuring how a recogniser does on masks it never saw: the
N95 in its held-out styles (chin left out, valve; the project's held-out type, `data.exclude_mask_types:
[N95]`) and the `data.occluders` lower-face shapes mapped onto the full photo. The masked-identification
benchmark's probes and a package's search calibration (`serve.search_calibration`) are masked here, so the
two measure the same thing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

UNMASKED, N95_HELD_OUT, OCCLUDER = "unmasked", "n95_held_out", "occluder"
MASKED_KINDS = (N95_HELD_OUT, OCCLUDER)
MASK_FAILED = "mask_failed"
_TOOLS: dict = {}


def masked_kind(source: str) -> str:
    """Half the masked photos get the held-out N95, half an occluder: a stable choice per file name."""
    return MASKED_KINDS[int(hashlib.sha1(Path(source).name.encode()).hexdigest(), 16) % len(MASKED_KINDS)]


def held_out_masking(seed: int):
    """The N95 with the held-out styles only (chin left out, valve): never drawn in training."""
    from mfr_ray.masking.config import MaskingConfig, MaskStyleConfig

    style = MaskStyleConfig(coverage={"chin_exposed": 1.0}, valve={"valve": 1.0}, print={"camouflage": 1.0})
    return MaskingConfig(mask_type="N95", style=style, seed=seed)


def _tools(seed: int):
    """The mask engine and a face aligner, built once per process (and seed)."""
    if _TOOLS.get("seed") != seed:
        import cv2

        from mfr_ray.faces.aligner import FaceAligner
        from mfr_ray.faces.config import AlignConfig
        from mfr_ray.masking import MaskEngine

        cv2.setNumThreads(1)
        _TOOLS.update(seed=seed, engine=MaskEngine(held_out_masking(seed)),
                      aligner=FaceAligner(AlignConfig(fallbacks=["dlib"], num_threads=1)))
    return _TOOLS["engine"], _TOOLS["aligner"]


def occlude_frame(frame: np.ndarray, matrix: np.ndarray, crop_hw: tuple[int, int], rng: np.random.Generator,
                  cfg=None) -> np.ndarray:
    """A `data.occluders` occluder drawn in the crop template's layout and mapped back onto the full frame
    through the inverse of the frame -> crop similarity (`matrix`, from the face's 5 landmarks)."""
    import cv2

    from mfr_ray.train.augment import OccluderConfig, occluder_alpha, occluder_fill, shade

    cfg = cfg or OccluderConfig(prob=1.0)
    height, width = crop_hw
    crop = cv2.warpAffine(frame, matrix, (width, height), flags=cv2.INTER_LINEAR)
    alpha = occluder_alpha(crop_hw, cfg, rng)
    fill = shade(occluder_fill(crop_hw, cfg.fills[rng.integers(len(cfg.fills))], rng, crop), crop, alpha, rng)
    back = cv2.invertAffineTransform(matrix)
    size = (frame.shape[1], frame.shape[0])
    alpha = cv2.warpAffine(alpha, back, size, flags=cv2.INTER_LINEAR)[..., None]
    fill = cv2.warpAffine(fill.astype(np.float32), back, size, flags=cv2.INTER_LINEAR)
    out = frame.astype(np.float32) * (1 - alpha) + fill * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def mask_photo(source: str, kind: str, out: str, seed: int) -> str:
    """Write the masked copy of `source` to `out` (JPEG q95); returns the kind drawn: the planned one, an
    occluder when no N95 could be fitted (dlib found no face), or MASK_FAILED when neither could."""
    from mfr_ray.faces.geometry import CROP_TEMPLATES
    from mfr_ray.imageio import decode_image, encode_image

    engine, aligner = _tools(seed)
    rgb = decode_image(Path(source).read_bytes()).image
    image = None
    if kind == N95_HELD_OUT:
        result = engine.mask(rgb, Path(source).name)
        image, kind = (result.image, kind) if result.image is not None else (None, OCCLUDER)
    if image is None:
        found = aligner.align(rgb)
        if found.matrix is None:
            return MASK_FAILED
        rng = np.random.default_rng([seed, int(hashlib.sha1(Path(source).name.encode()).hexdigest()[:8], 16)])
        image = occlude_frame(rgb, found.matrix, tuple(CROP_TEMPLATES[aligner.config.crop][0]), rng)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(encode_image(image, "jpg", quality=95))
    return kind
