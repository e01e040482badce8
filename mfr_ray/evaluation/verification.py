"""Face verification metrics, pure numpy and vectorised: pair lists, k-fold thresholds, FAR-based
operating points, ROC and EER.

Conventions (used everywhere in mfr-ray):
- A pair's score is the cosine similarity of two L2-normalised embeddings; the pair is *accepted* as
  "same person" when score >= threshold. (Cosine distance is 1 - score, so "the largest distance whose
  FAR <= target" is the smallest similarity threshold whose FAR <= target.)
- FAR (false accept rate) = accepted impostor pairs / impostor pairs; TPR = accepted genuine pairs /
  genuine pairs; accuracy = correct decisions / pairs.
- k-fold protocol (LFW View 2): for each test fold every threshold is chosen on the other k-1 folds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from mfr_ray.evaluation.metric_names import AT_FAR_METRICS, metric_key


# -- pair lists ------------------------------------------------------------------------------------------
@dataclass
class PairList:
    """Pairs of image keys with same/different labels and a fold per pair."""

    left: list[str]
    right: list[str]
    same: np.ndarray  # bool (n,)
    fold: np.ndarray  # int (n,)
    has_official_folds: bool = True

    def __len__(self) -> int:
        return len(self.left)

    @property
    def n_folds(self) -> int:
        return int(self.fold.max()) + 1 if len(self.fold) else 0

    def keys(self) -> list[str]:
        """Distinct image keys in first-seen order."""
        return list(dict.fromkeys(self.left + self.right))

    def first_per_fold(self, per_class: int) -> np.ndarray:
        """Mask keeping the first `per_class` genuine and impostor pairs of every fold (file order)."""
        keep = np.zeros(len(self), dtype=bool)
        for f in np.unique(self.fold):
            for label in (True, False):
                keep[np.flatnonzero((self.fold == f) & (self.same == label))[:per_class]] = True
        return keep

    def subset(self, mask: np.ndarray) -> PairList:
        idx = np.flatnonzero(mask)
        return PairList(
            [self.left[i] for i in idx], [self.right[i] for i in idx], self.same[idx], self.fold[idx],
            self.has_official_folds,
        )


def _pair_keys(fields: list[str], key_format: str) -> tuple[str, str, bool]:
    if len(fields) == 3:
        name, i, j = fields
        return key_format.format(name=name, index=int(i)), key_format.format(name=name, index=int(j)), True
    if len(fields) == 4:
        name_a, i, name_b, j = fields
        return key_format.format(name=name_a, index=int(i)), key_format.format(name=name_b, index=int(j)), False
    raise ValueError(f"pair line must have 3 or 4 fields, got {fields!r}")


def deterministic_folds(same: np.ndarray, n_folds: int) -> np.ndarray:
    """Fold ids for a list without folds: genuine and impostor pairs are each cut, in file order, into
    n_folds contiguous, near-equal parts, so every fold keeps the class balance."""
    fold = np.empty(len(same), dtype=np.int64)
    for label in (True, False):
        idx = np.flatnonzero(same == label)
        fold[idx] = np.arange(len(idx)) * n_folds // max(len(idx), 1)
    return fold


def parse_pairs(
    text: str, key_format: str = "{name}/{name}_{index:04d}.jpg", n_folds: int = 10
) -> PairList:
    """Parse an LFW-style pairs file ("10<TAB>300" header, or a single count for View 1) or a headerless
    list such as MFR2's (no folds: split into `n_folds` deterministically)."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    header = lines[0] if lines and len(lines[0]) <= 2 and all(f.isdigit() for f in lines[0]) else None
    body = lines[1:] if header else lines
    left, right, same = [], [], []
    for fields in body:
        a, b, s = _pair_keys(fields, key_format)
        left.append(a)
        right.append(b)
        same.append(s)
    same_arr = np.array(same, dtype=bool)
    if header is not None:
        sets, per_set = (int(header[0]), int(header[1])) if len(header) == 2 else (1, int(header[0]))
        if len(body) != sets * per_set * 2:
            raise ValueError(f"pairs header says {sets}x{per_set}x2 pairs, file has {len(body)}")
        fold = np.arange(len(body)) // (2 * per_set)
        return PairList(left, right, same_arr, fold.astype(np.int64), has_official_folds=sets > 1)
    return PairList(left, right, same_arr, deterministic_folds(same_arr, n_folds), has_official_folds=False)


