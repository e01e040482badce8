"""Backbones (registered by name in `mfr_ray.registry` with their default config, each found in its own
module when first looked up), classification heads and losses for face recognition. `ModelSpec`
(`models/spec.py`) loads a network; `factory` builds one, `weights` reads checkpoints, `store` keeps model
files and the MLflow registry, `backbone_config` holds what a backbone says about itself.

Torch loads with the first of these names used, not with the package, so a config that imports
`mfr_ray.models.spec` stays light."""

from mfr_ray import lazy_attributes

_LAZY = {
    "create_backbone": "mfr_ray.models.factory",
    "extract_state_dict": "mfr_ray.models.weights",
    "preprocess": "mfr_ray.models.preprocessing",
    "create_head": "mfr_ray.models.heads",
}

__all__ = ["create_backbone", "create_head", "extract_state_dict", "preprocess"]

__getattr__ = lazy_attributes(__name__, _LAZY)
