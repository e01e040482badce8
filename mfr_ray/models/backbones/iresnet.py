"""Improved ResNet (IR) backbones in the arcface_torch style: pre-activation blocks
BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, with the BN-dropout-FC-BN embedding head."""

from __future__ import annotations

from torch import nn

from mfr_ray.models.backbone_config import ARCFACE_TORCH_CONFIG, register_backbone
from mfr_ray.models.embedding_head import EmbeddingHead

STAGE_DEPTHS = {18: (2, 2, 2, 2), 50: (3, 4, 14, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)


class IRBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    def __init__(self, depth: int, embedding_size: int, input_size: tuple[int, int], dropout: float = 0.0):
        super().__init__()
        self.input_size = tuple(input_size)
        self.embedding_size = embedding_size
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        blocks, cin = [], 64
        for width, repeats in zip(STAGE_WIDTHS, STAGE_DEPTHS[depth], strict=True):
            for i in range(repeats):
                blocks.append(IRBlock(cin, width, 2 if i == 0 else 1))
                cin = width
        self.body = nn.Sequential(*blocks)
        self.head = EmbeddingHead(cin, (self.input_size[0] // 16, self.input_size[1] // 16), embedding_size, dropout)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


@register_backbone("iresnet18", ARCFACE_TORCH_CONFIG)
def iresnet18(**kwargs) -> IResNet:
    return IResNet(18, **kwargs)


@register_backbone("iresnet50", ARCFACE_TORCH_CONFIG)
def iresnet50(**kwargs) -> IResNet:
    return IResNet(50, **kwargs)
