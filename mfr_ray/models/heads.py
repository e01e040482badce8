"""Classification heads for training, registered by name in `mfr_ray.registry.HEADS`:
`create_head(name, in_features, num_classes)`.

Margin heads (ArcFace, CosFace) take the embeddings and labels and return logits for cross-entropy;
the plain softmax head is a linear layer and ignores the labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mfr_ray.registry import HEADS


def create_head(name: str, in_features: int, num_classes: int, **kwargs) -> nn.Module:
    return HEADS.create(name, in_features, num_classes, **kwargs)


class _CosineHead(nn.Module):
    """Cosine between L2-normalised embeddings and L2-normalised class centres."""

    def __init__(self, in_features: int, num_classes: int, s: float):
        super().__init__()
        self.s = s
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(-1.0, 1.0)

    def margin_target(self, cos_target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings)
        target = cos.gather(1, labels.view(-1, 1))
        logits = cos.scatter(1, labels.view(-1, 1), self.margin_target(target))
        return logits * self.s


@HEADS.register("arcface")
class ArcFace(_CosineHead):
    """Additive angular margin (Deng et al. 2019): target logit s*cos(theta + m).

    cos(theta + m) = cos*cos(m) - sin*sin(m) with sin = sqrt(1 - cos^2) clamped at 0 (no NaN at |cos|=1).
    Past theta = pi - m the function stops decreasing; there the logit continues as the CosFace-like
    cos - m*sin(m) ("th/mm trick") so the target logit stays monotonic in theta; `easy_margin` instead
    applies the margin only where cos > 0."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5, easy_margin: bool = False):
        super().__init__(in_features, num_classes, s)
        self.m = m
        self.easy_margin = easy_margin
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def margin_target(self, cos: torch.Tensor) -> torch.Tensor:
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=0.0))
        phi = cos * self.cos_m - sin * self.sin_m
        if self.easy_margin:
            return torch.where(cos > 0, phi, cos)
        return torch.where(cos > self.th, phi, cos - self.mm)


@HEADS.register("cosface")
class CosFace(_CosineHead):
    """Large margin cosine (Wang et al. 2018): target logit s*(cos - m)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.35):
        super().__init__(in_features, num_classes, s)
        self.m = m

    def margin_target(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.m


@HEADS.register("softmax")
class SoftmaxHead(nn.Module):
    """Plain linear classifier (the softmax-loss baseline)."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes, bias=bias)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(embeddings)
