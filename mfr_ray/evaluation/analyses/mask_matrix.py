"""The mask-pair matrix: for every (template variant, probe variant) the verification protocol on the same
pairs, the first image of each pair taken from the template variant and the second from the probe variant
(e.g. unmasked template vs N95 probe)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from mfr_ray.config.base import StrictModel
from mfr_ray.evaluation.analyses.base import Analysis, AnalysisResult
from mfr_ray.evaluation.metric_names import metric_key, scoped
from mfr_ray.evaluation.report import pct_cell, plot_heatmap, write_matrix_csv
from mfr_ray.evaluation.verification import cosine_scores, kfold_verification
from mfr_ray.imageio import UNMASKED
from mfr_ray.registry import ANALYSES

if TYPE_CHECKING:
    from mfr_ray.evaluation.analyses.context import AnalysisContext
    from mfr_ray.evaluation.config import EvaluateConfig


def mask_pair_matrix(
    features: dict[str, tuple[np.ndarray, np.ndarray]],
    same: np.ndarray,
    fold: np.ndarray,
    far_targets: list[float],
) -> tuple[list[str], dict[str, np.ndarray]]:
    """`features[variant] = (left, right)` per-pair feature arrays of that variant. Returns the variant
    order and, per metric (per-fold name: accuracy, tpr_at_far1pct, ...), a (template x probe) table of
    fold means."""
    variants = list(features)
    metrics: list[tuple[str, float | None]] = [("accuracy", None)]
    metrics += [(m, t) for t in far_targets for m in ("tpr", "accuracy")]
    shape = (len(variants), len(variants))
    tables = {metric_key(m, t, stat=None): np.full(shape, np.nan) for m, t in metrics}
    for i, template in enumerate(variants):
        for j, probe in enumerate(variants):
            scores = cosine_scores(features[template][0], features[probe][1])
            summary = kfold_verification(scores, same, fold, far_targets).summary()
            for metric, target in metrics:
                tables[metric_key(metric, target, stat=None)][i, j] = summary.value(metric, target)
    return variants, tables


def masking_group_means(variants: list[str], table: np.ndarray) -> dict[str, float]:
    """Average of the cells where both images are unmasked, exactly one is masked, both are masked."""
    masked = np.array([v != UNMASKED for v in variants])
    n_masked = masked[:, None].astype(int) + masked[None, :].astype(int)
    out = {}
    for name, count in (("both_unmasked", 0), ("one_masked", 1), ("both_masked", 2)):
        cells = table[n_masked == count]
        if cells.size:
            out[name] = float(cells.mean())
    return out


class MaskMatrixConfig(StrictModel):
    mask_matrix: bool = Field(True, description="template x probe variant tables when several variants")
    mask_matrix_variants: list[str] | None = Field(
        None, description="variants in the matrix, in order (e.g. leave out 'mixed'); None: all sources"
    )


@ANALYSES.register("mask_matrix")
class MaskMatrix(Analysis, title="Mask-pair matrix (template x probe, mean accuracy %)", order=10, config=MaskMatrixConfig):
    """Per metric a (template x probe) table of fold means over the first protocol, as CSV and heatmap, and
    the averages of the both-unmasked, one-masked and both-masked cells as MLflow metrics."""

    cfg: MaskMatrixConfig

    def check(self, evaluate_cfg: EvaluateConfig) -> None:
        unknown = set(self.cfg.mask_matrix_variants or []) - set(evaluate_cfg.sources)
        if unknown:
            raise ValueError(f"analyses.mask_matrix_variants: {sorted(unknown)} are not in sources")

    def run(self, ctx: AnalysisContext) -> AnalysisResult | None:
        variants = self.cfg.mask_matrix_variants or ctx.source_variants
        if len(variants) < 2:
            return None
        features = {v: ctx.pair_features(v) for v in variants}
        variants, tables = mask_pair_matrix(features, ctx.pairs.same, ctx.pairs.fold, ctx.cfg.far_targets)
        metrics = {}
        for metric, table in tables.items():
            write_matrix_csv(ctx.output_dir / f"{self.name}_{metric}.csv", variants, table)
            plot_heatmap(ctx.output_dir / f"{self.name}_{metric}.png", variants, table,
                         f"{metric} (%), {ctx.protocol.name}")
            for group, value in masking_group_means(variants, table).items():
                metrics[scoped(self.name, metric, group)] = value
        section = {"variants": variants, "accuracy": tables["accuracy"],
                   "groups": masking_group_means(variants, tables["accuracy"])}
        return AnalysisResult(section, metrics)

    @classmethod
    def report_section(cls, section: dict) -> list[str]:
        variants = section["variants"]
        lines = ["", f"## {cls.title}", ""]
        lines += ["| template \\ probe | " + " | ".join(variants) + " |", "|" + "---|" * (len(variants) + 1)]
        for i, v in enumerate(variants):
            lines.append(f"| {v} | " + " | ".join(pct_cell(x) for x in section["accuracy"][i]) + " |")
        groups = ", ".join(f"{k} {pct_cell(v)}" for k, v in section["groups"].items())
        return lines + ["", f"Group averages: {groups}"]
