"""facenet-pytorch's Inception-ResNet-v1 (FaceNet, 160x160), built without any pretrained download; the
last linear/BN layers are resized when another embedding size is asked for."""

from __future__ import annotations

from torch import nn

from mfr_ray.registry import BACKBONES


@BACKBONES.register("inception_resnet_v1")
class InceptionResNetV1(nn.Module):
    def __init__(self, embedding_size: int = 512, input_size=(160, 160), dropout: float = 0.6):
        super().__init__()
        from facenet_pytorch import InceptionResnetV1

        self.input_size = tuple(input_size)
        self.embedding_size = embedding_size
        self.net = InceptionResnetV1(pretrained=None, classify=False, dropout_prob=dropout)
        if embedding_size != self.net.last_linear.out_features:
            self.net.last_linear = nn.Linear(self.net.last_linear.in_features, embedding_size, bias=False)
            self.net.last_bn = nn.BatchNorm1d(embedding_size, eps=0.001, momentum=0.1, affine=True)

    def forward(self, x):
        return self.net(x)
