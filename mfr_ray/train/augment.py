"""Occluders that are not masks: a share of each batch's masked crops is replaced by the unmasked crop with
a random lower-face occluder painted over it - a shape, fill and edge that our mask engine never draws
(solid or mottled colour, a patch of another photo, stripes; a jittered, curved outline; a soft or hard
edge). The network is pulled toward ignoring whatever covers the mouth and nose, not toward recognising our
renderer's masks, which is what a mask nobody here drew asks of it.

Geometry is set in the aligned crop's own template (eyes, nose tip and mouth corners of
`mfr_ray.faces.geometry.CROP_TEMPLATES`), so the same settings fit every crop layout. Runs in the training
worker on decoded uint8 crops, about 1 ms per occluded crop."""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import Field, model_validator

from mfr_ray.config.base import StrictModel

FILLS = ("solid", "mottled", "photo", "stripes")


class OccluderConfig(StrictModel):
    """Random lower-face occluders in place of the engine's masks (`prob` of the pairs, 0: off)."""

    prob: float = Field(0.0, ge=0, le=1, description="share of pairs whose masked crop becomes an occluded unmasked crop")
    top: tuple[float, float] = Field(
        (0.35, 0.75),
        description="range of the occluder's top edge at the face's centre line, as a fraction of the eye line "
        "-> mouth line distance (0.5 is about the nose tip)",
    )
    chin: tuple[float, float] = Field(
        (0.45, 1.1), description="range of its lower edge below the mouth line, in the same unit"
    )
    width: tuple[float, float] = Field(
        (1.9, 2.6), description="range of its width in eye distances, centred between the eyes"
    )
    rotation_deg: float = Field(10.0, ge=0, description="largest in-plane rotation of the occluder")
    shift: float = Field(0.08, ge=0, description="largest shift, as a fraction of the eye distance")
    edge_blur: tuple[float, float] = Field((0.0, 1.5), description="range of the edge's Gaussian sigma in pixels")
    fills: list[str] = Field(default_factory=lambda: list(FILLS), description=f"fills drawn from: {', '.join(FILLS)}")

    @model_validator(mode="after")
    def _known_fills(self) -> OccluderConfig:
        unknown = sorted(set(self.fills) - set(FILLS))
        if unknown or not self.fills:
            raise ValueError(f"occluder fills {unknown or '[]'} not known; choose from {list(FILLS)}")
        for name in ("top", "chin", "width", "edge_blur"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"occluder {name} range {low, high} runs backwards")
        return self


def _template(size: tuple[int, int]) -> np.ndarray:
    from mfr_ray.faces.geometry import CROP_TEMPLATES

    for hw, points in CROP_TEMPLATES.values():
        if tuple(hw) == tuple(size):
            return points
    raise ValueError(f"no crop template of size {size}: occluders need one of {[hw for hw, _ in CROP_TEMPLATES.values()]}")