def read_pairs(path: str | Path, key_format: str = "{name}/{name}_{index:04d}.jpg", n_folds: int = 10) -> PairList:
    return parse_pairs(Path(path).read_text(), key_format, n_folds)


# -- scores ----------------------------------------------------------------------------------------------
def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_scores(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) embedding arrays."""
    return np.einsum("ij,ij->i", l2_normalize(left), l2_normalize(right))


# -- thresholds ------------------------------------------------------------------------------------------
def best_accuracy_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Threshold with the highest accuracy on (scores, same), and that accuracy.

    Candidates are "accept the top i scores" for every i (including none and all); among equally good
    cuts the highest is taken, and the threshold is set midway between the last accepted and the first
    rejected score, so it does not sit on a training score."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    n, n_pos = len(s), int(y.sum())
    # cut i accepts s[:i]; only cuts between distinct scores are valid.
    tp = np.concatenate([[0], np.cumsum(y)])
    fp = np.concatenate([[0], np.cumsum(~y)])
    correct = tp + (n - n_pos - fp)
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[:-1] > s[1:]
    cut = int(np.argmax(np.where(valid, correct, -1)))
    if cut == 0:
        threshold = float(s[0]) + 1e-6 if n else 0.0
    elif cut == n:
        threshold = float(s[-1]) - 1e-6
    else:
        threshold = float((s[cut - 1] + s[cut]) / 2)
    return threshold, correct[cut] / n


def far_threshold(impostor_scores: np.ndarray, target_far: float) -> float:
    """Smallest similarity threshold whose FAR on `impostor_scores` is <= target_far (= the largest cosine
    distance meeting the target). With n impostors at most floor(target * n) may be accepted; the
    threshold lies just above the next impostor score (np.nextafter), so ties never leak through."""
    imp = np.sort(np.asarray(impostor_scores, dtype=np.float64))[::-1]
    allowed = int(np.floor(target_far * len(imp) + 1e-9))
    if allowed >= len(imp):
        return -np.inf
    return float(np.nextafter(imp[allowed], np.inf))


def rates(scores: np.ndarray, same: np.ndarray, threshold: float) -> dict[str, float]:
    accept = scores >= threshold
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    tp = int((accept & same).sum())
    fp = int((accept & ~same).sum())
    return {
        "tpr": tp / n_pos if n_pos else float("nan"),
        "far": fp / n_neg if n_neg else float("nan"),
        "accuracy": (tp + n_neg - fp) / len(scores) if len(scores) else float("nan"),
        "false_accepts": fp,
        "n_impostor": n_neg,
    }


# -- k-fold protocol -------------------------------------------------------------------------------------
@dataclass
class FoldResult:
    fold: int
    best_threshold: float
    accuracy: float
    far_thresholds: dict[float, float] = field(default_factory=dict)
    at_far: dict[float, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class MeanStd:
    """A metric over the folds: mean and population std (ddof=0, as the LFW literature reports)."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: list[float]) -> MeanStd:
        array = np.array(values, dtype=np.float64)
        return cls(float(array.mean()), float(array.std()))


@dataclass(frozen=True)
class OperatingPoint:
    """The fold statistics at one FAR target (threshold chosen on the training folds)."""

    tpr: MeanStd
    accuracy: MeanStd
    far: MeanStd


@dataclass(frozen=True)
class VerificationSummary(Mapping[str, float]):
    """The k-fold summary, typed (`summary.at_far[1e-3].tpr.mean`) and, as a mapping, under the flat names
    MLflow, the reports and users' dashboards know (`summary["tpr_at_far0.1pct_mean"]`)."""

    accuracy: MeanStd
    at_far: dict[float, OperatingPoint]

    def value(self, metric: str, far: float | None = None, stat: str = "mean") -> float:
        """`metric` ("accuracy", or one of AT_FAR_METRICS with `far`) and `stat` ("mean"/"std")."""
        stats = self.accuracy if far is None else getattr(self.at_far[far], metric)
        return getattr(stats, stat)

    def as_dict(self) -> dict[str, float]:
        return dict(self._flat)

    @cached_property
    def _flat(self) -> dict[str, float]:
        out = {metric_key("accuracy", stat=s): getattr(self.accuracy, s) for s in ("mean", "std")}
        for target, point in self.at_far.items():
            for metric in AT_FAR_METRICS:
                stats = getattr(point, metric)
                out |= {metric_key(metric, target, s): getattr(stats, s) for s in ("mean", "std")}
        return out

    def __getitem__(self, key: str) -> float:
        return self._flat[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat)

    def __len__(self) -> int:
        return len(self._flat)


