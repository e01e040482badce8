"""Pair scores by kind of comparison - both faces bare, one masked, both masked - so a package can hold a
threshold per kind: masked faces of different people score higher than bare ones, and a threshold made
for bare faces promises a false accept rate it does not keep on masked ones.

An evaluation writes `pair_scores.npz`: the pair labels and folds, the bare pairs' scores, and per
masked variant V the scores of (bare left, V right) and (V left, V right). `mfr export` calibrates each
kind on the scores of every masked variant pooled."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNMASKED_UNMASKED, MASKED_UNMASKED, MASKED_MASKED = "unmasked-unmasked", "masked-unmasked", "masked-masked"
KINDS = (UNMASKED_UNMASKED, MASKED_UNMASKED, MASKED_MASKED)
PAIR_SCORES_FILE = "pair_scores.npz"


def plain_protocol(protocols):
    """The protocol a service can reproduce per pair (no training-fold mean): what packages score with."""
    return next((p for p in protocols if not p.subtract_train_mean), None)


def kind_of(masked: list[bool]) -> str:
    """The kind of a comparison of faces judged masked or not."""
    return (UNMASKED_UNMASKED, MASKED_UNMASKED, MASKED_MASKED)[sum(masked)]


@dataclass
class KindScores:
    """Scores per kind, each pooled over the masked variants it came from."""

    same: np.ndarray
    fold: np.ndarray
    scores: dict[str, np.ndarray]  # "unmasked-unmasked", "masked-unmasked/V", "masked-masked/V"

    def variants(self, kind: str) -> list[str]:
        return sorted(k.split("/", 1)[1] for k in self.scores if k.startswith(kind + "/"))

    def pooled(self, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(scores, same) of `kind` over all its variants, or None when the evaluation had none."""
        if kind == UNMASKED_UNMASKED:
            return self.scores[kind], self.same
        parts = [self.scores[f"{kind}/{v}"] for v in self.variants(kind)]
        return (np.concatenate(parts), np.tile(self.same, len(parts))) if parts else None

    def save(self, path: Path) -> None:
        np.savez(path, same=self.same, fold=self.fold, **{f"score:{k}": v for k, v in self.scores.items()})

    @classmethod
    def load(cls, path: Path) -> KindScores:
        with np.load(path) as data:
            scores = {k[len("score:"):]: data[k] for k in data.files if k.startswith("score:")}
            return cls(data["same"], data["fold"], scores)


def kind_scores(features: dict[str, np.ndarray], keys: list[str], pairs, primary: str) -> KindScores:
    """Cosine scores of every kind from per-variant image features (rows in `keys` order)."""
    from mfr_ray.evaluation.verification import cosine_scores

    index = {k: i for i, k in enumerate(keys)}
    left, right = [index[k] for k in pairs.left], [index[k] for k in pairs.right]
    bare = features[primary]
    scores = {UNMASKED_UNMASKED: cosine_scores(bare[left], bare[right])}
    for variant, masked in features.items():
        if variant != primary:
            scores[f"{MASKED_UNMASKED}/{variant}"] = cosine_scores(bare[left], masked[right])
            scores[f"{MASKED_MASKED}/{variant}"] = cosine_scores(masked[left], masked[right])
    return KindScores(pairs.same, pairs.fold, scores)
