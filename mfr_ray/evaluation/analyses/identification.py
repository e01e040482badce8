"""Closed-set identification, rank-k: unmasked gallery, every variant's images as probes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mfr_ray.config.base import StrictModel
from mfr_ray.evaluation.analyses.base import Analysis, AnalysisResult
from mfr_ray.evaluation.identification import closed_set_identification
from mfr_ray.evaluation.metric_names import scoped
from mfr_ray.registry import ANALYSES

if TYPE_CHECKING:
    from mfr_ray.evaluation.analyses.context import AnalysisContext


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
