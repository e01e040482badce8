"""Mask templates drawn by code: RGBA-like layers plus the six labelled key points.

Geometry is laid out in "face units": origin at the nose-bridge key point, x to the image right, unit =
distance between the two cheek key points at nose level (the mean LFW face puts the cheek points at
(+-0.5, 0.06), the lower-lip jaw points at (+-0.39, 0.49), the chin at (0, 0.74) and the lower eyelids at
y = -0.06). A template is kept as separate layers so patterns and colours can be applied without losing
the folds: `albedo` (base colours), `shade` (multiplicative light), `fabric` (where patterns may go),
`alpha`. Side views are the front view foreshortened on the far side and shaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from mfr_ray.masking.patterns import hex_to_rgb
from mfr_ray.registry import MASK_TYPES

SCALE = 200.0  # template pixels per face unit
ORIGIN = (0.64, 0.14)  # face-unit offset of the canvas' top-left corner
CANVAS = (int(1.28 * SCALE), int(1.04 * SCALE))  # width, height
SUPERSAMPLE = 4
SIDE_COMPRESSION = 0.72
KEYPOINT_NAMES = ("nose_bridge", "cheek_left", "cheek_right", "jaw_left", "jaw_right", "chin")
MIRROR_ORDER = [0, 2, 1, 4, 3, 5]
FACE_KEYPOINTS = np.array(
    [[0, 0], [-0.5, 0.06], [0.5, 0.06], [-0.39, 0.49], [0.39, 0.49], [0, 0.74]], np.float32
)


@dataclass(frozen=True)
class MaskTemplate:
    albedo: np.ndarray  # HxWx3 float32 0..1
    shade: np.ndarray  # HxW float32, ~1
    fabric: np.ndarray  # HxW float32 0..1: where patterns/colours apply
    alpha: np.ndarray  # HxW float32 0..1
    keypoints: np.ndarray  # 6x2 float32, template pixels, KEYPOINT_NAMES order
    outline: np.ndarray  # Nx2 float32 polygon, template pixels
    straps: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    # ^ where ear loops leave the mask (template pixels): left top, left bottom, right top, right bottom


def to_pixels(points) -> np.ndarray:
    pts = np.asarray(points, np.float32)
    return np.stack([(pts[:, 0] + ORIGIN[0]) * SCALE, (pts[:, 1] + ORIGIN[1]) * SCALE], axis=1)


def _face_grid() -> tuple[np.ndarray, np.ndarray]:
    """Face-unit coordinates of every template pixel centre."""
    w, h = CANVAS
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return x / SCALE - ORIGIN[0], y / SCALE - ORIGIN[1]


def _catmull_rom(points: np.ndarray, samples: int = 8) -> np.ndarray:
    """Closed smooth curve through `points`."""
    out = []
    n = len(points)
    for i in range(n):
        p0, p1, p2, p3 = (points[(i + k) % n] for k in (-1, 0, 1, 2))
        for t in np.linspace(0, 1, samples, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(
                0.5
                * (
                    2 * p1
                    + (p2 - p0) * t
                    + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                    + (3 * p1 - p0 - 3 * p2 + p3) * t3
                )
            )
    return np.array(out, np.float32)


def symmetric_outline(right_half: list[tuple[float, float]]) -> np.ndarray:
    """Closed smooth outline (face units) from its right half, listed top-centre to bottom-centre."""
    right = np.array(right_half, np.float32)
    left = right[-2:0:-1] * np.array([-1, 1], np.float32)
    return _catmull_rom(np.concatenate([right, left]))


def _fill(polygons: list[np.ndarray]) -> np.ndarray:
    """Anti-aliased 0..1 coverage of face-unit polygons on the canvas."""
    w, h = CANVAS
    big = np.zeros((h * SUPERSAMPLE, w * SUPERSAMPLE), np.uint8)
    for poly in polygons:
        pts = np.round(to_pixels(poly) * SUPERSAMPLE).astype(np.int32)
        cv2.fillPoly(big, [pts], 255, cv2.LINE_AA)
    return cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _circle(cx: float, cy: float, r: float, n: int = 48) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1).astype(np.float32)


def _edge_distance(alpha: np.ndarray) -> np.ndarray:
    """Distance (face units) of each inside pixel from the outline."""
    inside = (alpha > 0.5).astype(np.uint8)
    return cv2.distanceTransform(inside, cv2.DIST_L2, 5) / SCALE


def _gauss(d: np.ndarray, width: float) -> np.ndarray:
    return np.exp(-((d / width) ** 2))


def _base(outline: np.ndarray, color: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    alpha = _fill([outline])
    albedo = np.broadcast_to(hex_to_rgb(color), (*alpha.shape, 3)).copy()
    return albedo, np.ones_like(alpha), alpha.copy(), alpha


def _template(outline, albedo, shade, fabric, alpha, straps=None) -> MaskTemplate:
    """`straps`: (x, y) of the right-side top and bottom loop anchors in face units (mirrored for the left)."""
    anchors = np.zeros((0, 2), np.float32)
    if straps is not None:
        (xt, yt), (xb, yb) = straps
        anchors = to_pixels([(-xt, yt), (-xb, yb), (xt, yt), (xb, yb)])
    return MaskTemplate(
        albedo=np.clip(albedo, 0, 1).astype(np.float32),
        shade=np.clip(shade, 0.2, 1.6).astype(np.float32),
        fabric=np.clip(fabric, 0, 1).astype(np.float32),
        alpha=np.clip(alpha, 0, 1).astype(np.float32),
        keypoints=to_pixels(FACE_KEYPOINTS),
        outline=to_pixels(outline),
        straps=anchors,
    )


def _surgical(color: str) -> MaskTemplate:
    outline = symmetric_outline(
        [
            (0, -0.02),
            (0.14, -0.006),
            (0.34, 0.018),
            (0.55, 0.045),
            (0.565, 0.2),
            (0.55, 0.38),
            (0.49, 0.52),
            (0.39, 0.645),
            (0.25, 0.745),
            (0.1, 0.805),
            (0, 0.815),
        ]
    )
    albedo, shade, fabric, alpha = _base(outline, color)
    x, y = _face_grid()
    # three pleats: each a lit band over the fold, a sharp dark crease under it, and a soft shadow below
    for fold in (0.21, 0.35, 0.49):
        d = y - (fold + 0.07 * x**2)
        shade = (
            shade
            + 0.12 * _gauss(d + 0.025, 0.022)
            - 0.28 * _gauss(d - 0.006, 0.008)
            - 0.1 * _gauss(d - 0.03, 0.02)
        )
    edge = _edge_distance(alpha)
    hem = (edge < 0.05) * (0.04 + 0.05 * (np.sin((x + y) * 400) > 0.6))  # stitched hem band
    shade = shade * (1 - 0.25 * x**2) * (1 - hem) * (1 - 0.14 * _gauss(edge - 0.05, 0.005))
    shade = shade - 0.12 * _gauss(y - 0.012 - 0.05 * np.abs(x), 0.008) * (np.abs(x) < 0.17)  # nose wire
    return _template(outline, albedo, shade, fabric, alpha, straps=((0.555, 0.05), (0.5, 0.5)))


def _n95(color: str, valve: bool = True) -> MaskTemplate:
    a, b, cy, n = 0.6, 0.44, 0.375, 3.2
    t = np.linspace(0, 2 * np.pi, 160, endpoint=False)
    xs = a * np.sign(np.cos(t)) * np.abs(np.cos(t)) ** (2 / n)
    ys = cy + b * np.sign(np.sin(t)) * np.abs(np.sin(t)) ** (2 / n)
    ys = np.maximum(ys, -0.025 + 0.13 * np.abs(xs))  # flat top stays under the eyes
    outline = np.stack([xs, ys], axis=1).astype(np.float32)
    albedo, shade, fabric, alpha = _base(outline, color)
    x, y = _face_grid()
    r2 = np.clip((np.abs(x) / a) ** n + (np.abs(y - cy) / b) ** n, 0, 1)
    rim = _edge_distance(alpha)
    shade = (0.78 + 0.3 * (1 - r2)) * (1 - 0.18 * _gauss(rim - 0.025, 0.008)) * (1 - 0.1 * (rim < 0.02))
    shade = shade * (1 - 0.12 * _gauss(x, 0.01) * (y > 0.05))  # moulded centre ridge
    if not valve:
        return _template(outline, albedo, shade, fabric, alpha, straps=((0.56, 0.12), (0.52, 0.6)))
    disc = _fill([_circle(0.24, 0.46, 0.085)])
    albedo = albedo * (1 - disc[..., None]) + hex_to_rgb("#c9ccd1") * disc[..., None]
    r = np.hypot(x - 0.24, y - 0.46)
    shade = shade * (1 - 0.3 * _gauss(r - 0.085, 0.01)) * (1 - 0.25 * disc * (np.sin(y * 300) > 0.5))
    return _template(outline, albedo, shade, fabric * (1 - disc), alpha, straps=((0.56, 0.12), (0.52, 0.6)))


def _kn95(color: str) -> MaskTemplate:
    outline = symmetric_outline(
        [
            (0, -0.035),
            (0.2, -0.002),
            (0.4, 0.02),
            (0.57, 0.05),
            (0.58, 0.25),
            (0.53, 0.45),
            (0.38, 0.64),
            (0.17, 0.79),
            (0, 0.845),
        ]
    )
    albedo, shade, fabric, alpha = _base(outline, color)
    x, y = _face_grid()
    edge = _edge_distance(alpha)
    weld = (edge < 0.045) * (0.9 + 0.1 * (np.sin(x * 260) * np.sin(y * 260) > 0))
    # folded in two: the halves face the light differently, a sharp centre seam, a crease across each half
    halves = np.where(x < 0, 0.88, 1.0) + 0.06 * np.clip(1 - np.abs(x) / 0.25, 0, 1)
    crease = _gauss(y - 0.3 - 0.18 * np.abs(x), 0.01) * (np.abs(x) > 0.05)
    shade = np.where(edge < 0.045, weld, 1.0) * halves * (1 - 0.4 * _gauss(x, 0.006)) * (1 - 0.12 * crease)
    shade = shade * (1 - 0.15 * x**2)
    return _template(outline, albedo, shade, fabric, alpha, straps=((0.57, 0.06), (0.52, 0.45)))


def _cloth(color: str) -> MaskTemplate:
    outline = symmetric_outline(
        [
            (0, -0.025),
            (0.2, 0.0),
            (0.38, 0.02),
            (0.56, 0.045),
            (0.56, 0.2),
            (0.53, 0.36),
            (0.47, 0.5),
            (0.38, 0.625),
            (0.25, 0.725),
            (0.12, 0.8),
            (0, 0.815),
        ]
    )
    albedo, shade, fabric, alpha = _base(outline, color)
    x, y = _face_grid()
    rng = np.random.default_rng(7)
    weave = cv2.GaussianBlur(rng.standard_normal(alpha.shape).astype(np.float32), (0, 0), 0.8)
    edge = _edge_distance(alpha)
    stitches = (np.abs(edge - 0.035) < 0.004) * (np.sin((x + y) * 180) > 0)
    seam = _gauss(x + 0.03 * np.sin(3 * y), 0.008)
    shade = (0.93 + 0.06 * weave) * (1 - 0.3 * seam) * (1 - 0.2 * stitches) * (1 - 0.2 * x**2)
    return _template(outline, albedo, shade, fabric, alpha, straps=((0.555, 0.05), (0.49, 0.5)))


def _gas(color: str) -> MaskTemplate:
    outline = symmetric_outline(
        [
            (0, -0.03),
            (0.22, 0.0),
            (0.4, 0.025),
            (0.52, 0.05),
            (0.56, 0.25),
            (0.52, 0.45),
            (0.41, 0.63),
            (0.27, 0.77),
            (0.12, 0.85),
            (0, 0.865),
        ]
    )
    cartridges = [_circle(s * 0.44, 0.56, 0.17) for s in (-1, 1)]
    alpha = _fill([outline, *cartridges])
    body = _fill([outline])
    x, y = _face_grid()
    albedo = np.broadcast_to(hex_to_rgb(color), (*alpha.shape, 3)).copy()
    shade = 0.8 + 0.35 * np.clip(1 - (x / 0.6) ** 2 - ((y - 0.4) / 0.5) ** 2, 0, 1)
    hardware = np.zeros_like(alpha)
    for s in (-1, 1):
        r = np.hypot(x - s * 0.44, y - 0.56)
        disc = np.clip((0.17 - r) * SCALE, 0, 1)
        hardware = np.maximum(hardware, disc)
        shade = shade * (1 - 0.35 * _gauss(r - 0.12, 0.01)) * (1 - 0.25 * _gauss(r - 0.16, 0.008))
    valve_r = np.hypot(x, y - 0.55)
    valve = np.clip((0.1 - valve_r) * SCALE, 0, 1)
    grille = valve * (np.sin(y * 220) > 0.3)
    shade = shade * (1 - 0.4 * grille) * (1 - 0.3 * _gauss(valve_r - 0.1, 0.008))
    metal = np.maximum(hardware, valve)
    albedo = albedo * (1 - metal[..., None]) + hex_to_rgb("#5f6368") * metal[..., None]
    return _template(outline, albedo, shade, body * (1 - metal), alpha)


@dataclass(frozen=True)
class MaskTypeSpec:
    """How one built-in mask type is drawn. `drawing` "template": `build(color)` (or `build(color, valve)`
    for a type with a valve variant) draws a template that is warped onto the six key points, front and
    side views; "polygon": the landmark outline of the lower face filled with one flat colour, drawn from
    `palette` unless the config fixes one (the simplest synthetic mask, no template)."""

    color: str
    build: Callable[..., MaskTemplate] | None = None
    drawing: Literal["template", "polygon"] = "template"
    palette: tuple[str, ...] = ()  # polygon: the flat colours a mask is drawn in
    printable: bool = False  # fabric that takes a drawn print style when no pattern/colour is fixed
    valve: bool = False  # has a valve / no-valve variant (style axis "valve")
    strap_color: str | None = None  # ear loops: None = the mask's own colour

    def __post_init__(self) -> None:
        if (self.drawing == "template") != (self.build is not None):
            raise ValueError("a template mask type needs `build`, a polygon one has none")
        if self.drawing == "polygon" and not self.palette:
            raise ValueError("a polygon mask type needs a `palette`")


POLYGON_COLORS = ("#000000", "#ffffff", "#87ceeb")  # the polygon mask's flat colours

# The built-in mask types, one line each (a type named in a config is looked up in MASK_TYPES).
MASK_TYPES.add("surgical", MaskTypeSpec("#a9cfe6", _surgical, strap_color="#f4f4f2"))
MASK_TYPES.add("surgical_blue", MaskTypeSpec("#3f7fc4", _surgical, strap_color="#f4f4f2"))
MASK_TYPES.add("surgical_green", MaskTypeSpec("#77b8a1", _surgical, strap_color="#f4f4f2"))
MASK_TYPES.add("surgical_white", MaskTypeSpec("#f1f1ee", _surgical, strap_color="#f4f4f2"))
MASK_TYPES.add("surgical_black", MaskTypeSpec("#2a2a2c", _surgical, strap_color="#2a2a2c"))
MASK_TYPES.add("N95", MaskTypeSpec("#efece3", _n95, valve=True, strap_color="#e8e2c8"))
MASK_TYPES.add("KN95", MaskTypeSpec("#f4f4f4", _kn95, strap_color="#f2f2f2"))
MASK_TYPES.add("cloth", MaskTypeSpec("#2f3e5c", _cloth, printable=True))
MASK_TYPES.add("gas", MaskTypeSpec("#3a3b3c", _gas))
MASK_TYPES.add("polygon", MaskTypeSpec("#000000", drawing="polygon", palette=POLYGON_COLORS))


def side_view(front: MaskTemplate, side: str) -> MaskTemplate:
    """Foreshorten the far half (the image-left half for a face turned to the left) and shade it darker;
    "right" is the mirror image of "left"."""
    if side == "right":
        return mirror_template(side_view(front, "left"))
    bridge_x = float(front.keypoints[0, 0])
    h, w = front.alpha.shape
    xs = np.arange(w, dtype=np.float32)
    src_x = np.where(xs < bridge_x, bridge_x + (xs - bridge_x) / SIDE_COMPRESSION, xs)
    map_x = np.broadcast_to(src_x, (h, w)).astype(np.float32)
    map_y = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None], (h, w)).astype(np.float32)
    remap = lambda a: cv2.remap(
        a, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    squeeze = lambda p: np.stack(
        [np.where(p[:, 0] < bridge_x, bridge_x + (p[:, 0] - bridge_x) * SIDE_COMPRESSION, p[:, 0]), p[:, 1]],
        axis=1,
    ).astype(np.float32)
    far = np.clip((bridge_x - xs) / (0.5 * SCALE * SIDE_COMPRESSION), 0, 1)
    near = np.clip((xs - bridge_x) / (0.5 * SCALE), 0, 1)
    light = (1 - 0.3 * far) * (1 + 0.06 * near * (1 - near))
    return MaskTemplate(
        remap(front.albedo),
        remap(front.shade) * light[None, :],
        remap(front.fabric),
        remap(front.alpha),
        squeeze(front.keypoints),
        squeeze(front.outline),
        squeeze(front.straps),
    )


def build_template(mask_type: str, view: str, valve: bool = True) -> MaskTemplate:
    """Draw one built-in template (callers cache it); `valve` picks the variant of types that have one."""
    spec = MASK_TYPES.get(mask_type)
    if spec.drawing != "template":
        raise ValueError(f"{mask_type!r} is drawn from landmarks and has no template")
    front = spec.build(spec.color, valve) if spec.valve else spec.build(spec.color)
    return front if view == "front" else side_view(front, view)


def template_from_rgba(rgba: np.ndarray, keypoints) -> MaskTemplate:
    """A user template from an RGBA uint8 array: its own shading is kept in `shade` so patterns and
    colours still show its folds."""
    rgb = rgba[..., :3].astype(np.float32) / 255.0
    alpha = rgba[..., 3].astype(np.float32) / 255.0
    lum = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    mean = float((lum * alpha).sum() / max(alpha.sum(), 1e-6)) or 1.0
    shade = np.clip(lum / mean, 0.2, 1.6)
    albedo = np.clip(rgb / shade[..., None], 0, 1)
    contours, _ = cv2.findContours((alpha > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outline = (
        max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float32)
        if contours
        else np.zeros((0, 2), np.float32)
    )
    return MaskTemplate(
        albedo, shade.astype(np.float32), alpha.copy(), alpha, np.asarray(keypoints, np.float32), outline
    )


def mirror_template(template: MaskTemplate) -> MaskTemplate:
    """Left-right mirror (used for a user type given with one side view only)."""
    width = template.alpha.shape[1]
    flip = lambda a: np.ascontiguousarray(a[:, ::-1])
    mirror = lambda p: np.stack([width - 1 - p[:, 0], p[:, 1]], axis=1).astype(np.float32)
    return MaskTemplate(
        flip(template.albedo),
        flip(template.shade),
        flip(template.fabric),
        flip(template.alpha),
        mirror(template.keypoints)[MIRROR_ORDER],
        mirror(template.outline),
        mirror(template.straps)[[2, 3, 0, 1]] if len(template.straps) else template.straps,
    )
