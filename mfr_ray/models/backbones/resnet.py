"""torchvision ResNet-18/50 adapted to small face crops: a 3x3 stride-1 stem, no max-pool, and the
BN-dropout-FC-BN embedding head in place of global pooling + classifier."""

from __future__ import annotations

import torchvision
from torch import nn

from mfr_ray.models.backbone_config import ARCFACE_TORCH_CONFIG, register_backbone
from mfr_ray.models.embedding_head import EmbeddingHead


class FaceResNet(nn.Module):
    def __init__(self, depth: int, embedding_size: int, input_size: tuple[int, int], dropout: float = 0.0):
        super().__init__()
        self.input_size = tuple(input_size)
        self.embedding_size = embedding_size
        base = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth](weights=None)
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        # Four stages at strides 1, 2, 2, 2 after a stride-1 stem would leave 14x14; stage 1 gets stride 2
        # so a 112x112 input ends at 7x7 as in arcface_torch.
        base.layer1[0].conv1.stride = (2, 2) if depth == 18 else (1, 1)
        if depth == 50:
            base.layer1[0].conv2.stride = (2, 2)
        base.layer1[0].downsample = nn.Sequential(
            nn.Conv2d(64, base.layer1[0].expansion * 64, 1, 2, bias=False),
            nn.BatchNorm2d(base.layer1[0].expansion * 64),
        )
        self.body = nn.Sequential(base.layer1, base.layer2, base.layer3, base.layer4)
        channels = 512 * base.layer1[0].expansion
        self.head = EmbeddingHead(channels, (self.input_size[0] // 16, self.input_size[1] // 16), embedding_size, dropout)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


@register_backbone("resnet18", ARCFACE_TORCH_CONFIG)
def resnet18(**kwargs) -> FaceResNet:
    return FaceResNet(18, **kwargs)


@register_backbone("resnet50", ARCFACE_TORCH_CONFIG)
def resnet50(**kwargs) -> FaceResNet:
    return FaceResNet(50, **kwargs)
