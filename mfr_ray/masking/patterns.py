"""Procedural fabric patterns: seamless RGB tiles drawn by code, one function per pattern.

Each generator returns a TILE x TILE float32 RGB tile in 0..1 that repeats without seams (shapes wrap
around the borders, noise is filtered in the Fourier domain). Tiles are built once per process. A
generator is registered in `PATTERNS` by its decorator, `@PATTERNS.register("name")`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import cache

import cv2
import numpy as np

from mfr_ray.registry import PATTERNS

TILE = 64


def hex_to_rgb(color: str) -> np.ndarray:
    """ "#rrggbb" -> float32 RGB in 0..1."""
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], np.float32) / 255.0


def _fill(color: str) -> np.ndarray:
    return np.broadcast_to(hex_to_rgb(color), (TILE, TILE, 3)).copy()


def _grid() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    return x / TILE, y / TILE


def _paint(tile: np.ndarray, mask: np.ndarray, color: str) -> np.ndarray:
    """Alpha-blend `color` where `mask` (0..1) is set."""
    m = mask[..., None].astype(np.float32)
    return tile * (1 - m) + hex_to_rgb(color) * m


def _wrapped_shapes(
    draw: Callable[[np.ndarray, float, float], None], centers: list[tuple[float, float]]
) -> np.ndarray:
    """Draw shapes at 4x resolution on a 3x3 tiled canvas so shapes crossing a border wrap; return the
    anti-aliased centre tile as a 0..1 mask."""
    scale = 4
    size = TILE * scale
    canvas = np.zeros((3 * size, 3 * size), np.uint8)
    for cx, cy in centers:
        for dx in (0, 1, 2):
            for dy in (0, 1, 2):
                draw(canvas, (cx + dx) * size, (cy + dy) * size)
    centre = canvas[size : 2 * size, size : 2 * size]
    return cv2.resize(centre, (TILE, TILE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, cutoff: float) -> np.ndarray:
    """Periodic noise, low-pass filtered at `cutoff` cycles per tile, normalised to 0..1."""
    spectrum = np.fft.fft2(rng.standard_normal((TILE, TILE)))
    f = np.fft.fftfreq(TILE) * TILE
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    field = np.real(np.fft.ifft2(spectrum * np.exp(-((radius / cutoff) ** 2)))).astype(np.float32)
    return (field - field.min()) / (np.ptp(field) + 1e-6)


def _stripes(coord: np.ndarray, period: float, width: float) -> np.ndarray:
    """Anti-aliased stripes of `width` (fraction of period) along `coord` (0..1 over the tile)."""
    phase = (coord * TILE / period) % 1.0
    edge = 1.0 / period
    return np.clip((width - phase) / edge + 0.5, 0, 1) * np.clip(phase / edge + 0.5, 0, 1)


def _circle(radius: float):
    def draw(canvas, x, y):
        cv2.circle(canvas, (int(x), int(y)), int(radius * TILE * 4), 255, -1, cv2.LINE_AA)

    return draw


def _polygon(points: list[tuple[float, float]]):
    def draw(canvas, x, y):
        pts = np.array([[x + px * TILE * 4, y + py * TILE * 4] for px, py in points], np.int32)
        cv2.fillPoly(canvas, [pts], 255, cv2.LINE_AA)

    return draw


def _flower(petal: float, petals: int):
    def draw(canvas, x, y):
        r = petal * TILE * 4
        for k in range(petals):
            a = 2 * np.pi * k / petals
            cv2.circle(
                canvas, (int(x + r * np.cos(a)), int(y + r * np.sin(a))), int(r * 0.75), 255, -1, cv2.LINE_AA
            )

    return draw


@PATTERNS.register("checks")
def checks(rng):
    x, y = _grid()
    on = ((np.floor(x * 4) + np.floor(y * 4)) % 2).astype(np.float32)
    return _paint(_fill("#f4f1ea"), on, "#2b2b2b")


@PATTERNS.register("gingham")
def gingham(rng):
    x, y = _grid()
    tile = _paint(_fill("#ffffff"), _stripes(x, 16, 0.5) * 0.55, "#c0392b")
    return _paint(tile, _stripes(y, 16, 0.5) * 0.55, "#c0392b")


@PATTERNS.register("tartan")
def tartan(rng):
    x, y = _grid()
    tile = _fill("#1f4d2b")
    for coord in (x, y):
        tile = _paint(tile, _stripes(coord, 32, 0.35) * 0.6, "#102a5c")
        tile = _paint(tile, _stripes(coord + 0.2, 32, 0.06) * 0.8, "#d8b13a")
        tile = _paint(tile, _stripes(coord + 0.55, 32, 0.04) * 0.8, "#b3212b")
    return tile


@PATTERNS.register("plaid")
def plaid(rng):
    x, y = _grid()
    tile = _fill("#8e1b1b")
    for coord in (x, y):
        tile = _paint(tile, _stripes(coord, 64, 0.4) * 0.7, "#1a1a1a")
        tile = _paint(tile, _stripes(coord + 0.1, 16, 0.1) * 0.5, "#e9e2d0")
    return tile


@PATTERNS.register("houndstooth")
def houndstooth(rng):
    shape = [(0, 0), (0.5, 0), (0.75, 0.25), (0.5, 0.25), (0.5, 0.5), (0.25, 0.25), (0, 0.25)]
    centers = [(i / 4, j / 4) for i in range(4) for j in range(4)]
    mask = _wrapped_shapes(_polygon([(px / 4, py / 4) for px, py in shape]), centers)
    return _paint(_fill("#f1ede4"), mask, "#1c1c1c")


@PATTERNS.register("stripes_horizontal")
def stripes_horizontal(rng):
    _, y = _grid()
    return _paint(_fill("#f7f7f7"), _stripes(y, 16, 0.5), "#1f3a93")


@PATTERNS.register("stripes_vertical")
def stripes_vertical(rng):
    x, _ = _grid()
    return _paint(_fill("#fdf6e3"), _stripes(x, 16, 0.4), "#c2185b")


@PATTERNS.register("stripes_diagonal")
def stripes_diagonal(rng):
    x, y = _grid()
    return _paint(_fill("#ffe082"), _stripes(x + y, 16, 0.5), "#37474f")


@PATTERNS.register("pinstripe")
def pinstripe(rng):
    x, _ = _grid()
    return _paint(_fill("#263238"), _stripes(x, 8, 0.15), "#cfd8dc")


@PATTERNS.register("polka_dots")
def polka_dots(rng):
    centers = [(i / 4 + 0.125, j / 4 + 0.125 + (i % 2) * 0.125) for i in range(4) for j in range(4)]
    return _paint(_fill("#d32f2f"), _wrapped_shapes(_circle(0.06), centers), "#ffffff")


@PATTERNS.register("micro_dots")
def micro_dots(rng):
    centers = [(i / 8, j / 8 + (i % 2) / 16) for i in range(8) for j in range(8)]
    return _paint(_fill("#1a237e"), _wrapped_shapes(_circle(0.022), centers), "#fff59d")


@PATTERNS.register("floral_daisy")
def floral_daisy(rng):
    centers = [(0.25, 0.25), (0.75, 0.75)]
    tile = _paint(_fill("#4e7d3a"), _wrapped_shapes(_flower(0.09, 8), centers), "#ffffff")
    return _paint(tile, _wrapped_shapes(_circle(0.05), centers), "#f9c80e")


@PATTERNS.register("floral_rose")
def floral_rose(rng):
    centers = [(0.25, 0.3), (0.75, 0.8)]
    tile = _paint(_fill("#fbe9e7"), _wrapped_shapes(_flower(0.1, 5), centers), "#c62828")
    tile = _paint(tile, _wrapped_shapes(_circle(0.06), centers), "#8e0000")
    leaves = _wrapped_shapes(_circle(0.04), [(0.42, 0.45), (0.92, 0.95)])
    return _paint(tile, leaves, "#2e7d32")


@PATTERNS.register("floral_ditsy")
def floral_ditsy(rng):
    centers = [tuple(rng.random(2)) for _ in range(7)]
    tile = _paint(_fill("#102542"), _wrapped_shapes(_flower(0.035, 5), centers), "#f7b2bd")
    return _paint(tile, _wrapped_shapes(_circle(0.015), centers), "#ffe66d")


@PATTERNS.register("leaves")
def leaves(rng):
    leaf = [(0, -0.12), (0.05, -0.03), (0.04, 0.08), (0, 0.12), (-0.04, 0.08), (-0.05, -0.03)]
    centers = [(0.25, 0.25), (0.75, 0.25), (0.5, 0.75), (0.0, 0.75)]
    return _paint(_fill("#f3efe0"), _wrapped_shapes(_polygon(leaf), centers), "#3b7d3c")


def _camouflage(rng, colors: list[str], cutoff: float) -> np.ndarray:
    tile = _fill(colors[0])
    for color, level in zip(colors[1:], (0.45, 0.55, 0.62), strict=False):
        blob = _smooth_noise(rng, cutoff)
        tile = _paint(tile, np.clip((blob - level) * 12 + 0.5, 0, 1), color)
    return tile


@PATTERNS.register("camouflage_woodland")
def camouflage_woodland(rng):
    return _camouflage(rng, ["#6b6b3a", "#3d4a2a", "#8a6a43", "#1e1e16"], 4)


@PATTERNS.register("camouflage_desert")
def camouflage_desert(rng):
    return _camouflage(rng, ["#d8c39a", "#b99a6b", "#8f7650"], 4)


@PATTERNS.register("camouflage_urban")
def camouflage_urban(rng):
    return _camouflage(rng, ["#9ea3a6", "#6b7074", "#3c4044", "#d9dcde"], 5)


@PATTERNS.register("denim")
def denim(rng):
    x, y = _grid()
    twill = _stripes(x + y * 0.5, 4, 0.5) * 0.25
    grain = _smooth_noise(rng, 20) * 0.3
    tile = _paint(_fill("#2f4a78"), twill, "#1b2c4a")
    return _paint(tile, grain, "#7f9cc4")


@PATTERNS.register("herringbone")
def herringbone(rng):
    x, y = _grid()
    column = np.floor(x * 8) % 2
    slope = np.where(column == 0, 1.0, -1.0)
    return _paint(_fill("#8d8579"), _stripes(y + slope * x, 8, 0.5) * 0.8, "#4a443c")


@PATTERNS.register("chevron")
def chevron(rng):
    x, y = _grid()
    zig = np.abs(((x * 4) % 1.0) - 0.5) / 4
    return _paint(_fill("#ffffff"), _stripes(y + zig, 16, 0.45), "#00897b")


@PATTERNS.register("zigzag")
def zigzag(rng):
    x, y = _grid()
    zig = np.abs(((x * 8) % 1.0) - 0.5) / 8
    return _paint(_fill("#fff3e0"), _stripes(y + zig, 8, 0.3), "#e65100")


@PATTERNS.register("honeycomb")
def honeycomb(rng):
    hexagon = [(0.1 * np.cos(a), 0.1 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 7)[:-1]]
    centers = [(i / 4, j / 2 + (i % 2) / 4) for i in range(4) for j in range(2)]
    return _paint(_fill("#5d4037"), _wrapped_shapes(_polygon(hexagon), centers), "#ffb300")


@PATTERNS.register("triangles")
def triangles(rng):
    tri = [(0, -0.08), (0.08, 0.07), (-0.08, 0.07)]
    centers = [(i / 4 + (j % 2) / 8, j / 4) for i in range(4) for j in range(4)]
    return _paint(_fill("#283593"), _wrapped_shapes(_polygon(tri), centers), "#80deea")


@PATTERNS.register("waves")
def waves(rng):
    x, y = _grid()
    return _paint(_fill("#e0f7fa"), _stripes(y + 0.04 * np.sin(2 * np.pi * x * 2), 12, 0.4), "#0277bd")


@PATTERNS.register("stars")
def stars(rng):
    star = []
    for k in range(10):
        r = 0.07 if k % 2 == 0 else 0.03
        a = -np.pi / 2 + k * np.pi / 5
        star.append((r * np.cos(a), r * np.sin(a)))
    centers = [(0.25, 0.25), (0.75, 0.75)]
    return _paint(_fill("#0d1b4c"), _wrapped_shapes(_polygon(star), centers), "#ffffff")


@PATTERNS.register("hearts")
def hearts(rng):
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    heart = [
        (0.005 * 16 * np.sin(a) ** 3, -0.005 * (13 * np.cos(a) - 5 * np.cos(2 * a) - 2 * np.cos(3 * a)))
        for a in t
    ]
    centers = [(0.25, 0.25), (0.75, 0.75)]
    return _paint(_fill("#fce4ec"), _wrapped_shapes(_polygon(heart), centers), "#e91e63")


@PATTERNS.register("leopard")
def leopard(rng):
    centers = [tuple(rng.random(2)) for _ in range(9)]
    tile = _paint(_fill("#d9a441"), _wrapped_shapes(_circle(0.07), centers), "#3b2412")
    return _paint(tile, _wrapped_shapes(_circle(0.04), centers), "#a86f2c")


@PATTERNS.register("marble")
def marble(rng):
    x, y = _grid()
    veins = np.abs(np.sin(2 * np.pi * (x + y + 0.6 * _smooth_noise(rng, 3))))
    return _paint(_fill("#f5f5f5"), (1 - veins) ** 6, "#7a7a7a")


@PATTERNS.register("tie_dye")
def tie_dye(rng):
    x, y = _grid()
    angle = 2 * np.pi * (x + 0.4 * _smooth_noise(rng, 3))
    ring = np.sin(2 * np.pi * 3 * (x - 0.5) + 2 * np.pi * 3 * (y - 0.5) + angle)
    tile = _paint(_fill("#8e24aa"), np.clip(ring, 0, 1), "#00bcd4")
    return _paint(tile, np.clip(-ring, 0, 1) * 0.8, "#ffeb3b")


@PATTERNS.register("grid")
def grid(rng):
    x, y = _grid()
    lines = np.maximum(_stripes(x, 16, 0.1), _stripes(y, 16, 0.1))
    return _paint(_fill("#fafafa"), lines, "#546e7a")


@PATTERNS.register("argyle")
def argyle(rng):
    diamond = [(0, -0.25), (0.25, 0), (0, 0.25), (-0.25, 0)]
    tile = _paint(
        _fill("#37474f"), _wrapped_shapes(_polygon(diamond), [(0.25, 0.25), (0.75, 0.75)]), "#8d6e63"
    )
    x, y = _grid()
    lines = np.maximum(_stripes(x + y, 32, 0.05), _stripes(x - y, 32, 0.05))
    return _paint(tile, lines * 0.8, "#fff8e1")


def _key_seed(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


@cache
def pattern_tile(name: str) -> np.ndarray:
    """The built-in tile of `name` (float32 RGB 0..1), generated once per process, read-only."""
    tile = np.clip(PATTERNS.create(name, np.random.default_rng(_key_seed(name))), 0, 1).astype(np.float32)
    tile.setflags(write=False)
    return tile


def load_pattern_file(path: str) -> np.ndarray:
    """A user pattern tile from an image file (RGB float32 0..1)."""
    from mfr_ray.imageio import read_image_file
    from mfr_ray.paths import expand_shared

    decoded = read_image_file(expand_shared(path))
    if not decoded.ok:
        raise ValueError(f"pattern file {path}: {decoded.status}: {decoded.reason}")
    return decoded.image.astype(np.float32) / 255.0


# Print style (MaskingConfig.style.print) of each built-in pattern; user patterns count as "other".
PATTERN_FAMILIES = {
    "stripes": (
        "stripes_horizontal",
        "stripes_vertical",
        "stripes_diagonal",
        "pinstripe",
        "chevron",
        "zigzag",
        "waves",
    ),
    "checks": ("checks", "gingham", "tartan", "plaid", "houndstooth", "grid", "argyle"),
    "florals": ("floral_daisy", "floral_rose", "floral_ditsy", "leaves"),
    "dots": ("polka_dots", "micro_dots", "stars", "hearts"),
    "camouflage": ("camouflage_woodland", "camouflage_desert", "camouflage_urban", "leopard"),
    "other": ("denim", "herringbone", "honeycomb", "triangles", "marble", "tie_dye"),
}
FAMILY_OF = {name: family for family, names in PATTERN_FAMILIES.items() for name in names}

# Solid colours of real cloth and surgical masks (sampled for print style "solid" without a fixed colour).
CLOTH_SOLIDS = (
    "#1d1f24",
    "#2f3e5c",
    "#3b4b3a",
    "#6d6f73",
    "#b9b6ae",
    "#e9e4da",
    "#7a1f2b",
    "#c4a484",
    "#8fa9c9",
    "#d98b9a",
    "#4a6c8c",
    "#5b4636",
)


def pattern_family(name: str) -> str:
    """The print style a pattern belongs to ("other" for user patterns)."""
    return FAMILY_OF.get(name, "other")
