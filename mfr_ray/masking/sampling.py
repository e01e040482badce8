"""What mask an image gets and how it is worn: type, pattern, colour and style, drawn from (seed, key)
only, so the same image is masked the same way in any process, on any worker."""

from __future__ import annotations

import colorsys
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mfr_ray.masking.config import HEX_COLOR, RANDOM, MaskingConfig, style_name
from mfr_ray.masking.layers import TemplateLayers, builtin_spec, drawn_as
from mfr_ray.masking.patterns import CLOTH_SOLIDS, PATTERN_FAMILIES, pattern_family
from mfr_ray.masking.templates import MaskTypeSpec
from mfr_ray.registry import MASK_TYPES, PATTERNS

# Coverage styles: ranges of (nose shift in nose lengths, > 0 lower; chin lift in lip-to-chin distances)
COVERAGE_RANGES = {
    "standard": ((-0.05, 0.05), (-0.03, 0.03)),
    "nose_high": ((-0.3, -0.15), (-0.03, 0.03)),
    "nose_low": ((0.2, 0.3), (-0.03, 0.03)),
    "chin_exposed": ((-0.15, -0.05), (0.45, 0.6)),  # pulled up: the homography spreads the lift
}


def rng_for(seed: int, key: str) -> np.random.Generator:
    """Random stream that depends only on (seed, key): stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@dataclass(frozen=True)
class MaskChoice:
    """What to draw: type, pattern and colour, and the style (discrete axes, e.g. "coverage", and the
    continuous rendering settings, e.g. "lighting"), all drawn from (seed, key)."""

    mask_type: str
    pattern: str | None
    color: str | None
    style: dict = field(default_factory=dict, hash=False)
    drawn_look: bool = False  # pattern/colour drawn by the print style: printed at render.DRAWN_LOOK_WEIGHT

    def style_json(self) -> str:
        return json.dumps(self.style, sort_keys=True) if self.style else ""


def _pick(weights: dict[str, float], u: float) -> str:
    """The option a uniform draw `u` in [0, 1) lands on, options in their listed order."""
    names = list(weights)
    edges = np.cumsum([weights[n] for n in names])
    return names[min(int(np.searchsorted(edges, u * edges[-1], side="right")), len(names) - 1)]


def _uniform(bounds: tuple[float, float], u: float) -> float:
    return round(bounds[0] + (bounds[1] - bounds[0]) * u, 4)


def _random_color(hue: float, sat: float, val: float) -> str:
    r, g, b = colorsys.hsv_to_rgb(hue, 0.3 + 0.6 * sat, 0.3 + 0.65 * val)
    return "#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in (r, g, b)))


class MaskSampler:
    """Draws a `MaskChoice` per image key from the config's type, mix, pattern, colour and style settings.
    `layers` gives a type's template (its ear-loop anchors decide whether the straps axis applies)."""

    def __init__(self, config: MaskingConfig, layers: Callable[[str, str], TemplateLayers]):
        self.config = config
        self._layers = layers
        held = {o for o in config.style.print if style_name("print", o) in config.exclude_styles}
        self.patterns = sorted(
            p for p in set(PATTERNS) | set(config.custom_patterns) if pattern_family(p) not in held
        )
        mix = config.mix_entries()
        self.mix_entries = list(mix)
        weights = np.array([mix[e] for e in self.mix_entries], np.float64)
        # Cumulative mix weights: a draw is `searchsorted(cdf, rng.random(), "right")`, exactly what
        # `rng.choice(n, p=weights / sum)` computes, at a fifth of its cost (it validates p on every call).
        self._mix_cdf = np.cumsum(weights / weights.sum()) if len(weights) else weights
        if len(weights):
            self._mix_cdf /= self._mix_cdf[-1]

    def choose(self, key: str, mask_type: str | None = None) -> MaskChoice:
        """Mask type, pattern and colour for an image key; depends only on (config, seed, key)."""
        cfg = self.config
        rng = rng_for(cfg.seed, key)
        mix_pick = int(self._mix_cdf.searchsorted(rng.random(), side="right")) if self.mix_entries else -1
        pattern_pick = int(rng.integers(len(self.patterns)))
        hue, sat, val = rng.random(3)
        mask_type = mask_type or cfg.mask_type
        variant = ""
        if mask_type is None:
            mask_type, variant = (
                self.mix_entries[mix_pick].partition("/")[::2] if mix_pick >= 0 else ("surgical", "")
            )
        self._check_type(mask_type)
        spec = builtin_spec(mask_type)
        if spec is not None and spec.drawing == "polygon":
            return self._polygon_choice(mask_type, spec, variant, pattern_pick)
        if variant:
            is_color = bool(HEX_COLOR.match(variant))
            pattern, color = (None, variant) if is_color else (variant, None)
        else:
            pattern = self.patterns[pattern_pick] if cfg.pattern == RANDOM else cfg.pattern
            color = _random_color(hue, sat, val) if cfg.color == RANDOM else cfg.color
        return self._styled(key, mask_type, pattern, color)

    def _check_type(self, mask_type: str) -> None:
        if mask_type not in MASK_TYPES and mask_type not in self.config.custom_masks:
            raise ValueError(f"unknown mask type {mask_type!r}")
        if mask_type in self.config.exclude_types:
            raise ValueError(f"mask type {mask_type!r} is held out (exclude_types)")

    def _polygon_choice(self, mask_type: str, spec: MaskTypeSpec, variant: str, pick: int) -> MaskChoice:
        """A flat polygon mask: the mix entry's colour, else the configured one, else one of its palette."""
        cfg = self.config
        fixed = cfg.color if cfg.color not in (None, RANDOM) else None
        color = variant if HEX_COLOR.match(variant) else fixed
        return MaskChoice(mask_type, None, color or spec.palette[pick % len(spec.palette)])

    def _styled(self, key: str, mask_type: str, pattern: str | None, color: str | None) -> MaskChoice:
        """Draw the style of one mask from its own random stream (so adding a style axis never changes the
        type/pattern/colour draws). Axes that do not apply to the type are left out of the style."""
        cfg = self.config
        u = rng_for(cfg.seed, f"{key}\x00style").random(10)
        spec = builtin_spec(mask_type)
        coverage = _pick(cfg.style_weights("coverage"), u[0])
        nose, chin = COVERAGE_RANGES[coverage]
        style: dict = {
            "coverage": coverage,
            "nose_shift": _uniform(nose, u[1]),
            "chin_lift": _uniform(chin, u[2]),
            "lighting": _uniform(cfg.style.lighting, u[3]),
            "texture": _uniform(cfg.style.texture, u[4]),
            "feather": _uniform(cfg.style.feather, u[5]),
        }
        drawn_look = spec is not None and spec.printable and pattern is None and color is None
        if drawn_look:
            pattern, color = self._printed_look(u[6], u[7])
        if spec is not None and spec.printable:
            style["print"] = pattern_family(pattern) if pattern else "solid"
        if drawn_as(mask_type) == "template" and len(self._layers(mask_type, "front").straps):
            style["straps"] = _pick(cfg.style_weights("straps"), u[8])
        if spec is not None and spec.valve:
            style["valve"] = _pick(cfg.style_weights("valve"), u[9])
        return MaskChoice(mask_type, pattern, color, style, drawn_look)

    def _printed_look(self, u_family: float, u_name: float) -> tuple[str | None, str | None]:
        """(pattern, colour) of a printable mask the config leaves open: a print family by its weight, then
        a solid colour or a pattern of that family."""
        family = _pick(self.config.style_weights("print"), u_family)
        if family == "solid":
            return None, CLOTH_SOLIDS[int(u_name * len(CLOTH_SOLIDS))]
        names = [p for p in self.patterns if pattern_family(p) == family] or list(PATTERN_FAMILIES[family])
        return names[int(u_name * len(names))], None
