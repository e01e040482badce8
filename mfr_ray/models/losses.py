"""Losses for mask-robust training: the triplet loss with online mining (batch-hard, semi-hard), the
pairwise distillation losses between the masked and unmasked embedding of the same image, and the
"dynamic balancing" mask that counts distillation only where both samples are classified correctly."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


# -- triplet ---------------------------------------------------------------------------------------------
def pairwise_squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """(n, n) squared Euclidean distances of L2-normalised embeddings (FaceNet's distance)."""
    x = F.normalize(embeddings.float())
    return (2.0 - 2.0 * x @ x.T).clamp(min=0.0)


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2,
                 mining: str = "batch_hard") -> torch.Tensor:
    """Triplet loss mined online inside the batch.

    - batch_hard (Hermans et al. 2017): per anchor, its farthest positive against its closest negative;
    - semi_hard (Schroff et al. 2015): per (anchor, positive) pair, the closest negative still farther than
      the positive (d_an > d_ap); when there is none, the farthest negative.
    Anchors without a positive or a negative do not count. Returns the mean hinge over counted terms."""
    d = pairwise_squared_distances(embeddings)
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    inf = torch.tensor(float("inf"), device=d.device)
    if mining == "batch_hard":
        valid = positive.any(1) & negative.any(1)
        hardest_pos = torch.where(positive, d, -inf).max(1).values
        hardest_neg = torch.where(negative, d, inf).min(1).values
        hinge = F.relu(hardest_pos - hardest_neg + margin)[valid]
    elif mining == "semi_hard":
        anchor, pos = positive.nonzero(as_tuple=True)
        d_ap = d[anchor, pos]
        d_an = d[anchor]  # (pairs, n)
        neg = negative[anchor]
        farther = neg & (d_an > d_ap[:, None])
        semi = torch.where(farther, d_an, inf).min(1).values
        fallback = torch.where(neg, d_an, -inf).max(1).values
        chosen = torch.where(farther.any(1), semi, fallback)
        hinge = F.relu(d_ap - chosen + margin)[neg.any(1)]
    else:
        raise ValueError(f"unknown mining {mining!r}; use batch_hard or semi_hard")
    return hinge.mean() if hinge.numel() else embeddings.sum() * 0.0


# -- distillation ----------------------------------------------------------------------------------------
def _squared_euclidean(a: torch.Tensor, b: torch.Tensor, margin: float) -> torch.Tensor:
    return ((a - b) ** 2).sum(1)


def _cosine(a: torch.Tensor, b: torch.Tensor, margin: float) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-8).clamp(-1.0, 1.0)


def _margin_cosine(a: torch.Tensor, b: torch.Tensor, margin: float) -> torch.Tensor:
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-8).clamp(-1.0, 1.0)
    sin = torch.sqrt((1.0 - cos * cos).clamp(min=0.0))
    return 1.0 - (cos * math.cos(margin) - sin * math.sin(margin))


# The margin_distill objective's `distillation` choices (its config's literal, less "none") -> per-pair loss.
DISTILLATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "mse": _squared_euclidean,
    "cosine": _cosine,
    "margin_cosine": _margin_cosine,
}


def pairwise_distillation(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine",
                          margin: float = 0.0) -> torch.Tensor:
    """Per-pair distance between the masked (student) and unmasked (teacher) embedding of one image:
    - "mse": squared Euclidean ||a - b||^2 (= (|a|-|b|)^2 + 2|a||b|(1 - cos): it also pulls norms together);
    - "cosine": 1 - cos(theta), direction only;
    - "margin_cosine": 1 - cos(theta + margin), still pulling when the pair is already aligned.
    Returns a (n,) tensor; reduce it with `balanced_mean`."""
    if kind not in DISTILLATIONS:
        raise ValueError(f"unknown distillation {kind!r}; use {', '.join(DISTILLATIONS)}")
    return DISTILLATIONS[kind](student.float(), teacher.float(), margin)


def dynamic_balancing_mask(logits_masked: torch.Tensor, logits_unmasked: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """1.0 for pairs whose masked and unmasked samples are both classified correctly (arg-max = label),
    else 0.0: distillation only follows a teacher that is right, toward a student that is already close."""
    ok = (logits_masked.argmax(1) == labels) & (logits_unmasked.argmax(1) == labels)
    return ok.float()


def balanced_mean(per_pair: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the counted pairs (all when mask is None); 0 (with gradient graph) when none counts."""
    if mask is None:
        return per_pair.mean()
    return (per_pair * mask).sum() / mask.sum().clamp(min=1.0)
