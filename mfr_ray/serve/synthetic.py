"""Synthetic-mask templates: an enrolment photo also enrolled as K masked copies of itself, so a masked
probe meets a masked template of the same person.

The masking engine draws each copy on the aligned enrolment crop (seeded by the photo's content, so a
rerun draws the same masks); the copy is embedded like any crop and stored as an extra template of the
identity, of kind `synthetic:<mask type>` beside the photo's own `photo` template."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from mfr_ray.config.base import StrictModel

PHOTO = "photo"
SYNTHETIC_PREFIX = "synthetic:"


class SyntheticMasks(StrictModel):
    """How many masked copies of each enrolment photo become templates, drawn from which mix."""

    count: int = Field(0, ge=0, le=16, description="masked copies per enrolment photo (0: photos only)")
    mix: dict[str, float] = Field(default_factory=lambda: {"surgical_blue": 1.0, "surgical_green": 1.0,
                                                           "cloth": 1.0, "KN95": 1.0},
                                  description="mask types drawn and their weights")
    seed: int = 0


@dataclass
class SyntheticTemplate:
    kind: str  # "synthetic:<mask type>"
    embedding: np.ndarray
    mask_probability: float


def is_masked_kind(kind: str | None) -> bool:
    return bool(kind) and kind.startswith(SYNTHETIC_PREFIX)


def photo_key(data: bytes) -> str:
    """The seed key of a photo: its content, so the same photo always gets the same masks."""
    return hashlib.sha1(data).hexdigest()[:16]


class SyntheticMasker:
    """Masked copies of aligned crops (one masking engine, loaded on first use)."""

    def __init__(self, cfg: SyntheticMasks):
        self.cfg = cfg
        self._engine = None

    def copies(self, crop: np.ndarray, key: str) -> list[tuple[str, np.ndarray]]:
        """(mask type, masked crop) for each copy the engine could draw."""
        if self._engine is None:
            from mfr_ray.masking import MaskEngine, MaskingConfig

            self._engine = MaskEngine(MaskingConfig(mix=self.cfg.mix, seed=self.cfg.seed, aligned=True))
        results = self._engine.mask_copies(crop, [(f"{key}#{i}", None) for i in range(self.cfg.count)],
                                           aligned=True)
        return [(r.record.mask_type, r.image) for r in results if r.image is not None and r.record.status == "ok"]
