"""Closed-set identification, rank-k, on L2-normalised embeddings: one gallery image per identity of the
reference variant, every variant's other images as probes. The gallery split is also open-set's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from mfr_ray.config.base import StrictModel
from mfr_ray.evaluation.analyses.base import Analysis, AnalysisResult
from mfr_ray.evaluation.metric_names import scoped
from mfr_ray.evaluation.verification import l2_normalize
from mfr_ray.registry import ANALYSES

if TYPE_CHECKING:
    from mfr_ray.evaluation.analyses.context import AnalysisContext


@dataclass
class GallerySplit:
    gallery: np.ndarray  # row indices into the embedding array
    probes: np.ndarray


def first_image_gallery(labels: np.ndarray, identities: np.ndarray | None = None) -> GallerySplit:
    """The first image of each identity (in array order) is its gallery image; the rest are probes.
    `identities` restricts the gallery to those identities (others are neither gallery nor probes)."""
    labels = np.asarray(labels)
    keep = np.ones(len(labels), bool) if identities is None else np.isin(labels, identities)
    _, first = np.unique(labels, return_index=True)
    gallery = np.sort(first[keep[first]])
    is_gallery = np.zeros(len(labels), bool)
    is_gallery[gallery] = True
    return GallerySplit(gallery, np.flatnonzero(keep & ~is_gallery))


def rank_of_true_match(similarity: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """1-based rank of the probe's own identity among the gallery (ties counted pessimistically)."""
    true_col = np.array([np.flatnonzero(gallery_labels == label)[0] for label in probe_labels])
    true_score = similarity[np.arange(len(probe_labels)), true_col]
    return (similarity >= true_score[:, None]).sum(1)


def closed_set_identification(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ranks: tuple[int, ...] = (1, 5),
    probe_embeddings: np.ndarray | None = None,
) -> dict[str, float]:
    """Rank-k identification rates with one gallery image per identity; identities with a single image
    stay in the gallery as distractors. `probe_embeddings` (same rows, another variant, e.g. masked)
    replaces the probes' embeddings: unmasked gallery, masked probes."""
    x = l2_normalize(embeddings)
    probe_x = x if probe_embeddings is None else l2_normalize(probe_embeddings)
    labels = np.asarray(labels)
    split = first_image_gallery(labels)
    if len(split.probes) == 0:
        return {f"rank{k}": float("nan") for k in ranks} | {"n_probes": 0, "n_gallery": len(split.gallery)}
    similarity = probe_x[split.probes] @ x[split.gallery].T
    rank = rank_of_true_match(similarity, labels[split.probes], labels[split.gallery])
    out = {f"rank{k}": float((rank <= k).mean()) for k in ranks}
    return out | {"n_probes": len(split.probes), "n_gallery": len(split.gallery)}


class IdentificationConfig(StrictModel):
    identification: bool = True
    ranks: list[int] = Field(default_factory=lambda: [1, 5])


@ANALYSES.register("identification")
class Identification(Analysis, title="Identification", order=20, config=IdentificationConfig):
    """The first image of each identity of the reference variant is the gallery; the other images of every
    variant are probes (`<variant>.rank1`, ...)."""

    cfg: IdentificationConfig

    def run(self, ctx: AnalysisContext) -> AnalysisResult:
        gallery = ctx.image_features[ctx.primary]
        section = {}
        for variant, x in ctx.image_features.items():
            ranks = closed_set_identification(gallery, ctx.labels, tuple(self.cfg.ranks), probe_embeddings=x)
            section |= {scoped(variant, k): v for k, v in ranks.items()}
        return self.result(section)
