"""The occlusion-removal baseline: every variant's crops with the lower half blacked out (the geometry the
backbone expects is kept), embedded and verified like the variants themselves, as `<variant>_upper`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from mfr_ray.config.base import StrictModel
from mfr_ray.evaluation.analyses.base import Analysis, AnalysisResult
from mfr_ray.registry import ANALYSES

if TYPE_CHECKING:
    from mfr_ray.evaluation.analyses.context import AnalysisContext

UPPER_SUFFIX = "_upper"


def blank_lower_half(crops: np.ndarray) -> np.ndarray:
    """Keep the upper half of each crop, black out the rest."""
    out = crops.copy()
    out[:, crops.shape[1] // 2 :] = 0
    return out


class UpperHalfConfig(StrictModel):
    upper_half: bool = Field(False, description="also evaluate on crops whose lower half is blanked out")


@ANALYSES.register("upper_half")
class UpperHalf(Analysis, title="Upper-half baseline (mean ± std over folds, %)", order=60,
                config=UpperHalfConfig):
    """Does the network still verify when nothing below the nose is seen? The rows and MLflow metrics
    (`<protocol>.<variant>_upper.<metric>`) of the verification table, on the blanked copies."""

    cfg: UpperHalfConfig

    def run(self, ctx: AnalysisContext) -> AnalysisResult:
        from mfr_ray.evaluation.analyses.context import VariantData
        from mfr_ray.evaluation.runner import verify_variants

        upper = {}
        for variant, data in ctx.data.items():
            name = variant + UPPER_SUFFIX
            embeddings = ctx.embed(name, blank_lower_half(data.crops.crops), variant)
            upper[name] = VariantData(data.crops, embeddings, data.source)
        found = verify_variants(ctx.cfg, ctx.pairs, upper)
        return AnalysisResult({"far_targets": ctx.cfg.far_targets, "verification": found.rows}, found.metrics)

    @classmethod
    def report_section(cls, section: dict) -> list[str]:
        from mfr_ray.evaluation.report import verification_table

        return ["", f"## {cls.title}", ""] + verification_table(section["verification"], section["far_targets"])
