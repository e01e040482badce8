"""Heads and losses against numbers worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mfr_ray.models import create_head
from mfr_ray.models.losses import (
    DISTILLATIONS,
    balanced_mean,
    dynamic_balancing_mask,
    pairwise_distillation,
    triplet_loss,
)
from mfr_ray.registry import HEADS
from mfr_ray.train.objectives.margin_distill import MarginDistillObjective


def _unit_head(name, **kw):
    head = create_head(name, 2, 2, **kw)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    return head


def test_arcface_by_hand():
    head = _unit_head("arcface", s=10.0, m=0.5)
    # Embedding along class 0: theta = 0 -> target logit 10*cos(0.5); the other class is 10*cos(90deg) = 0.
    logits = head(torch.tensor([[3.0, 0.0]]), torch.tensor([0]))
    assert logits[0].tolist() == pytest.approx([10 * math.cos(0.5), 0.0], abs=1e-5)
    # Target at theta = 160deg > pi - m (151.4deg): past the turning point the logit is cos - sin(pi - m)*m.
    cos160 = math.cos(math.radians(160))
    x = torch.tensor([[cos160, math.sin(math.radians(160))]])
    logits = head(x, torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(10 * (cos160 - math.sin(math.pi - 0.5) * 0.5), abs=1e-5)
    # easy margin keeps the plain cosine where cos <= 0.
    easy = _unit_head("arcface", s=10.0, m=0.5, easy_margin=True)
    assert easy(x, torch.tensor([0]))[0, 0].item() == pytest.approx(10 * cos160, abs=1e-5)
    # |cos| = 1 exactly must not give NaN gradients.
    x = torch.tensor([[2.0, 0.0]], requires_grad=True)
    head(x, torch.tensor([0])).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_cosface_and_softmax():
    head = _unit_head("cosface", s=10.0, m=0.35)
    logits = head(torch.tensor([[1.0, 1.0]]), torch.tensor([1]))
    c = 1 / math.sqrt(2)
    assert logits[0].tolist() == pytest.approx([10 * c, 10 * (c - 0.35)], abs=1e-5)
    assert create_head("softmax", 8, 5)(torch.zeros(3, 8)).shape == (3, 5)


@pytest.mark.parametrize("name", HEADS.names())
def test_every_head_gives_one_logit_per_class_and_a_gradient(name):
    """Each registered head (a new one included) maps labelled embeddings to finite logits per class that
    cross-entropy can train through."""
    torch.manual_seed(0)
    head = create_head(name, 8, 5)
    x = torch.randn(3, 8, requires_grad=True)
    logits = head(x, torch.tensor([0, 2, 4]))
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2, 4])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_distillation_losses_by_hand():
    a = torch.tensor([[3.0, 4.0]])  # |a| = 5
    b = torch.tensor([[2.0, 0.0]])  # |b| = 2, cos = 6/10 = 0.6
    mse = pairwise_distillation(a, b, "mse")
    assert mse.item() == pytest.approx(17.0)  # (3-2)^2 + 4^2
    # ||a-b||^2 = (|a|-|b|)^2 + 2|a||b|(1-cos) = 9 + 20*0.4 = 17
    assert mse.item() == pytest.approx((5 - 2) ** 2 + 2 * 5 * 2 * (1 - 0.6))
    assert pairwise_distillation(a, b, "cosine").item() == pytest.approx(0.4)
    # 1 - cos(theta + 0.5) with cos theta = 0.6, sin theta = 0.8
    expected = 1 - (0.6 * math.cos(0.5) - 0.8 * math.sin(0.5))
    assert pairwise_distillation(a, b, "margin_cosine", margin=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_dynamic_balancing_counts_only_pairs_both_right():
    labels = torch.tensor([0, 1, 1])
    masked = torch.tensor([[2.0, 1.0], [3.0, 0.0], [0.0, 1.0]])    # right, wrong, right
    unmasked = torch.tensor([[5.0, 1.0], [0.0, 1.0], [2.0, 1.0]])  # right, right, wrong
    mask = dynamic_balancing_mask(masked, unmasked, labels)
    assert mask.tolist() == [1.0, 0.0, 0.0]
    per_pair = torch.tensor([0.3, 0.9, 0.7])
    assert balanced_mean(per_pair, mask).item() == pytest.approx(0.3)
    assert balanced_mean(per_pair, torch.zeros(3)).item() == 0.0
    assert balanced_mean(per_pair).item() == pytest.approx(1.9 / 3)


def test_triplet_mining_by_hand():
    # 1-D points on the unit circle (angles), labels A A B B. Squared chord distance = 2 - 2 cos(delta).
    angles = torch.tensor([0.0, 0.4, 0.5, 1.5])
    x = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    labels = torch.tensor([0, 0, 1, 1])

    def d(i, j):
        return 2 - 2 * math.cos(float(angles[i] - angles[j]))

    m = 0.2
    # batch hard: anchor0 pos1 neg2; anchor1 pos0 neg2; anchor2 pos3 neg1; anchor3 pos2 neg1
    terms = [d(0, 1) - d(0, 2), d(1, 0) - d(1, 2), d(2, 3) - d(2, 1), d(3, 2) - d(3, 1)]
    expected = sum(max(t + m, 0) for t in terms) / 4
    assert triplet_loss(x, labels, m, "batch_hard").item() == pytest.approx(expected, abs=1e-6)
    # semi-hard: per (anchor, positive) the closest negative farther than the positive, else the farthest.
    # e.g. (1, 0): d_ap = 0.159, negative 2 is closer (0.020), so negative 3 (1.455) is chosen.
    semi_terms = []
    for a, p in [(0, 1), (1, 0), (2, 3), (3, 2)]:
        negs = [n for n in range(4) if labels[n] != labels[a]]
        farther = [d(a, n) for n in negs if d(a, n) > d(a, p)]
        chosen = min(farther) if farther else max(d(a, n) for n in negs)
        semi_terms.append(max(d(a, p) - chosen + m, 0))
    assert triplet_loss(x, labels, m, "semi_hard").item() == pytest.approx(sum(semi_terms) / 4, abs=1e-6)
    assert semi_terms[1] == 0.0 and max(terms[1] + m, 0) > 0  # batch-hard keeps (1, 0, 2); semi-hard does not


def test_every_distillation_choice_has_its_loss():
    """The margin_distill config's choices (less `none`) are exactly the per-pair losses there are."""
    from typing import get_args

    choices = set(get_args(MarginDistillObjective.model_fields["distillation"].annotation)) - {"none"}
    assert choices == set(DISTILLATIONS)
    with pytest.raises(ValueError, match="unknown distillation 'l1'; use mse, cosine, margin_cosine"):
        pairwise_distillation(torch.ones(1, 2), torch.ones(1, 2), "l1")
