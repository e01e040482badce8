"""facenet-pytorch's Inception-ResNet-v1 (FaceNet, 160x160), built without any pretrained download; the
last linear/BN layers are resized when another embedding size is asked for."""

from __future__ import annotations

from torch import nn

from mfr_ray.models.backbone_config import BackboneConfig, register_backbone

# FaceNet's 160x160 crop (box + margin); the square ArcFace 112x112 crop, upsampled, keeps its aspect ratio
# (a tighter framing), so it is the one resize this backbone declares.
INCEPTION_CONFIG = BackboneConfig(input_size=(160, 160), embedding_size=512, crops=("160x160",),
                                  resized_crops=("112x112",))


@register_backbone("inception_resnet_v1", INCEPTION_CONFIG)
class InceptionResNetV1(nn.Module):
    def __init__(self, embedding_size: int, input_size: tuple[int, int], dropout: float = 0.6):
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
