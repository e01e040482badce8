"""Backbone registry: the shared MobileFaceNet checkpoint loads strictly; every backbone's output shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfr_ray.models import create_backbone, list_backbones, load_backbone, preprocess


def test_mobilefacenet_loads_shared_checkpoint_strictly(shared):
    path = shared / "weights" / "mobilefacenet_casia.ckpt"
    model = load_backbone("mobilefacenet", path).eval()  # strict=True: every key and shape must match
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)["net_state_dict"]
    assert set(model.state_dict()) == set(checkpoint)
    assert sum(p.numel() for p in model.parameters()) == 999_552
    assert torch.equal(model.state_dict()["linear7.conv.weight"], checkpoint["linear7.conv.weight"])
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 112, 96))
    assert out.shape == (2, 128) and torch.isfinite(out).all()


def test_load_backbone_accepts_our_checkpoint_layouts(tmp_path):
    model = create_backbone("iresnet18", embedding_size=64)
    for i, layout in enumerate([model.state_dict(), {"model": model.state_dict(), "epoch": 3}]):
        torch.save(layout, tmp_path / f"ckpt{i}.pt")
        loaded = load_backbone("iresnet18", tmp_path / f"ckpt{i}.pt", embedding_size=64)
        assert torch.equal(loaded.state_dict()["head.fc.weight"], model.state_dict()["head.fc.weight"])
    with pytest.raises(RuntimeError):  # wrong embedding size: strict load refuses
        load_backbone("iresnet18", tmp_path / "ckpt0.pt", embedding_size=128)


@pytest.mark.parametrize("name", ["mobilefacenet", "inception_resnet_v1", "resnet18", "resnet50",
                                  "iresnet18", "iresnet50"])
def test_forward_shapes(name):
    assert name in list_backbones()
    model = create_backbone(name, embedding_size=96).eval()
    h, w = model.input_size
    with torch.inference_mode():
        out = model(torch.randn(2, 3, h, w))
    assert out.shape == (2, 96) and model.embedding_size == 96


def test_preprocess_scales_and_transposes():
    crops = np.zeros((1, 2, 3, 3), dtype=np.uint8)
    crops[0, 1, 2] = [255, 0, 128]
    x = preprocess(crops)
    assert x.shape == (1, 3, 2, 3)
    assert x[0, :, 1, 2].tolist() == pytest.approx([127.5 / 128, -127.5 / 128, 0.5 / 128])


def test_registries_find_their_entries_by_package():
    """A fresh interpreter that imports no backbone or head module finds every one through the one registry
    (a backbone by being in mfr_ray/models/backbones/); an unknown name is refused with the known ones."""
    import subprocess
    import sys

    code = (
        "import sys; from mfr_ray.registry import BACKBONES, HEADS; "
        "assert 'mfr_ray.models.backbones.resnet' not in sys.modules; "
        "print(' '.join(BACKBONES.names()), '|', ' '.join(HEADS.names()))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    backbones, heads = (part.split() for part in out.split("|"))
    assert backbones == [
        "inception_resnet_v1", "iresnet18", "iresnet50", "mobilefacenet", "resnet18", "resnet50"
    ]
    assert heads == ["arcface", "cosface", "softmax"]
    assert list_backbones() == backbones
    with pytest.raises(KeyError, match="unknown backbone 'mobilefacenet2'; known: inception_resnet_v1, "):
        create_backbone("mobilefacenet2")
