"""The embedding head shared by the ResNet-family backbones: BN -> dropout -> FC -> BN (arcface_torch's
"OE" output layer), mapping the final feature map to an embedding of any size."""

from __future__ import annotations

from torch import nn


class EmbeddingHead(nn.Module):
    def __init__(self, channels: int, feature_hw: tuple[int, int], embedding_size: int, dropout: float = 0.0):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * feature_hw[0] * feature_hw[1], embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x):
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))
