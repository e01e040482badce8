"""The mask-pair matrix: for every (template variant, probe variant) the verification protocol on the
same pairs, the first image of each pair taken from the template variant and the second from the probe
variant (e.g. unmasked template vs N95 probe)."""

from __future__ import annotations

import numpy as np

from mfr_ray.evaluation.metric_names import metric_key
from mfr_ray.evaluation.verification import cosine_scores, kfold_verification
from mfr_ray.imageio import UNMASKED


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
