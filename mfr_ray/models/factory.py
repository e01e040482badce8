"""Backbones by name: `create_backbone` builds a registered network with its default config
(`mfr_ray.models.backbone_config`) applied, so its input and embedding size come from one place and the
module carries the config it was built with (`module.backbone_config`, read by preprocessing and export)."""

from __future__ import annotations

from typing import Any

from torch import nn

from mfr_ray.models.backbone_config import RegisteredBackbone
from mfr_ray.registry import BACKBONES


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build backbone `name` (fresh weights); `kwargs` override its default input and embedding size."""
    entry: RegisteredBackbone = BACKBONES.get(name)
    config = entry.config.with_kwargs(kwargs)
    model = entry.build(**{**kwargs, "input_size": config.input_size, "embedding_size": config.embedding_size})
    if tuple(model.input_size) != config.input_size or model.embedding_size != config.embedding_size:
        raise ValueError(f"backbone {name!r} built {model.input_size}/{model.embedding_size}, not the "
                         f"{config.input_size}/{config.embedding_size} its config asks for")
    model.backbone_config = config
    return model
