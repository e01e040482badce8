"""MobileFaceNet (Chen et al., CCBR 2018, arXiv:1804.07573), laid out so that the Xiaoccer CASIA
checkpoint (`${shared}/weights/mobilefacenet_casia.ckpt`) loads with strict=True: module names conv1,
dw_conv1, blocks.N.conv.K, conv2, linear7, linear1."""

from __future__ import annotations

from torch import nn

from mfr_ray.models.backbone_config import BackboneConfig, register_backbone

# (expansion t, output channels c, repeats n, first stride s), from the paper's Table 1.
BOTTLENECK_SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> optional per-channel PReLU; submodule names match the checkpoint."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, groups=1, activation=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout) if activation else None

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.prelu(x) if self.prelu is not None else x


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 linear projection; identity when shapes agree."""

    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


# Built for the SphereFace 112x96 crop (the CASIA checkpoint); 112x112 with `kwargs: {input_size: [112, 112]}`.
MOBILEFACENET_CONFIG = BackboneConfig(input_size=(112, 96), embedding_size=128, crops=("112x96", "112x112"))


@register_backbone("mobilefacenet", MOBILEFACENET_CONFIG)
class MobileFaceNet(nn.Module):
    def __init__(self, embedding_size: int, input_size: tuple[int, int]):
        super().__init__()
        self.input_size = tuple(input_size)
        self.embedding_size = embedding_size
        self.conv1 = ConvBlock(3, 64, 3, 2, 1)
        self.dw_conv1 = ConvBlock(64, 64, 3, 1, 1, groups=64)
        blocks, cin = [], 64
        for expansion, cout, repeats, stride in BOTTLENECK_SETTINGS:
            for i in range(repeats):
                blocks.append(Bottleneck(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = ConvBlock(cin, 512, 1)
        # Global depthwise conv over the final map (7x6 for 112x96 input: four stride-2 stages).
        final_hw = (self.input_size[0] // 16, self.input_size[1] // 16)
        self.linear7 = ConvBlock(512, 512, final_hw, groups=512, activation=False)
        self.linear1 = ConvBlock(512, embedding_size, 1, activation=False)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.dw_conv1(self.conv1(x))
        x = self.conv2(self.blocks(x))
        x = self.linear1(self.linear7(x))
        return x.flatten(1)
