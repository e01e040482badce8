"""What a mask is drawn from: the registered mask types (their spec, how each is drawn) and a type's
template as warp-ready layers, built once per process for built-in types and from the user's RGBA files for
`custom_masks`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from mfr_ray.masking.templates import (
    MaskTemplate,
    MaskTypeSpec,
    build_template,
    mirror_template,
    template_from_rgba,
)
from mfr_ray.registry import MASK_TYPES, PATTERNS


def available_mask_types() -> list[str]:
    """The registered mask types in registration order: a mix that lists them draws by that order."""
    return MASK_TYPES.in_order()


def available_patterns() -> list[str]:
    return PATTERNS.names()


def builtin_spec(mask_type: str) -> MaskTypeSpec | None:
    """The registered spec of a mask type; None for a user type (`custom_masks`), drawn as a template."""
    return MASK_TYPES.get(mask_type) if mask_type in MASK_TYPES else None


def drawn_as(mask_type: str) -> str:
    """How a mask type is drawn: its spec's `drawing` ("template" or "polygon")."""
    spec = builtin_spec(mask_type)
    return spec.drawing if spec is not None else "template"


@dataclass(frozen=True)
class TemplateLayers:
    """A template as two premultiplied 4-channel float32 layers, so warping is two warpPerspective calls
    into the face's ROI and patterns/colours are mixed there (per image, no template-size work):
    `base` = (albedo * shade * alpha, alpha); `fabric` = (base RGB * fabric, fabric * shade * alpha)."""

    base: np.ndarray
    fabric: np.ndarray
    keypoints: np.ndarray
    outline: np.ndarray
    straps: np.ndarray

    @classmethod
    def of(cls, t: MaskTemplate) -> TemplateLayers:
        rgb = np.clip(t.albedo * t.shade[..., None], 0, 1) * t.alpha[..., None]
        light = (t.fabric * np.clip(t.shade, 0, 1.5) * t.alpha)[..., None]
        base = np.ascontiguousarray(np.dstack([rgb, t.alpha]), dtype=np.float32)
        fabric = np.ascontiguousarray(np.dstack([rgb * t.fabric[..., None], light]), dtype=np.float32)
        return cls(base, fabric, t.keypoints, t.outline, t.straps)


@cache
def builtin_layers(mask_type: str, view: str, valve: bool = True) -> TemplateLayers:
    """Built-in templates are drawn once per process and shared by every engine."""
    return TemplateLayers.of(build_template(mask_type, view, valve))


def custom_layers(spec) -> dict[str, TemplateLayers]:
    """A user type's views (a `CustomMaskType`); a missing side is the other side mirrored, or the front."""
    from PIL import Image

    from mfr_ray.paths import expand_shared

    def load(view: str) -> MaskTemplate:
        with Image.open(expand_shared(getattr(spec, view))) as img:
            return template_from_rgba(np.asarray(img.convert("RGBA")), spec.keypoints[view])

    views = {view: load(view) for view in ("front", "left", "right") if getattr(spec, view)}
    for view, other in (("left", "right"), ("right", "left")):
        if view not in views:
            views[view] = mirror_template(views[other]) if other in views else views["front"]
    return {view: TemplateLayers.of(template) for view, template in views.items()}
