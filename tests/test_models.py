"""Backbone registry: the shared MobileFaceNet checkpoint loads strictly; every registered backbone builds
from its default config, takes the crops it declares, and is refused with the ones it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mfr_ray.evaluation.config import EvaluateConfig
from mfr_ray.faces.geometry import CROP_TEMPLATES
from mfr_ray.models import create_backbone, preprocess
from mfr_ray.models.backbone_config import Normalisation, backbone_config
from mfr_ray.models.spec import ModelSpec
from mfr_ray.registry import BACKBONES, HEADS


def test_mobilefacenet_loads_shared_checkpoint_strictly(shared):
    path = shared / "weights" / "mobilefacenet_casia.ckpt"
    model = ModelSpec(checkpoint=str(path)).load()  # strict=True: every key and shape must match
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)["net_state_dict"]
    assert set(model.state_dict()) == set(checkpoint)
    assert sum(p.numel() for p in model.parameters()) == 999_552
    assert torch.equal(model.state_dict()["linear7.conv.weight"], checkpoint["linear7.conv.weight"])
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 112, 96))
    assert out.shape == (2, 128) and torch.isfinite(out).all()


def test_the_loader_accepts_our_checkpoint_layouts(tmp_path):
    model = create_backbone("iresnet18", embedding_size=64)
    for i, layout in enumerate([model.state_dict(), {"model": model.state_dict(), "epoch": 3}]):
        torch.save(layout, tmp_path / f"ckpt{i}.pt")
        loaded = ModelSpec(backbone="iresnet18", checkpoint=str(tmp_path / f"ckpt{i}.pt"),
                           kwargs={"embedding_size": 64}).load()
        assert torch.equal(loaded.state_dict()["head.fc.weight"], model.state_dict()["head.fc.weight"])
    with pytest.raises(RuntimeError):  # wrong embedding size: strict load refuses
        ModelSpec(backbone="iresnet18", checkpoint=str(tmp_path / "ckpt0.pt"), kwargs={"embedding_size": 128}).load()


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_builds_from_its_default_config(name):
    """A registered backbone (a new one included) is built at its config's input and embedding size, carries
    that config, and maps a crop of each layout it takes at its own size to one embedding per crop."""
    config = backbone_config(name)
    model = create_backbone(name).eval()
    assert model.backbone_config == config
    assert tuple(model.input_size) == config.input_size and model.embedding_size == config.embedding_size
    assert config.crops and set(config.crops + config.resized_crops) <= set(CROP_TEMPLATES)
    own_size = [c for c in config.crops if tuple(CROP_TEMPLATES[c][0]) == config.input_size]
    assert own_size, f"{name}: its input size is none of its layouts' {config.crops}"
    with torch.inference_mode():
        out = model(preprocess(np.zeros((2, *config.input_size, 3), np.uint8), config.normalisation))
    assert out.shape == (2, config.embedding_size) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_is_refused_a_crop_it_does_not_declare(name):
    """An evaluate config pairing a backbone with a crop outside its default config fails at load, naming
    the key; its declared crops load."""
    config = backbone_config(name)
    accepted = config.accepted_crops()
    for crop in CROP_TEMPLATES:
        source = {"unmasked": {"align": {"crop": crop}}}
        if crop in accepted:
            EvaluateConfig(model={"backbone": name, "checkpoint": None}, sources=source)
            continue
        with pytest.raises(ValidationError, match=r"sources\.unmasked\.align\.crop") as refused:
            EvaluateConfig(model={"backbone": name, "checkpoint": None}, sources=source)
        assert f"backbone {name}" in str(refused.value)


def test_a_resize_is_accepted_only_where_declared():
    """inception_resnet_v1 (160x160) declares the square 112x112 crop resized; 112x96 would be stretched."""
    from mfr_ray.config import ConfigError, load_config
    from mfr_ray.paths import PROJECT_ROOT

    assert backbone_config("inception_resnet_v1").crop_refusal("112x112") is None
    assert backbone_config("mobilefacenet").crop_refusal("112x112") is not None  # 112x96 network, not declared
    assert backbone_config("mobilefacenet", {"input_size": [112, 112]}).crop_refusal("112x112") is None
    with pytest.raises(ConfigError, match=r"(?s)eval_lfw_masks\.yaml.*sources\.N95\.align\.crop: backbone resnet18"):
        load_config(PROJECT_ROOT / "configs" / "eval_lfw_masks.yaml", ["model.backbone=resnet18", "model.checkpoint="])


def test_preprocess_scales_and_transposes_as_the_config_says():
    crops = np.zeros((1, 2, 3, 3), dtype=np.uint8)
    crops[0, 1, 2] = [255, 0, 128]
    x = preprocess(crops, Normalisation())
    assert x.shape == (1, 3, 2, 3)
    assert x[0, :, 1, 2].tolist() == pytest.approx([127.5 / 128, -127.5 / 128, 0.5 / 128])
    assert preprocess(crops, Normalisation(0.0, 255.0))[0, :, 1, 2].tolist() == pytest.approx([1.0, 0.0, 128 / 255])


def test_registries_find_their_entries_by_package():
    """A fresh interpreter that imports no backbone or head module finds every one through the one registry
    (a backbone by being in mfr_ray/models/backbones/); an unknown name is refused with the known ones."""
    import pkgutil
    import subprocess
    import sys

    import mfr_ray.models.backbones

    code = (
        "import sys; from mfr_ray.registry import BACKBONES, HEADS; "
        "assert not [m for m in sys.modules if m.startswith('mfr_ray.models.backbones.')]; "
        "print(' '.join(BACKBONES.names()), '|', ' '.join(HEADS.names()))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    backbones, heads = (part.split() for part in out.split("|"))
    assert backbones == BACKBONES.names() and heads == HEADS.names()
    modules = {m.name for m in pkgutil.iter_modules(mfr_ray.models.backbones.__path__)}
    assert {BACKBONES.get(n).build.__module__.rsplit(".", 1)[1] for n in backbones} == modules
    with pytest.raises(KeyError, match=f"unknown backbone 'mobilefacenet2'; known: {backbones[0]}, "):
        create_backbone("mobilefacenet2")
