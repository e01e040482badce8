"""Clustering of the reference variant's embeddings, scored against the identities."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mfr_ray.config.base import StrictModel
from mfr_ray.evaluation.analyses.base import Analysis, AnalysisResult
from mfr_ray.evaluation.clustering import agglomerative_clusters, clustering_scores
from mfr_ray.registry import ANALYSES

if TYPE_CHECKING:
    from mfr_ray.evaluation.analyses.context import AnalysisContext


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
