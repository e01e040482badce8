"""Backbones and classification heads (registered by name in `mfr_ray.registry`, each found in its own
module when first looked up) and losses for face recognition.

Torch loads with the first of these names used, not with the package, so a config that imports
`mfr_ray.models.spec` stays light."""

from mfr_ray import lazy_attributes

_LAZY = {
    "create_backbone": "mfr_ray.models.registry",
    "extract_state_dict": "mfr_ray.models.registry",
    "list_backbones": "mfr_ray.models.registry",
    "load_backbone": "mfr_ray.models.registry",
    "preprocess": "mfr_ray.models.registry",
    "register_backbone": "mfr_ray.models.registry",
    "create_head": "mfr_ray.models.heads",
    "list_heads": "mfr_ray.models.heads",
}

__all__ = [
    "create_backbone", "create_head", "extract_state_dict", "list_backbones", "list_heads",
    "load_backbone", "preprocess", "register_backbone",
]

__getattr__ = lazy_attributes(__name__, _LAZY)
