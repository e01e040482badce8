"""Open-set identification: FNIR at fixed FPIR with enrolled and never-enrolled identities."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mfr_ray.config.base import StrictModel
from mfr_ray.evaluation.analyses.base import Analysis, AnalysisResult
from mfr_ray.evaluation.identification import open_set_identification
from mfr_ray.registry import ANALYSES

if TYPE_CHECKING:
    from mfr_ray.evaluation.analyses.context import AnalysisContext


class OpenSetConfig(StrictModel):
    open_set: bool = True
    fpir_targets: list[float] = Field(default_factory=lambda: [0.01, 0.1])
    unknown_fraction: float = Field(0.5, gt=0.0, lt=1.0)


@ANALYSES.register("open_set")
class OpenSet(Analysis, title="Open Set", order=30, config=OpenSetConfig):
    """On the reference variant: a share of the identities is never enrolled (non-mated probes)."""

    cfg: OpenSetConfig

    def run(self, ctx: AnalysisContext) -> AnalysisResult:
        features, cfg = ctx.image_features[ctx.primary], self.cfg
        scores = open_set_identification(features, ctx.labels, tuple(cfg.fpir_targets), cfg.unknown_fraction)
        return self.result(scores)
