"""Backbone registry (timm-style): `@register_backbone("name")`, `create_backbone(name, **kw)`,
`load_backbone(name, checkpoint_path)`, and the single input preprocessing every backbone shares."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

PIXEL_MEAN = 127.5
PIXEL_SCALE = 128.0


class Registry:
    """Name -> factory, filled by decorators where each model/head is defined."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., nn.Module]] = {}

    def register(self, name: str):
        def add(factory):
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._factories[name] = factory
            return factory

        return add

    def names(self) -> list[str]:
        return sorted(self._factories)

    def create(self, name: str, *args, **kwargs) -> nn.Module:
        if name not in self._factories:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._factories[name](*args, **kwargs)


BACKBONES = Registry("backbone")


def register_backbone(name: str):
    """Class/function decorator adding a backbone factory under `name`."""
    return BACKBONES.register(name)


def list_backbones() -> list[str]:
    return BACKBONES.names()


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build a backbone by name; it exposes `input_size` (H, W) and `embedding_size`."""
    return BACKBONES.create(name, **kwargs)


def extract_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights inside any checkpoint layout we meet: Xiaoccer's {"net_state_dict": ...}, ours
    {"model": ...}, or a plain state dict. A DataParallel `module.` prefix is dropped."""
    for key in ("net_state_dict", "model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    return checkpoint


def load_backbone(
    name: str, checkpoint_path: str | Path | None = None, strict: bool = True, **kwargs
) -> nn.Module:
    """Create `name` and, if given, load weights from a local checkpoint file (CPU, weights only)."""
    model = create_backbone(name, **kwargs)
    if checkpoint_path is not None:
        checkpoint = torch.load(str(checkpoint_path), map_location="cpu", weights_only=True)
        model.load_state_dict(extract_state_dict(checkpoint), strict=strict)
    return model


def preprocess(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC RGB crops -> float NCHW tensor scaled as (x - 127.5) / 128."""
    if isinstance(crops, np.ndarray):
        crops = np.ascontiguousarray(crops)
        tensor = torch.from_numpy(crops if crops.flags.writeable else crops.copy())
    else:
        tensor = crops
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    return (tensor.permute(0, 3, 1, 2).float() - PIXEL_MEAN) / PIXEL_SCALE
