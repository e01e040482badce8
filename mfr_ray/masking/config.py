"""Typed settings of the masking engine (YAML kind `mask`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from mfr_ray.config.base import StrictModel

HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
VIEWS = ("front", "left", "right")
RANDOM = "random"


class AlignedLayout(StrictModel):
    """Where a face sits in an aligned crop of one size: the box (fractions of width/height) that dlib's
    HOG detector draws around it on average, measured on real crops, so the landmark predictor sees the
    box it was trained with and no detector runs."""

    name: str
    width: int = Field(..., gt=0)
    height: int = Field(..., gt=0)
    face_box: tuple[float, float, float, float] = Field(
        ..., description="left, top, right, bottom as fractions"
    )


# Measured on LFW deep-funneled with the HOG detector and the ArcFace / SphereFace 5-point templates and
# facenet-pytorch MTCNN boxes (margin 0); see docs/masking.md ("Aligned crops").
DEFAULT_LAYOUTS = [
    AlignedLayout(name="arcface_112x112", width=112, height=112, face_box=(0.111, 0.226, 0.928, 1.039)),
    AlignedLayout(name="sphereface_112x96", width=96, height=112, face_box=(0.045, 0.226, 0.906, 1.039)),
    AlignedLayout(name="facenet_160x160", width=160, height=160, face_box=(-0.024, 0.152, 1.088, 0.982)),
    AlignedLayout(
        name="lfw_deepfunneled_250x250", width=250, height=250, face_box=(0.301, 0.333, 0.716, 0.746)
    ),
]


class CustomMaskType(StrictModel):
    """A user mask type: RGBA PNG files (paths may start with ${shared}) and their six key points in
    pixel coordinates, in the order nose bridge, left/right cheek at nose level, left/right jaw at lower-lip
    level, chin. Missing side views fall back to the front view (mirrored for the other side)."""

    front: str
    left: str | None = None
    right: str | None = None
    keypoints: dict[Literal["front", "left", "right"], list[tuple[float, float]]]

    @model_validator(mode="after")
    def _six_points(self) -> CustomMaskType:
        if "front" not in self.keypoints:
            raise ValueError("keypoints.front is required")
        for view, points in self.keypoints.items():
            if len(points) != 6:
                raise ValueError(f"keypoints.{view} needs 6 [x, y] points, got {len(points)}")
            if view != "front" and getattr(self, view) is None:
                raise ValueError(f"keypoints.{view} given but no {view} image")
        return self


STYLE_AXES = ("coverage", "print", "straps", "valve")
COVERAGE_STYLES = ("standard", "nose_high", "nose_low", "chin_exposed")
PRINT_STYLES = ("solid", "stripes", "checks", "florals", "dots", "camouflage", "other")
STRAP_STYLES = ("ear_loops", "none")
VALVE_STYLES = ("no_valve", "valve")
STYLE_OPTIONS = dict(
    zip(STYLE_AXES, (COVERAGE_STYLES, PRINT_STYLES, STRAP_STYLES, VALVE_STYLES), strict=True)
)
Range = tuple[float, float]


class MaskStyleConfig(StrictModel):
    """How each drawn mask looks beyond its type: discrete styles per axis (option -> weight, drawn per
    image) and ranges of the continuous rendering settings (uniform draws). A mask's drawn values are kept
    in its record (`style`), so a training set and an evaluation set can be told apart by them."""

    coverage: dict[str, float] = Field(
        default_factory=lambda: {"standard": 4.0, "nose_high": 1.0, "nose_low": 1.0, "chin_exposed": 1.0},
        description="where the mask sits: nose bridge high/low, chin left out",
    )
    print: dict[str, float] = Field(
        default_factory=lambda: {
            "solid": 3.0,
            "stripes": 1.0,
            "checks": 1.0,
            "florals": 1.0,
            "dots": 1.0,
            "camouflage": 0.5,
            "other": 0.5,
        },
        description="cloth masks without a fixed pattern or colour: a solid colour or a pattern family",
    )
    straps: dict[str, float] = Field(default_factory=lambda: {"ear_loops": 4.0, "none": 1.0})
    valve: dict[str, float] = Field(
        default_factory=lambda: {"no_valve": 1.0, "valve": 1.0}, description="N95"
    )
    lighting: Range = Field((0.6, 1.0), description="how strongly the face's own light shades the mask (0-1)")
    texture: Range = Field((0.01, 0.03), description="fabric grain contrast")
    feather: Range = Field(
        (0.006, 0.014), description="edge blur sigma as a share of the cheek-to-cheek width"
    )

    @field_validator("coverage", "print", "straps", "valve")
    @classmethod
    def _options(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        options = STYLE_OPTIONS[info.field_name]
        unknown = sorted(set(value) - set(options))
        if unknown:
            raise ValueError(f"unknown {info.field_name} style {unknown}; known: {', '.join(options)}")
        if any(w < 0 for w in value.values()):
            raise ValueError(f"{info.field_name} style weights must be >= 0")
        return value

    @field_validator("lighting", "texture", "feather")
    @classmethod
    def _range(cls, value: Range) -> Range:
        if not 0 <= value[0] <= value[1]:
            raise ValueError(f"a range needs 0 <= low <= high, got {list(value)}")
        return value


def style_name(axis: str, option: str) -> str:
    return f"{axis}:{option}"


ALL_STYLES = {style_name(axis, option) for axis, options in STYLE_OPTIONS.items() for option in options}


class MaskingConfig(StrictModel):
    """What mask goes on which face. `mask_type` fixes one type; otherwise `mix` draws a type per image
    with the given weights (keys `type` or `type/pattern` or `type/#rrggbb`, like MaskTheFace's --code);
    neither means `surgical`. Draws depend only on (seed, image key). `style` sets how masks look;
    `exclude_types` / `exclude_styles` ("axis:option", e.g. "coverage:chin_exposed") hold types and styles
    out (never drawn), so they can be kept for evaluation only."""

    mask_type: str | None = None
    mix: dict[str, float] = Field(default_factory=dict)
    pattern: str | None = Field(None, description="pattern name, 'random', or none")
    color: str | None = Field(None, description="#rrggbb, 'random', or none")
    pattern_weight: float = Field(0.5, ge=0, le=1)
    color_weight: float = Field(0.5, ge=0, le=1)
    seed: int = 0
    detector: Literal["hog", "cnn"] = "hog"
    upsample: int = Field(0, ge=0, le=3, description="detector upsampling on the first try")
    retry_upsample: int = Field(1, ge=0, le=3, description="upsampling of a second try when none found")
    detect_max_side: int = Field(1024, ge=64, description="larger images are shrunk for detection only")
    aligned: bool = False
    aligned_layouts: list[AlignedLayout] = Field(default_factory=lambda: list(DEFAULT_LAYOUTS))
    side_view_threshold_deg: float = Field(13.0, gt=0, lt=90)
    match_brightness: bool = True
    match_saturation: bool = True
    brightness_reference: float = Field(0.6, gt=0, le=1, description="face HSV value that keeps mask colours")
    saturation_reference: float = Field(
        0.35, gt=0, le=1, description="face saturation that keeps mask colours"
    )
    max_pixels: int = Field(40_000_000, gt=0)
    preload_templates: bool = Field(True, description="draw the templates in use when the engine starts")
    custom_masks: dict[str, CustomMaskType] = Field(default_factory=dict)
    custom_patterns: dict[str, str] = Field(default_factory=dict, description="name -> RGB image tile path")
    style: MaskStyleConfig = Field(default_factory=MaskStyleConfig)
    exclude_types: list[str] = Field(default_factory=list, description="mask types never drawn")
    exclude_styles: list[str] = Field(default_factory=list, description="'axis:option' styles never drawn")

    def style_weights(self, axis: str) -> dict[str, float]:
        """An axis' option weights with the excluded styles dropped."""
        weights = getattr(self.style, axis)
        return {o: w for o, w in weights.items() if w > 0 and style_name(axis, o) not in self.exclude_styles}

    @field_validator("color")
    @classmethod
    def _color(cls, value: str | None) -> str | None:
        if value is not None and value != RANDOM and not HEX_COLOR.match(value):
            raise ValueError(f"color must be #rrggbb or 'random', got {value!r}")
        return value

    @field_validator("mix")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in value.values()) or (value and sum(value.values()) <= 0):
            raise ValueError("mix weights must be >= 0 with a positive sum")
        return value

    @model_validator(mode="after")
    def _known_names(self) -> MaskingConfig:
        """Names are checked against the MASK_TYPES and PATTERNS registries (plus this config's own user
        types and patterns); the registries load their modules on this first lookup only."""
        from mfr_ray.registry import MASK_TYPES, PATTERNS

        types = set(MASK_TYPES.names()) | set(self.custom_masks)
        patterns = set(PATTERNS.names()) | set(self.custom_patterns)
        if self.mask_type is not None and self.mask_type not in types:
            raise ValueError(f"unknown mask_type {self.mask_type!r}; known: {', '.join(sorted(types))}")
        if self.mask_type is not None and self.mix:
            raise ValueError("give either mask_type or mix, not both")
        for entry in self.mix:
            mask_type, _, variant = entry.partition("/")
            if mask_type not in types:
                raise ValueError(f"mix entry {entry!r}: unknown mask type; known: {', '.join(sorted(types))}")
            if variant and variant not in patterns and not HEX_COLOR.match(variant):
                raise ValueError(f"mix entry {entry!r}: {variant!r} is neither a pattern nor #rrggbb")
        if self.pattern not in (None, RANDOM) and self.pattern not in patterns:
            raise ValueError(f"unknown pattern {self.pattern!r}; known: {', '.join(sorted(patterns))}")
        self._check_held_out(types)
        return self

    def _check_held_out(self, types: set[str]) -> None:
        from mfr_ray.masking.patterns import pattern_family

        for name in self.exclude_types:
            if name not in types:
                raise ValueError(
                    f"exclude_types: unknown mask type {name!r}; known: {', '.join(sorted(types))}"
                )
        for name in self.exclude_styles:
            if name not in ALL_STYLES:
                raise ValueError(
                    f"exclude_styles: unknown style {name!r}; known: {', '.join(sorted(ALL_STYLES))}"
                )
        if self.mask_type in self.exclude_types:
            raise ValueError(f"mask_type {self.mask_type!r} is in exclude_types")
        if self.mix and not self.mix_entries():
            raise ValueError("every mix entry is excluded by exclude_types / exclude_styles")
        if (
            self.pattern not in (None, RANDOM)
            and style_name("print", pattern_family(self.pattern)) in self.exclude_styles
        ):
            raise ValueError(f"pattern {self.pattern!r} is of an excluded print style")
        for axis in STYLE_AXES:
            if not self.style_weights(axis):
                raise ValueError(f"style.{axis}: no option left with a positive weight after exclude_styles")

    def mix_entries(self) -> dict[str, float]:
        """`mix` without held-out types and without entries whose fixed pattern is of a held-out print."""
        from mfr_ray.masking.patterns import pattern_family

        kept = {}
        for entry, weight in self.mix.items():
            mask_type, _, variant = entry.partition("/")
            held_print = (
                variant
                and not HEX_COLOR.match(variant)
                and (style_name("print", pattern_family(variant)) in self.exclude_styles)
            )
            if weight > 0 and mask_type not in self.exclude_types and not held_print:
                kept[entry] = weight
        return kept


def parse_mix(text: str) -> dict[str, float]:
    """`"surgical_blue:1,N95:1,cloth/check:2"` -> {"surgical_blue": 1.0, ...}; a missing weight means 1."""
    mix: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, weight = item.rpartition(":")
        if not sep or not name:
            name, weight = item, "1"
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"mix item {item!r}: weight {weight!r} is not a number") from None
    return mix
