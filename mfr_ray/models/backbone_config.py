"""What a backbone says about itself, as timm's `pretrained_cfg` does: the input size, pixel normalisation and
embedding size it was built for and the crop layouts (`mfr_ray.faces.geometry.CROP_TEMPLATES`) it takes. Each
backbone registers with its default config (`@register_backbone(name, BackboneConfig(...))`); preprocessing,
evaluation, export and serving read it from there, and an evaluate config that pairs a backbone with a crop it
cannot take is refused at load. No torch here: configs import this module."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mfr_ray.registry import BACKBONES


@dataclass(frozen=True)
class Normalisation:
    """Pixels as the network saw them in training: (x - pixel_mean) / pixel_scale on RGB uint8. The defaults
    are the values every model used before a backbone declared its own, so a package that does not carry
    them loads with these."""

    pixel_mean: float = 127.5
    pixel_scale: float = 128.0

    @classmethod
    def from_package(cls, preprocessing: Mapping[str, Any]) -> Normalisation:
        """The normalisation a package's `preprocessing` records (older packages: the defaults)."""
        written = preprocessing.get("normalisation") or {}
        return cls(**{k: float(written[k]) for k in ("pixel_mean", "pixel_scale") if k in written})


@dataclass(frozen=True)
class BackboneConfig:
    """A backbone's default config. `crops`: the layouts it is built for, each taken at its own size (the
    input size must equal the crop's; `model.kwargs.input_size` picks another of them). `resized_crops`:
    layouts it takes resized to its input, declared only where the framing survives the resize (same
    aspect ratio); any other pairing is refused, never silently stretched."""

    input_size: tuple[int, int]
    embedding_size: int
    crops: tuple[str, ...]
    resized_crops: tuple[str, ...] = ()
    normalisation: Normalisation = Normalisation()

    def with_kwargs(self, kwargs: Mapping[str, Any]) -> BackboneConfig:
        """This config as the backbone is built with `kwargs` (`input_size`, `embedding_size` override)."""
        return dataclasses.replace(
            self,
            input_size=tuple(kwargs.get("input_size", self.input_size)),
            embedding_size=int(kwargs.get("embedding_size", self.embedding_size)),
        )

    def accepted_crops(self) -> list[str]:
        """The crop layouts this config takes: its own layouts of its input size, then the declared resizes."""
        from mfr_ray.faces.geometry import CROP_TEMPLATES

        native = [c for c in self.crops if tuple(CROP_TEMPLATES[c][0]) == self.input_size]
        return native + [c for c in self.resized_crops if c not in native]

    def crop_refusal(self, crop: str) -> str | None:
        """Why this backbone cannot take `crop` (None: it can)."""
        accepted = self.accepted_crops()
        if crop in accepted:
            return None
        height, width = self.input_size
        return (f"with input {height}x{width} it takes crops {accepted or 'none'} (layouts it is built for: "
                f"{list(self.crops)}, via model.kwargs.input_size)")


# arcface_torch-style networks (resnet*, iresnet*): the 112x112 ArcFace crop; their embedding head sizes
# itself to the input, so the 112x96 crop with `kwargs: {input_size: [112, 96]}`.
ARCFACE_TORCH_CONFIG = BackboneConfig(input_size=(112, 112), embedding_size=512, crops=("112x112", "112x96"))


@dataclass(frozen=True)
class RegisteredBackbone:
    """A `BACKBONES` entry: what builds the network and its default config."""

    build: Callable[..., Any]
    config: BackboneConfig


def register_backbone(name: str, config: BackboneConfig) -> Callable:
    """Decorator above a backbone class or factory: registers it under `name` with its default config."""

    def add(build: Callable) -> Callable:
        BACKBONES.add(name, RegisteredBackbone(build, config))
        return build

    return add


def backbone_config(name: str, kwargs: Mapping[str, Any] | None = None) -> BackboneConfig:
    """The default config of backbone `name` as built with `kwargs`."""
    return BACKBONES.get(name).config.with_kwargs(kwargs or {})
