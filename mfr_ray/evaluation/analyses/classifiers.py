"""Identity classifiers on frozen embeddings (k-nearest neighbours on cosine similarity and a small MLP),
fit on the reference variant's embeddings of some images of each identity, tested on the others in every
variant."""

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


def per_identity_split(labels: np.ndarray, min_images: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Identities with >= min_images images: their first half (array order) trains, the rest tests."""
    labels = np.asarray(labels)
    train, test = [], []
    for name in np.unique(labels):
        idx = np.flatnonzero(labels == name)
        if len(idx) >= min_images:
            half = len(idx) // 2
            train.extend(idx[:half])
            test.extend(idx[half:])
    return np.array(train, dtype=np.int64), np.array(test, dtype=np.int64)


def knn_predict(train_x, train_y, test_x, k: int = 1) -> np.ndarray:
    """Majority vote of the k most similar training embeddings (cosine); ties go to the nearest."""
    sim = l2_normalize(test_x) @ l2_normalize(train_x).T
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    train_y = np.asarray(train_y)
    out = []
    for row in nearest:
        names, first, counts = np.unique(train_y[row], return_index=True, return_counts=True)
        best = np.flatnonzero(counts == counts.max())
        out.append(names[best[np.argmin(first[best])]])
    return np.array(out)


def classifier_accuracies(
    train_x, train_y, test_sets: dict[str, tuple[np.ndarray, np.ndarray]], k: int = 1, hidden: int = 256, seed: int = 0
) -> dict[str, float]:
    """Accuracy of KNN and MLP (fit once on the training set) on each named test set."""
    from sklearn.neural_network import MLPClassifier

    mlp = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed)
    mlp.fit(l2_normalize(train_x), train_y)
    out = {}
    for name, (x, y) in test_sets.items():
        out[f"knn{k}_{name}"] = float((knn_predict(train_x, train_y, x, k) == np.asarray(y)).mean())
        out[f"mlp_{name}"] = float((mlp.predict(l2_normalize(x)) == np.asarray(y)).mean())
    return out


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
