"""Identity classifiers (KNN, MLP) fit on the reference variant's embeddings, tested on every variant."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mfr_ray.config.base import StrictModel
from mfr_ray.evaluation.analyses.base import Analysis, AnalysisResult
from mfr_ray.evaluation.classifiers import classifier_accuracies, per_identity_split
from mfr_ray.registry import ANALYSES

if TYPE_CHECKING:
    from mfr_ray.evaluation.analyses.context import AnalysisContext


class ClassifiersConfig(StrictModel):
    classifiers: bool = True
    classifier_min_images: int = Field(4, ge=2)
    knn_k: int = Field(1, ge=1)
    mlp_hidden: int = Field(256, ge=1)


@ANALYSES.register("classifiers")
class Classifiers(Analysis, title="Classifiers", order=50, config=ClassifiersConfig):
    """Identities with enough images: the first half of each trains, the rest of every variant tests."""

    cfg: ClassifiersConfig

    def run(self, ctx: AnalysisContext) -> AnalysisResult | None:
        labels, feats = ctx.labels, ctx.image_features
        train, test = per_identity_split(labels, self.cfg.classifier_min_images)
        if not (len(train) and len(test)):
            return None
        test_sets = {v: (x[test], labels[test]) for v, x in feats.items()}
        accuracies = classifier_accuracies(
            feats[ctx.primary][train], labels[train], test_sets, self.cfg.knn_k, self.cfg.mlp_hidden
        )
        return self.result(accuracies | {"n_train": len(train), "n_test": len(test)})
