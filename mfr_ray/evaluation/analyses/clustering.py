"""Clustering of the reference variant's embeddings (agglomerative, average linkage on cosine distance,
cut at a distance threshold), scored against the identities by purity and pairwise precision/recall/F1."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from mfr_ray.config.base import StrictModel
from mfr_ray.evaluation.analyses.base import Analysis, AnalysisResult
from mfr_ray.evaluation.verification import l2_normalize
from mfr_ray.registry import ANALYSES

if TYPE_CHECKING:
    from mfr_ray.evaluation.analyses.context import AnalysisContext


def agglomerative_clusters(embeddings: np.ndarray, distance_threshold: float) -> np.ndarray:
    """Cluster ids (0-based) from average-linkage agglomerative clustering on cosine distance."""
    from scipy.cluster.hierarchy import fcluster, linkage

    x = l2_normalize(embeddings)
    if len(x) < 2:
        return np.zeros(len(x), dtype=np.int64)
    tree = linkage(x, method="average", metric="cosine")
    return fcluster(tree, t=distance_threshold, criterion="distance").astype(np.int64) - 1


def _contingency(clusters: np.ndarray, labels: np.ndarray) -> np.ndarray:
    _, c = np.unique(clusters, return_inverse=True)
    _, y = np.unique(labels, return_inverse=True)
    table = np.zeros((c.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (c, y), 1)
    return table


def clustering_scores(clusters: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """purity = sum over clusters of its largest label count / n; pairwise precision = same-cluster
    pairs that share a label / same-cluster pairs, recall = same-label pairs put in one cluster /
    same-label pairs, F1 their harmonic mean."""
    table = _contingency(np.asarray(clusters), np.asarray(labels))
    n = table.sum()

    def pairs(counts):
        return (counts * (counts - 1) // 2).sum()

    together, both = pairs(table.sum(1)), pairs(table)
    same_label = pairs(table.sum(0))
    precision = both / together if together else 1.0
    recall = both / same_label if same_label else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "purity": float(table.max(1).sum() / n),
        "pairwise_precision": float(precision),
        "pairwise_recall": float(recall),
        "pairwise_f1": float(f1),
        "n_clusters": int(table.shape[0]),
        "n_identities": int(table.shape[1]),
    }


class ClusteringConfig(StrictModel):
    clustering: bool = True
    cluster_distance_threshold: float = Field(0.6, gt=0.0, le=2.0, description="cosine distance cut")


@ANALYSES.register("clustering")
class Clustering(Analysis, title="Clustering", order=40, config=ClusteringConfig):
    """Average-linkage agglomerative clustering cut at a cosine distance: purity, pairwise P/R/F1."""

    cfg: ClusteringConfig

    def run(self, ctx: AnalysisContext) -> AnalysisResult:
        threshold = self.cfg.cluster_distance_threshold
        clusters = agglomerative_clusters(ctx.image_features[ctx.primary], threshold)
        return self.result(clustering_scores(clusters, ctx.labels))
