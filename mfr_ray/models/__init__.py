"""Backbones (registered by name), classification heads and losses for face recognition."""

from mfr_ray.models import inception, iresnet, mobilefacenet, resnet  # noqa: F401 - registers backbones
from mfr_ray.models.heads import create_head, list_heads
from mfr_ray.models.registry import (
    create_backbone,
    extract_state_dict,
    list_backbones,
    load_backbone,
    preprocess,
    register_backbone,
)

__all__ = [
    "create_backbone",
    "create_head",
    "extract_state_dict",
    "list_backbones",
    "list_heads",
    "load_backbone",
    "preprocess",
    "register_backbone",
]
