"""Training for masks nobody here drew: random lower-face occluders (checked against the real MTCNN landmarks
of aligned LFW faces), a mask type held out of training and validation without preparing again, and
BatchNorm layers that keep the checkpoint's statistics while the rest of the network trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfr_ray.config import load_config
from mfr_ray.config.common import StorageConfig
from mfr_ray.data import paired_dataset
from mfr_ray.faces.aligner import FaceAligner
from mfr_ray.faces.config import AlignConfig
from mfr_ray.imageio import read_image_file
from mfr_ray.models import preprocess
from mfr_ray.paths import PROJECT_ROOT
from mfr_ray.train.augment import OccluderConfig, apply_occluders, occlude, occluder_alpha
from mfr_ray.train.config import TrainConfig, TrainDataConfig
from mfr_ray.train.data import training_dataset, validation_set
from mfr_ray.train.loop import build_optimizer
from mfr_ray.train.model import build_model, compute_loss

KEYS = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0001.jpg",
        "Colin_Powell/Colin_Powell_0001.jpg", "Serena_Williams/Serena_Williams_0001.jpg"]


@pytest.fixture(scope="module")
def aligned(lfw_dir):
    """112x96 crops of real LFW faces and their MTCNN landmarks carried into the crop."""
    aligner = FaceAligner(AlignConfig(crop="112x96", fallbacks=[]))
    crops, points = [], []
    for key, result in zip(KEYS, aligner.align_batch([read_image_file(lfw_dir / k).image for k in KEYS]),
                           strict=True):
        assert result.status == "ok", (key, result.reason)
        landmarks = np.asarray(result.landmarks, dtype=np.float64)
        points.append(np.c_[landmarks, np.ones(5)] @ result.matrix.T)
        crops.append(result.crop)
    return np.stack(crops), np.stack(points)


def at(alpha: np.ndarray, point: np.ndarray) -> float:
    x, y = np.round(point).astype(int)
    return float(alpha[y, x])


def test_occluders_cover_the_mouth_never_the_eyes_and_vary_over_the_nose(aligned):
    crops, points = aligned
    cfg = OccluderConfig(prob=1.0)
    rng = np.random.default_rng(7)
    nose_covered = []
    for _ in range(100):
        alpha = occluder_alpha(crops.shape[1:3], cfg, rng)
        for face in points:
            assert at(alpha, face[0]) < 0.01 and at(alpha, face[1]) < 0.01, "an eye is covered"
            assert at(alpha, face[3:].mean(axis=0)) > 0.5, "the mouth is not covered"
            nose_covered.append(at(alpha, face[2]) > 0.5)
    # the top edge runs from the nose bridge to below the nose tip: both happen
    assert 0.2 < np.mean(nose_covered) < 0.95


def test_occluded_crops_change_only_under_the_occluder(aligned):
    crops, _ = aligned
    out = occlude(crops, OccluderConfig(prob=1.0, edge_blur=(0.0, 0.0)), np.random.default_rng(3))
    changed = np.any(out != crops, axis=3)
    height = crops.shape[1]
    assert not changed[:, : height // 2].any(), "the upper half of the face changed"
    assert changed[:, int(height * 0.8) :].mean() > 0.5, "the lower face is not covered"


def test_apply_occluders_replaces_the_asked_share_and_leaves_the_unmasked_crops_alone(aligned):
    crops, _ = aligned
    unmasked = np.repeat(crops, 25, axis=0)  # 100 pairs
    masked = unmasked[:, ::-1].copy()  # stands for the engine's masked crops; any other picture does
    before = unmasked.copy()
    same, count = apply_occluders(unmasked, masked, OccluderConfig(prob=0.0), np.random.default_rng(0))
    assert same is masked and count == 0
    out, count = apply_occluders(unmasked, masked, OccluderConfig(prob=0.3), np.random.default_rng(0))
    replaced = np.any(out != masked, axis=(1, 2, 3))
    assert count == replaced.sum() and 15 <= count <= 45
    np.testing.assert_array_equal(unmasked, before)
    np.testing.assert_array_equal(out[~replaced], masked[~replaced])
    assert apply_occluders(unmasked, None, OccluderConfig(prob=1.0), np.random.default_rng(0)) == (None, 0)


def test_occluder_settings_are_checked():
    with pytest.raises(ValueError, match="fills"):
        OccluderConfig(fills=["plaid"])
    with pytest.raises(ValueError, match="backwards"):
        OccluderConfig(top=(0.8, 0.3))
    with pytest.raises(ValueError, match="no crop template"):
        occluder_alpha((100, 100), OccluderConfig(), np.random.default_rng(0))


def train_config(*overrides: str) -> TrainConfig:
    return load_config(PROJECT_ROOT / "configs" / "train_mobilefacenet_teacher.yaml",
                       ["data.uri=unused", *overrides], expected=TrainConfig)


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("batchnorm", ["train", "frozen"])
def test_frozen_batchnorm_keeps_the_checkpoint_statistics_while_the_rest_trains(aligned, batchnorm):
    crops, _ = aligned
    cfg = train_config(f"model.batchnorm={batchnorm}", "loss.head_weight=0")
    model = build_model(cfg, num_classes=4)
    model.train()
    layers = batchnorm_layers(model.backbone)
    stats = [layer.running_mean.clone() for layer in layers]
    scales = [layer.weight.detach().clone() for layer in layers]
    keys = set(model.state_dict())
    optimizer = build_optimizer(cfg.optim, model)
    pixels = model.backbone.backbone_config.normalisation
    unmasked = preprocess(crops, pixels)
    masked = preprocess(occlude(crops, OccluderConfig(prob=1.0), np.random.default_rng(0)), pixels)
    for _ in range(2):
        loss = compute_loss(cfg.loss, model, unmasked, masked, torch.arange(4))
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
    stats_kept = all(torch.equal(s, layer.running_mean) for s, layer in zip(stats, layers, strict=True))
    assert stats_kept == (batchnorm == "frozen")
    assert not any(torch.equal(s, layer.weight) for s, layer in zip(scales, layers, strict=True)), \
        "the BatchNorm scales must still train"
    assert all(layer.training == (batchnorm == "train") for layer in layers)
    assert model.backbone.training and set(model.state_dict()) == keys  # same files as ever


@pytest.mark.slow
def test_a_held_out_mask_type_leaves_training_and_validation(tiny_celeba_prepared, ray_local):
    pairs = paired_dataset(tiny_celeba_prepared).take_all()
    n95 = {p["source_key"] for p in pairs if p["mask_type"] == "N95"}
    assert 0 < len(n95) < len(pairs)
    data = TrainDataConfig(uri=tiny_celeba_prepared, val_identities=0, exclude_mask_types=["N95"])
    rows, count = training_dataset(data, StorageConfig(), held_out=[])
    assert count == len(pairs) - len(n95) == rows.count()
    everything = TrainDataConfig(uri=tiny_celeba_prepared, val_identities=0)
    assert training_dataset(everything, StorageConfig(), held_out=[])[1] == len(pairs)

    identities = sorted({p["identity_id"] for p in pairs})
    val_cfg = data.model_copy(update={"val_max_images": 500})
    val = validation_set(val_cfg, StorageConfig(), identities, (112, 96))
    assert len(val.identity) == len(pairs) - len(n95)
