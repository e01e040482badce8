"""Open-set identification with a reject threshold: FNIR at fixed FPIR with enrolled and never-enrolled
identities, on L2-normalised embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from mfr_ray.config.base import StrictModel
from mfr_ray.evaluation.analyses.base import Analysis, AnalysisResult
from mfr_ray.evaluation.analyses.identification import first_image_gallery
from mfr_ray.evaluation.metric_names import fpir_tag
from mfr_ray.evaluation.verification import far_threshold, l2_normalize
from mfr_ray.registry import ANALYSES

if TYPE_CHECKING:
    from mfr_ray.evaluation.analyses.context import AnalysisContext


def fpir_threshold(top_non_mated: np.ndarray, target_fpir: float) -> float:
    """Reject threshold at a per-search FPIR: the smallest similarity that at most floor(target * n) of the
    non-mated probes' best gallery scores reach (the (1 - FPIR) quantile, ties never leaking through)."""
    return far_threshold(top_non_mated, target_fpir)


def split_known_unknown(labels: np.ndarray, unknown_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Identities with >= 2 images, sorted, split deterministically: every k-th one is unknown
    (not enrolled), so the unknown share is close to `unknown_fraction`."""
    names, counts = np.unique(np.asarray(labels), return_counts=True)
    multi = names[counts >= 2]
    step = max(round(1.0 / unknown_fraction), 1) if unknown_fraction > 0 else 0
    unknown_mask = np.zeros(len(multi), bool)
    if step:
        unknown_mask[step - 1 :: step] = True
    return multi[~unknown_mask], multi[unknown_mask]


def open_set_identification(
    embeddings: np.ndarray,
    labels: np.ndarray,
    fpir_targets: tuple[float, ...] = (0.01, 0.1),
    unknown_fraction: float = 0.5,
) -> dict[str, float]:
    """Open-set protocol: known identities enrol their first image; their other images are mated probes,
    every image of an unknown identity is a non-mated probe. At reject threshold t a probe's answer is
    the top gallery match if its similarity >= t, else "unknown".
    FPIR(t) = non-mated probes answered with someone; FNIR(t) = mated probes not answered with the
    right identity. t is the smallest similarity meeting each FPIR target. The confidence reported
    per probe is its top-1 similarity minus the second best (how clearly the answer wins)."""
    x = l2_normalize(embeddings)
    labels = np.asarray(labels)
    known, unknown = split_known_unknown(labels, unknown_fraction)
    split = first_image_gallery(labels, known)
    mated = split.probes
    non_mated = np.flatnonzero(np.isin(labels, unknown))
    if len(split.gallery) < 2 or len(mated) == 0 or len(non_mated) == 0:
        return {"n_mated": len(mated), "n_non_mated": len(non_mated)}
    gallery_labels = labels[split.gallery]
    sim_mated = x[mated] @ x[split.gallery].T
    sim_non = x[non_mated] @ x[split.gallery].T
    top_mated = sim_mated.max(1)
    correct = gallery_labels[sim_mated.argmax(1)] == labels[mated]
    top_non = sim_non.max(1)
    out: dict[str, float] = {"n_mated": len(mated), "n_non_mated": len(non_mated),
                             "n_enrolled": len(split.gallery)}
    for target in fpir_targets:
        t = fpir_threshold(top_non, target)
        tag = fpir_tag(target)
        out[f"threshold_at_{tag}"] = t
        out[f"fpir_at_{tag}"] = float((top_non >= t).mean())
        out[f"fnir_at_{tag}"] = float(1.0 - (correct & (top_mated >= t)).mean())
    both = np.sort(np.concatenate([sim_mated, sim_non]), axis=1)
    margin = both[:, -1] - both[:, -2]
    out["confidence_mated_mean"] = float(margin[: len(mated)].mean())
    out["confidence_non_mated_mean"] = float(margin[len(mated) :].mean())
    return out


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