@dataclass
class VerificationResult:
    folds: list[FoldResult]
    far_targets: list[float]

    def summary(self) -> VerificationSummary:
        """mean and std over folds of the accuracy and of each FAR target's operating point."""
        return VerificationSummary(
            MeanStd.of([f.accuracy for f in self.folds]),
            {
                target: OperatingPoint(**{
                    metric: MeanStd.of([fold.at_far[target][metric] for fold in self.folds])
                    for metric in AT_FAR_METRICS
                })
                for target in self.far_targets
            },
        )

    def fold_table(self) -> list[dict[str, float]]:
        rows = []
        for f in self.folds:
            row = {"fold": f.fold, "best_threshold": f.best_threshold, "accuracy": f.accuracy}
            for target in self.far_targets:
                row[metric_key("threshold", target, stat=None)] = f.far_thresholds[target]
                for metric, value in f.at_far[target].items():
                    row[metric_key(metric, target, stat=None)] = value
            rows.append(row)
        return rows


def kfold_verification(
    scores: np.ndarray, same: np.ndarray, fold: np.ndarray, far_targets: list[float] | tuple[float, ...] = (1e-3,)
) -> VerificationResult:
    """The k-fold protocol. `scores` is (n,) or (k, n): row f holds the scores used while fold f is the
    test fold (protocols that fit something, e.g. a feature mean, on the training folds)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    fold = np.asarray(fold)
    folds = []
    for row, f in enumerate(np.unique(fold)):
        s = scores[row] if scores.ndim == 2 else scores
        train, test = fold != f, fold == f
        if not train.any():  # a single fold: fit and test on the same pairs
            train = test
        threshold, _ = best_accuracy_threshold(s[train], same[train])
        result = FoldResult(int(f), threshold, rates(s[test], same[test], threshold)["accuracy"])
        for target in far_targets:
            t = far_threshold(s[train & ~same], target)
            result.far_thresholds[target] = t
            result.at_far[target] = rates(s[test], same[test], t)
        folds.append(result)
    return VerificationResult(folds, list(far_targets))


# -- ROC / EER -------------------------------------------------------------------------------------------
def roc_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tpr, thresholds) at every distinct score, from accepting nothing to accepting everything."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    last_of_tie = np.r_[s[:-1] > s[1:], True]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    far = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    thresholds = np.r_[np.inf, s[last_of_tie]]
    return far, tpr, thresholds


def auc(far: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.trapezoid(tpr, far))


def equal_error_rate(far: np.ndarray, tpr: np.ndarray) -> float:
    """Where FAR equals the false reject rate 1 - TPR, linearly interpolated along the ROC."""
    frr = 1.0 - tpr
    diff = far - frr  # rises from -1 to +1 along the curve
    i = int(np.searchsorted(diff, 0.0))
    if i == 0:
        return float(far[0])
    if i >= len(diff):
        return float(far[-1])
    w = -diff[i - 1] / (diff[i] - diff[i - 1])
    return float(far[i - 1] + w * (far[i] - far[i - 1]))


def mean_subtracted_scores(
    left: np.ndarray, right: np.ndarray, fold: np.ndarray
) -> np.ndarray:
    """The Xiaoccer/SphereFace LFW protocol: for each test fold subtract the mean feature of the training
    folds' images, L2-normalise, cosine. Returns (k, n) scores for `kfold_verification`."""
    folds = np.unique(fold)
    out = np.empty((len(folds), len(left)))
    for row, f in enumerate(folds):
        train = fold != f
        if not train.any():
            train = fold == f
        mu = np.concatenate([left[train], right[train]]).mean(0)
        out[row] = cosine_scores(left - mu, right - mu)
    return out
