"""Drawing a chosen mask on located faces: the template warped onto six key points and blended like a
real mask (fabric colour or print, ear loops, feathered edges, the face's own light, grain, a contact
shadow), or a flat landmark polygon for polygon-drawn types."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import cache

import cv2
import numpy as np

from mfr_ray.masking.config import MaskingConfig
from mfr_ray.masking.layers import TemplateLayers, builtin_spec
from mfr_ray.masking.patterns import hex_to_rgb
from mfr_ray.masking.sampling import MaskChoice

LUMA = np.array([0.299, 0.587, 0.114], np.float32)
ANCHORED = [0, 5]  # nose bridge and chin: the points whose misplacement shows most (eyes, chin)
# The polygon type's outline: landmarks 3-15 (the jaw) and 29 (the nose bridge), counted from 1 as in
# MaskTheFace's landmark figures
POLYGON_LANDMARKS = [*range(2, 15), 28]
POLYGON_MARGIN = 0.04  # jaw points pushed out by this share of the face height, so the chin is inside
STRAP_WIDTH = 0.016  # ear loop thickness, share of the cheek-to-cheek width
SHADOW_SIGMA, SHADOW_DEPTH = 0.03, 0.3  # the mask's contact shadow on the skin around it
DRAWN_LOOK_WEIGHT = 0.85  # real printed cloth: the print covers the fabric almost fully
GRAIN_TILE = 256
LIGHT_CELLS = 6  # the face's light under the mask is low-passed to about this many cells across


def polygon_outline(landmarks: np.ndarray) -> np.ndarray:
    """The polygon type's outline, its jaw points moved slightly outwards (away from the nose tip) so the
    mask covers the jaw line instead of ending exactly on it."""
    points = landmarks[POLYGON_LANDMARKS].astype(np.float32).copy()
    centre = landmarks[30]
    outward = points[:-1] - centre
    lengths = np.maximum(np.linalg.norm(outward, axis=1, keepdims=True), 1e-6)
    margin = POLYGON_MARGIN * float(np.linalg.norm(landmarks[8] - landmarks[27]))
    points[:-1] += outward / lengths * margin
    return points


@cache
def grain_tile() -> np.ndarray:
    """Fine fabric grain: a fixed, seamless 256 px tile of blurred unit noise, shared by every mask (each
    mask reads it at its own offset), so no noise is generated per image."""
    noise = np.random.default_rng(7).standard_normal((GRAIN_TILE, GRAIN_TILE)).astype(np.float32)
    pad = 4  # blur a wrapped copy and keep the centre, so the tile repeats without seams
    grain = cv2.GaussianBlur(np.pad(noise, pad, mode="wrap"), (0, 0), 0.7)[pad:-pad, pad:-pad]
    return grain / grain.std()


def grain_patch(shape: tuple[int, int], key: str) -> np.ndarray:
    """An HxW window of the grain tile at an offset drawn from `key`."""
    h, w = shape
    offset = zlib.crc32(key.encode())
    oy, ox = offset % GRAIN_TILE, (offset >> 8) % GRAIN_TILE
    if oy + h <= 2 * GRAIN_TILE and ox + w <= 2 * GRAIN_TILE:  # every window of a face-sized mask
        return grain_tiles()[oy : oy + h, ox : ox + w]
    reps = (-(-(oy + h) // GRAIN_TILE), -(-(ox + w) // GRAIN_TILE))
    return np.tile(grain_tile(), reps)[oy : oy + h, ox : ox + w]


@cache
def grain_tiles() -> np.ndarray:
    """The grain tile repeated 2x2, so a window up to a tile in size is a view, never a new np.tile."""
    return np.tile(grain_tile(), (2, 2))


def _roi(points: np.ndarray, w: int, h: int) -> tuple[int, int, int, int] | None:
    if not np.isfinite(points).all():
        return None
    x0, y0 = np.floor(points.min(axis=0)).astype(int)
    x1, y1 = np.ceil(points.max(axis=0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _placement(layers: TemplateLayers, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(homography, outline in the image) of the template on the six key points; None when degenerate."""
    anchors = [*range(6), *ANCHORED]  # least squares, with the bridge and chin counted twice
    homography, _ = cv2.findHomography(layers.keypoints[anchors], keypoints[anchors], 0)
    if homography is None or abs(np.linalg.det(homography[:2, :2])) < 1e-9:
        return None
    polygon = cv2.perspectiveTransform(layers.outline[None], homography)[0]
    face_size = float(np.ptp(keypoints, axis=0).max())
    if not np.isfinite(polygon).all() or float(np.ptp(polygon, axis=0).max()) > 4 * face_size + 4:
        return None
    return homography, polygon


