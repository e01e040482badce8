"""Adding a backbone is one file and one line: a small network written to a temporary folder, with nothing
else changed, is registered with its default config, validated against the crop layouts, evaluated on 8
LFW pairs and exported as a package that embeds with its declared size and normalisation."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from pydantic import ValidationError

from mfr_ray.registry import ANALYSES, BACKBONES

NEW_BACKBONE = '''
from torch import nn

from mfr_ray.models.backbone_config import BackboneConfig, Normalisation, register_backbone


@register_backbone("tiny_net", BackboneConfig(input_size=(112, 96), embedding_size=16, crops=("112x96",),
                                              normalisation=Normalisation(pixel_mean=128.0, pixel_scale=64.0)))
class TinyNet(nn.Module):
    def __init__(self, embedding_size: int, input_size: tuple[int, int]):
        super().__init__()
        self.input_size, self.embedding_size = tuple(input_size), embedding_size
        self.body = nn.Sequential(nn.Conv2d(3, 8, 5, 4), nn.PReLU(8), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(32, embedding_size))

    def forward(self, x):
        return self.body(x)
'''


@pytest.fixture
def tiny_net(tmp_path, monkeypatch):
    """The new backbone's file imported from a temporary folder; the registry is restored afterwards."""
    monkeypatch.setattr(BACKBONES, "_entries", dict(BACKBONES.items()))
    (tmp_path / "tiny_backbone.py").write_text(NEW_BACKBONE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("tiny_backbone")
    yield "tiny_net"
    sys.modules.pop("tiny_backbone", None)


def test_a_new_backbone_file_is_validated_evaluated_and_exported(tiny_net, lfw_dir, tmp_path):
    from mfr_ray.config.common import TrackingConfig
    from mfr_ray.evaluation.config import EvaluateConfig
    from mfr_ray.evaluation.runner import evaluate
    from mfr_ray.evaluation.sources import ImageSourceConfig, load_crops
    from mfr_ray.models import create_backbone
    from mfr_ray.serve.export import export_package
    from mfr_ray.serve.package import PACKAGE_JSON, load_package

    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(create_backbone(tiny_net).state_dict(), checkpoint)
    model = {"backbone": tiny_net, "checkpoint": str(checkpoint)}
    with pytest.raises(ValidationError, match=r"sources\.unmasked\.align\.crop"):
        EvaluateConfig(model=model, sources={"unmasked": {"align": {"crop": "112x112"}}})
    cfg = EvaluateConfig(
        name="tiny", model=model, pairs={"limit_folds": 2, "max_pairs_per_fold": 4}, flip=False,
        sources={"unmasked": {"align": {"skip_detection": True}}}, protocols=[{"name": "single", "feature": "single"}],
        analyses={name: False for name in ANALYSES.names()},
        cache_dir=None, output_dir=str(tmp_path / "eval"), tracking={"enabled": False},
    )
    summary = evaluate(cfg, progress=False)
    assert summary["n_pairs"] == 8 and 0.0 <= summary["verification"][0]["accuracy_mean"] <= 1.0

    out = tmp_path / "package"
    export_package(str(checkpoint), out, backbone=tiny_net, tracking=TrackingConfig(enabled=False))
    pre = json.loads((out / PACKAGE_JSON).read_text())["preprocessing"]
    assert pre["normalisation"]["pixel_mean"] == 128.0 and pre["normalisation"]["pixel_scale"] == 64.0
    assert pre["input_size_hw"] == [112, 96]
    crops = load_crops(ImageSourceConfig(uri=str(lfw_dir), align={"skip_detection": True}),
                       ["Abdullah_Gul/Abdullah_Gul_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0002.jpg"]).crops
    features = load_package(out).embed_crops(crops)
    assert features.shape == (2, 16) and abs(float((features**2).sum(1).mean()) - 1.0) < 1e-4
