"""What an analysis reads: the evaluation's config, pair list and every variant's crops and embeddings.
It sits beside the analysis base class so an analysis never imports the runner that calls it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from mfr_ray.evaluation.config import EvaluateConfig, ImageSourceConfig, ProtocolSpec
    from mfr_ray.evaluation.embed import EmbeddingSet
    from mfr_ray.evaluation.sources import CropSet
    from mfr_ray.evaluation.verification import PairList


@dataclass
class VariantData:
    crops: CropSet
    embeddings: EmbeddingSet
    source: ImageSourceConfig  # as the job aligned it: part of the embedding cache key


def pair_features(
    data: VariantData, pairs: PairList, protocol: ProtocolSpec
) -> tuple[np.ndarray, np.ndarray]:
    index = {k: i for i, k in enumerate(data.embeddings.keys)}
    feats = data.embeddings.features(protocol.feature)
    return feats[[index[k] for k in pairs.left]], feats[[index[k] for k in pairs.right]]


@dataclass
class AnalysisContext:
    """What an analysis reads: the config, the pair list, every variant's crops and embeddings, the
    reference variant and the folder its files go to; `embed` embeds an analysis's own copy of the crops."""

    cfg: EvaluateConfig
    pairs: PairList
    data: dict[str, VariantData]
    primary: str
    output_dir: Path
    progress: bool = True
    embed_version: Callable | None = None  # the runner's `embed_version`, given so analyses need not import it

    @property
    def protocol(self) -> ProtocolSpec:
        """Analyses use the first protocol's features."""
        return self.cfg.protocols[0]

    @property
    def source_variants(self) -> list[str]:
        """The configured variants, in config order."""
        return list(self.data)

    @cached_property
    def labels(self) -> np.ndarray:
        """The identity of each image (the key's first part), in embedding order."""
        return np.array([k.split("/")[0] for k in self.data[self.primary].embeddings.keys])

    @cached_property
    def image_features(self) -> dict[str, np.ndarray]:
        """Per variant, one feature row per image of the pair list."""
        return {v: d.embeddings.features(self.protocol.feature) for v, d in self.data.items()}

    def pair_features(self, variant: str) -> tuple[np.ndarray, np.ndarray]:
        return pair_features(self.data[variant], self.pairs, self.protocol)

    def embed(self, name: str, crops: np.ndarray, variant: str) -> EmbeddingSet:
        """Embeddings of `crops` (an altered copy of `variant`'s, one per key), cached under `name`."""
        return self.embed_version(self.cfg, self.pairs.keys(), name, crops, self.data[variant].source, self.progress)