def _feathered(mask_rgb: np.ndarray, a: np.ndarray, feather: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft edges outwards only: the blur never uncovers what the sharp mask covered."""
    if feather <= 0.05:
        return mask_rgb, a
    layer = np.dstack([mask_rgb, a])
    soft = cv2.GaussianBlur(layer, (0, 0), feather)
    layer = np.where(soft[..., 3:4] > a, soft, layer)
    return layer[..., :3], layer[..., 3:4]


class MaskRenderer:
    """Paints masks into an image in place; `tile` gives a pattern's seamless tile (built-in or custom)."""

    def __init__(self, config: MaskingConfig, tile: Callable[[str], np.ndarray]):
        self.config = config
        self._tile = tile

    def paint_template(
        self,
        out: np.ndarray,
        alpha: np.ndarray,
        layers: TemplateLayers,
        choice: MaskChoice,
        keypoints: np.ndarray,
        landmarks: np.ndarray,
        key: str,
    ) -> np.ndarray | None:
        """Warp the template onto the six key points and blend it into `out` (in place) inside its ROI:
        ear loops under it, edges feathered, shaded by the face's own light, fabric grain, and a soft
        contact shadow on the skin around it."""
        placed = _placement(layers, keypoints)
        if placed is None:
            return None
        homography, polygon = placed
        h, w = alpha.shape
        width = float(np.linalg.norm(keypoints[2] - keypoints[1]))  # cheek to cheek, pixels
        feather = choice.style["feather"] * width
        straps = (
            _strap_lines(layers, homography, polygon, landmarks, width)
            if choice.style.get("straps") == "ear_loops"
            else []
        )
        pad = int(np.ceil(3 * max(feather, SHADOW_SIGMA * width))) + 1
        extent = np.concatenate([polygon, *straps]) if straps else polygon
        corners = np.concatenate([extent.min(0, keepdims=True) - pad, extent.max(0, keepdims=True) + pad])
        roi = _roi(corners, w, h)
        if roi is None:
            return None
        x0, y0, x1, y1 = roi
        to_roi = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64) @ homography

        def warp(layer: np.ndarray, border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
            return cv2.warpPerspective(
                layer, to_roi, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0
            )

        base = warp(layers.base)
        a, mask_rgb = base[..., 3:4], self._fabric(base[..., :3], warp, layers, choice)
        if straps:
            mask_rgb, a = _under_straps(mask_rgb, a, straps, (x0, y0), width, _strap_color(choice))
        mask_rgb, a = _feathered(mask_rgb, a, feather)
        self._blend(out, alpha, roi, mask_rgb, a, choice.style, key, width)
        return polygon

    def _fabric(
        self, mask_rgb: np.ndarray, warp: Callable, layers: TemplateLayers, choice: MaskChoice
    ) -> np.ndarray:
        """The warped mask in the chosen colour and print, mixed in by the fabric layer's light."""
        if not (choice.color or choice.pattern):
            return mask_rgb
        fabric = warp(layers.fabric)
        fabric_rgb, light = fabric[..., :3], fabric[..., 3:4]
        cfg = self.config
        wc, wp = (DRAWN_LOOK_WEIGHT,) * 2 if choice.drawn_look else (cfg.color_weight, cfg.pattern_weight)
        if choice.color:
            color = hex_to_rgb(choice.color)
            mask_rgb = mask_rgb - wc * fabric_rgb + (wc * color) * light
            fabric_rgb = (1 - wc) * fabric_rgb + (wc * color) * light
        if choice.pattern:
            tile = warp(self._tile(choice.pattern), cv2.BORDER_WRAP)
            mask_rgb = mask_rgb - wp * fabric_rgb + wp * tile * light
        return mask_rgb

    def _blend(self, out, alpha, roi, mask_rgb, a, style: dict, key: str, width: float) -> None:
        """Composite the premultiplied mask into `out` inside `roi`: lit like the face, grained, with its
        contact shadow on the uncovered skin; `alpha` keeps the coverage."""
        x0, y0, x1, y1 = roi
        face_u8 = out[y0:y1, x0:x1]
        mask_rgb = self._match_light(mask_rgb, a, face_u8)
        shading = _face_light(face_u8, a, style["lighting"]) * 255
        if style["texture"] > 0:
            shading = shading * (1 + style["texture"] * grain_patch(a.shape[:2], f"{self.config.seed}/{key}"))
        uncovered = 1 - a[..., 0]
        shadow = cv2.GaussianBlur(a, (0, 0), SHADOW_SIGMA * width) * uncovered
        keep = uncovered * (1 - SHADOW_DEPTH * shadow)
        blended = face_u8.astype(np.float32) * keep[..., None] + mask_rgb * shading[..., None]
        out[y0:y1, x0:x1] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        np.maximum(alpha[y0:y1, x0:x1], (a[..., 0] * 255 + 0.5).astype(np.uint8), out=alpha[y0:y1, x0:x1])

    def _match_light(self, premult: np.ndarray, a: np.ndarray, face: np.ndarray) -> np.ndarray:
        """Scale the mask's brightness and saturation by the face's (HSV value and saturation of the
        pixels under the mask) relative to a normally lit, normally saturated face, so masks are dim on
        dark photos and grey on grey ones."""
        cfg = self.config
        under = (a[..., 0] > 0.5).astype(np.uint8)
        if not (cfg.match_brightness or cfg.match_saturation) or cv2.countNonZero(under) < 4:
            return premult
        _, sat, value, _ = cv2.mean(cv2.cvtColor(face, cv2.COLOR_RGB2HSV), mask=under)
        if cfg.match_brightness:
            premult = premult * float(np.clip(value / 255 / cfg.brightness_reference, 0.35, 1.3))
        if cfg.match_saturation:
            grey = cv2.transform(premult, LUMA[None, :])[..., None]
            premult = grey + (premult - grey) * float(np.clip(sat / 255 / cfg.saturation_reference, 0.0, 1.2))
        return premult


def _strap_lines(
    layers: TemplateLayers, homography: np.ndarray, outline: np.ndarray, landmarks: np.ndarray, width: float
) -> list[np.ndarray]:
    """Ear loops as polylines (image pixels): from the mask's side anchors to the ear, just outside the
    top of the jaw line (landmarks 0 and 16), sagging slightly. A loop whose ear end lies under the mask (the
    far side of a turned face) is hidden and left out."""
    if not len(layers.straps):
        return []
    ends = cv2.perspectiveTransform(layers.straps[None].astype(np.float64), homography)[0]
    centre = landmarks[27:31].mean(axis=0)
    ears = []
    for top, lower in ((0, 2), (16, 14)):
        outward = landmarks[top] - centre
        outward = outward / max(float(np.linalg.norm(outward)), 1e-6)
        up = landmarks[top] - landmarks[lower]
        ears += [
            landmarks[top] + 0.05 * up + outward * 0.05 * width,
            landmarks[top] - 0.3 * up + outward * 0.06 * width,
        ]
    lines = []
    for start, ear in zip(ends, ears, strict=True):
        if cv2.pointPolygonTest(outline, (float(ear[0]), float(ear[1])), False) >= 0:
            continue
        mid = (start + ear) / 2 + np.array([0.0, 0.025 * width])
        t = np.linspace(0, 1, 9)[:, None]
        lines.append(((1 - t) ** 2 * start + 2 * t * (1 - t) * mid + t**2 * ear).astype(np.float32))
    return lines


def _strap_color(choice: MaskChoice) -> np.ndarray:
    spec = builtin_spec(choice.mask_type)
    color = (spec.strap_color if spec else None) or choice.color or (spec.color if spec else "#f4f4f2")
    return hex_to_rgb(color)


def _under_straps(
    mask_rgb: np.ndarray, a: np.ndarray, lines: list[np.ndarray], origin, width: float, color: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Composite ear loops under the (premultiplied) mask layer."""
    cover = np.zeros(a.shape[:2], np.uint8)
    thickness = max(1, round(STRAP_WIDTH * width))
    fixed = [np.round((line - origin) * 16).astype(np.int32) for line in lines]
    cv2.polylines(cover, fixed, False, 255, thickness, cv2.LINE_AA, shift=4)
    strap = (cover.astype(np.float32) / 255)[..., None] * (1 - a)
    return mask_rgb + strap * (color * 0.85), a + strap


def _face_light(face: np.ndarray, a: np.ndarray, strength: float) -> np.ndarray:
    """The face's own light as a multiplier for the mask: the luminance of the covered skin low-passed
    to a few cells across (light direction and falloff, not features), relative to its mean under the
    mask, raised to `strength`."""
    h, w = a.shape[:2]
    if strength <= 0 or min(h, w) < 4:
        return np.ones((h, w), np.float32)
    grey = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY).astype(np.float32)
    cells = (max(2, round(LIGHT_CELLS * w / max(h, w))), max(2, round(LIGHT_CELLS * h / max(h, w))))
    small = cv2.resize(grey, cells, interpolation=cv2.INTER_AREA)
    low = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    weight = a[..., 0]
    mean = float((low * weight).sum() / max(float(weight.sum()), 1e-6))
    relative = np.clip(low * (1 / max(mean, 1.0)), 0.3, 1.7)
    return relative if strength == 1 else cv2.exp(cv2.log(relative) * strength)


def paint_polygon(out: np.ndarray, alpha: np.ndarray, points: np.ndarray, color: str) -> np.ndarray | None:
    """The polygon type's mask: the landmark polygon filled with one flat colour (anti-aliased)."""
    h, w = alpha.shape
    roi = _roi(points, w, h)
    if roi is None:
        return None
    x0, y0, x1, y1 = roi
    cover = np.zeros((y1 - y0, x1 - x0), np.uint8)
    fixed = np.round((points - [x0, y0]) * 16).astype(np.int32)
    cv2.fillPoly(cover, [fixed], 255, cv2.LINE_AA, shift=4)
    a = cover.astype(np.float32)[..., None] / 255
    face = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(face * (1 - a) + hex_to_rgb(color) * 255 * a + 0.5, 0, 255).astype(np.uint8)
    np.maximum(alpha[y0:y1, x0:x1], cover, out=alpha[y0:y1, x0:x1])
    return points