def occluder_alpha(size: tuple[int, int], cfg: OccluderConfig, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 coverage in [0, 1] of one random occluder: a band from a curved top edge (highest at the
    nose) down to a rounded lower edge, rotated and shifted a little, with a soft or hard edge."""
    height, width = size
    points = _template(size)
    eye_centre = points[:2].mean(axis=0)
    mouth_centre = points[3:].mean(axis=0)
    eye_distance = float(np.linalg.norm(points[1] - points[0]))
    face_height = float(mouth_centre[1] - eye_centre[1])
    half_width = rng.uniform(*cfg.width) * eye_distance / 2
    top = eye_centre[1] + rng.uniform(*cfg.top) * face_height
    bottom = mouth_centre[1] + rng.uniform(*cfg.chin) * face_height
    arch = rng.uniform(0.0, 0.45) * face_height  # how far the top edge drops from the nose to the cheeks
    belly = rng.uniform(0.1, 0.5) * face_height  # how far the lower edge rises toward the jaw corners
    u = np.linspace(-1.0, 1.0, 33)
    xs = eye_centre[0] + u * half_width
    upper = np.stack([xs, top + arch * u**2], axis=1)
    lower = np.stack([xs[::-1], bottom - belly * u[::-1] ** 2], axis=1)
    outline = np.concatenate([upper, lower])
    angle = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = rng.uniform(-cfg.shift, cfg.shift, size=2) * eye_distance
    outline = (outline - eye_centre) @ rotation.T + eye_centre + shift
    scale = 4  # drawn on a finer grid, then area-averaged: anti-aliased edges
    canvas = np.zeros((height * scale, width * scale), np.uint8)
    cv2.fillPoly(canvas, [np.round(outline * scale).astype(np.int32)], 255, lineType=cv2.LINE_8)
    alpha = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    sigma = rng.uniform(*cfg.edge_blur)
    if sigma > 0.05:
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
    return alpha


def occluder_fill(
    size: tuple[int, int], fill: str, rng: np.random.Generator, photo: np.ndarray | None = None
) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 255] that the occluder shows."""
    height, width = size
    colour = rng.uniform(0, 255, size=3).astype(np.float32)
    if fill == "photo" and photo is not None:
        zoom = rng.uniform(1.0, 2.5)
        patch_h, patch_w = max(2, int(height / zoom)), max(2, int(width / zoom))
        y, x = rng.integers(0, height - patch_h + 1), rng.integers(0, width - patch_w + 1)
        patch = photo[y : y + patch_h, x : x + patch_w]
        if rng.random() < 0.5:
            patch = patch[::-1]
        return cv2.resize(np.ascontiguousarray(patch), (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    if fill == "stripes":
        other = rng.uniform(0, 255, size=3).astype(np.float32)
        period = rng.uniform(3.0, 14.0)
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        mix = (np.sin(2 * np.pi * phase) > 0).astype(np.float32)[..., None]
        return colour * mix + other * (1 - mix)
    out = np.broadcast_to(colour, (height, width, 3)).astype(np.float32)
    if fill == "mottled":
        grid = rng.normal(0.0, rng.uniform(8, 40), size=(rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.float32)
        out = out + cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return out


def shade(fill: np.ndarray, face: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The fill lit like the face under it: scaled by the covered face's own brightness, relative to its
    mean, at a random strength (0: flat)."""
    luma = face.astype(np.float32).mean(axis=2)
    covered = alpha > 0.5
    mean = float(luma[covered].mean()) if covered.any() else float(luma.mean())
    light = cv2.GaussianBlur(luma, (0, 0), 4.0) / max(mean, 1.0)
    strength = rng.uniform(0.0, 1.0)
    return fill * (1.0 + strength * (light[..., None] - 1.0))


def occlude(images: np.ndarray, cfg: OccluderConfig, rng: np.random.Generator) -> np.ndarray:
    """A copy of `images` ((n, H, W, 3) uint8 aligned crops), each under its own random occluder. A
    "photo" fill takes a patch of another image of the batch (the image itself when it is alone)."""
    n, height, width = images.shape[:3]
    out = np.empty_like(images)
    for i in range(n):
        fill_name = cfg.fills[rng.integers(len(cfg.fills))]
        photo = images[(i + 1 + rng.integers(max(n - 1, 1))) % n] if n > 1 else images[i]
        alpha = occluder_alpha((height, width), cfg, rng)
        fill = shade(occluder_fill((height, width), fill_name, rng, photo), images[i], alpha, rng)
        blended = images[i].astype(np.float32) * (1 - alpha[..., None]) + fill * alpha[..., None]
        out[i] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out


def apply_occluders(
    unmasked: np.ndarray, masked: np.ndarray | None, cfg: OccluderConfig, rng: np.random.Generator
) -> tuple[np.ndarray | None, int]:
    """The batch's masked crops with `cfg.prob` of them replaced by an occluded copy of their unmasked crop,
    and how many were replaced. Unmasked-only batches (no masked crops) are left as they are."""
    if masked is None or cfg.prob <= 0 or not len(unmasked):
        return masked, 0
    chosen = np.flatnonzero(rng.random(len(unmasked)) < cfg.prob)
    if not len(chosen):
        return masked, 0
    masked = masked.copy()
    masked[chosen] = occlude(unmasked[chosen], cfg, rng)
    return masked, len(chosen)
