"""Frozen-teacher distillation on real faces: LFW crops aligned by the project's FaceAligner, masked by the
mask engine, embedded by the real CASIA MobileFaceNet. The teacher never changes under optimiser steps,
takes no gradient, stays out of the checkpoint files and comes back from the checkpoint file on resume;
the loss terms match numbers worked by hand; a real Ray run trains with it and resumes by name."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mfr_ray.config import load_config
from mfr_ray.faces.aligner import FaceAligner
from mfr_ray.faces.config import AlignConfig
from mfr_ray.imageio import read_image_file
from mfr_ray.masking.config import MaskingConfig
from mfr_ray.masking.engine import MaskEngine
from mfr_ray.models import preprocess
from mfr_ray.models.backbone_config import backbone_config
from mfr_ray.models.spec import ModelSpec
from mfr_ray.paths import PROJECT_ROOT
from mfr_ray.train.config import TrainConfig
from mfr_ray.train.loop import MODEL_FILE, STATE_FILE, build_optimizer, save_checkpoint
from mfr_ray.train.model import build_model, compute_loss
from mfr_ray.train.objectives.margin_distill import MarginDistillObjective, margin_distill_loss
from mfr_ray.train.objectives.triplet import TripletObjective

KEYS = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Aaron_Peirsol/Aaron_Peirsol_0002.jpg",
        "Abdullah_Gul/Abdullah_Gul_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0002.jpg"]
TEACHER_CONFIG = PROJECT_ROOT / "configs" / "train_mobilefacenet_teacher.yaml"


@pytest.fixture(scope="module")
def crops(lfw_dir):
    """(unmasked, N95-masked) 112x96 crops of four real LFW faces (two people), and their labels."""
    aligner = FaceAligner(AlignConfig(crop="112x96", fallbacks=[]))
    engine = MaskEngine(MaskingConfig(mask_type="N95"))
    unmasked, masked = [], []
    for key, result in zip(KEYS, aligner.align_batch([read_image_file(lfw_dir / k).image for k in KEYS]),
                           strict=True):
        assert result.status == "ok" and result.method == "mtcnn", (key, result.reason)
        mask = engine.mask(result.crop, key, aligned=True)
        assert mask.record.status == "ok", (key, mask.record.reason)
        unmasked.append(result.crop)
        masked.append(mask.image)
    pixels = backbone_config("mobilefacenet").normalisation
    return preprocess(np.stack(unmasked), pixels), preprocess(np.stack(masked), pixels), torch.tensor([0, 0, 1, 1])


def teacher_config(*overrides: str) -> TrainConfig:
    return load_config(TEACHER_CONFIG, ["data.uri=unused", *overrides], expected=TrainConfig)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_teacher_is_frozen_through_optimizer_steps(crops):
    """Three SGD steps on real faces (ArcFace extra term on): the student moves, the teacher's weights
    and BatchNorm statistics stay bit-identical, no teacher parameter gets a gradient or sits in the
    optimiser, and the teacher stays in eval mode while the model trains."""
    unmasked, masked, labels = crops
    # BatchNorm training (the shipped config freezes it) so the student's running statistics move too
    cfg = teacher_config("loss.head_weight=1.0", "optim.warmup_steps=0", "optim.lr=0.05", "model.batchnorm=train")
    model = build_model(cfg, num_classes=2)
    optimizer = build_optimizer(cfg.optim, model)
    teacher_before, student_before = state_of(model.teacher), state_of(model.backbone)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.teacher.parameters()}
    assert optimized == {id(p) for p in model.parameters()}  # student backbone + head, all of them
    model.train()
    assert model.backbone.training and not model.teacher.training
    for _ in range(3):
        terms = compute_loss(cfg.loss, model, unmasked, masked, labels)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        assert all(p.grad is not None for p in model.backbone.parameters())
        optimizer.step()
    logged = {"loss_cls_unmasked", "loss_cls_masked", "loss_distill", "loss_distill_unmasked"}
    assert logged <= terms.logged.keys()
    for name, value in state_of(model.teacher).items():
        assert torch.equal(value, teacher_before[name]), name  # weights and BN running stats
    moved = [n for n, v in state_of(model.backbone).items() if not torch.equal(v, student_before[n])]
    assert any(n.endswith("running_mean") for n in moved) and any(n.endswith("weight") for n in moved)
    assert not any(k.startswith("teacher") for k in model.state_dict())


def test_unmasked_term_is_zero_while_student_equals_teacher(crops):
    """The student starts as a copy of the teacher: in eval mode its unmasked embedding is the teacher's,
    so that term is 0 (cosine and MSE), while the masked crop (real N95 masks) is far from it. The frozen
    teacher then gives the same masked term as self-distillation; once the student moves, they part."""
    unmasked, masked, labels = crops
    for kind in ("cosine", "mse"):
        cfg = teacher_config(f"loss.distillation={kind}")
        model = build_model(cfg, num_classes=2).eval()
        assert model.head is None  # head_weight 0 builds no head
        terms = compute_loss(cfg.loss, model, unmasked, masked, labels)
        assert terms.logged["loss_distill_unmasked"] == pytest.approx(0.0, abs=1e-4)
        assert terms.logged["loss_distill"] > 1e3 * max(terms.logged["loss_distill_unmasked"], 1e-6)
        self_cfg = cfg.loss.model_copy(update={"teacher": "self", "teacher_unmasked_weight": 0.0})
        with torch.no_grad():
            model.teacher = None
            self_terms = compute_loss(self_cfg, model, unmasked, masked, labels)
        assert self_terms.logged["loss_distill"] == pytest.approx(terms.logged["loss_distill"], rel=1e-4)

    cfg = teacher_config("loss.beta=0")
    model = build_model(cfg, num_classes=2).eval()
    total = compute_loss(cfg.loss, model, unmasked, masked, labels).total.item()
    assert total == pytest.approx(0.0, abs=1e-4)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            parameter.mul_(1 + 0.1 * torch.randn_like(parameter))
    assert compute_loss(cfg.loss, model, unmasked, masked, labels).total.item() > 1e-3


def test_frozen_teacher_loss_by_hand():
    """Two pairs in 2-D. Student unmasked u = (1,0), (0,1); masked m = (0,1), (1,1); teacher t = (0,1), (1,0).
    cosine: masked 1-cos(m,t) = 0 and 1-1/sqrt2; unmasked 1-cos(u,t) = 1 and 1.
    mse: masked |m-t|^2 = 0 and 1; unmasked 2 and 2.
    head: unmasked rows right by a logit gap of 5; masked row 1 wrong by 5."""
    labels = torch.tensor([0, 1])
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [5.0, 0.0]], requires_grad=True)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)  # would get a gradient if used live
    ce_unmasked = math.log(1 + math.exp(-5.0))
    ce_masked = (math.log(1 + math.exp(-5.0)) + math.log(1 + math.exp(5.0))) / 2
    cfg = MarginDistillObjective(
        teacher="frozen", distillation="cosine", beta=2.0, teacher_unmasked_weight=3.0, head_weight=0.5
    )
    terms = margin_distill_loss(cfg, logits, features, labels, 2, True, teacher)
    masked_cos = (0.0 + 1 - 1 / math.sqrt(2)) / 2
    assert terms.logged["loss_distill"] == pytest.approx(masked_cos, abs=1e-6)
    assert terms.logged["loss_distill_unmasked"] == pytest.approx(1.0, abs=1e-6)
    expected = 0.5 * (ce_unmasked + ce_masked) + 2.0 * masked_cos + 3.0 * 1.0
    assert terms.total.item() == pytest.approx(expected, rel=1e-5)
    terms.total.backward()
    assert teacher.grad is None and features.grad is not None and logits.grad is not None
    # d(1 - cos(a, t))/da = -(t / (|a| |t|) - cos a / |a|^2), times weight / pairs: unmasked rows 3 / 2 *
    # (0, -1) and (-1, 0); masked pair 0 sits on its teacher (no pull); masked pair 1: 2 / 2 * (-1, 1)/2sqrt2.
    h = 1 / (2 * math.sqrt(2))
    expected_grad = torch.tensor([[0.0, -1.5], [-1.5, 0.0], [0.0, 0.0], [-h, h]])
    assert torch.allclose(features.grad, expected_grad, atol=1e-6)

    mse = margin_distill_loss(cfg.model_copy(update={"distillation": "mse"}), None, features, labels, 2, True,
                              teacher)
    assert mse.logged["loss_distill"] == pytest.approx(0.5) and mse.logged["loss_distill_unmasked"] == 2.0
    assert mse.total.item() == pytest.approx(2.0 * 0.5 + 3.0 * 2.0)  # no logits: no head term
    assert "loss_cls_unmasked" not in mse.logged

    # Dynamic balancing counts masked pair 0 only (pair 1's masked crop is classified wrong): 0.
    balanced = margin_distill_loss(cfg.model_copy(update={"dynamic_balancing": True}), logits, features,
                                   labels, 2, True, teacher)
    assert balanced.logged["loss_distill"] == pytest.approx(0.0, abs=1e-7)
    assert balanced.logged["distill_share_counted"] == 0.5

    # Self-distillation on the same rows: the teacher is the student's unmasked side, u.
    own_cfg = MarginDistillObjective(distillation="cosine", beta=2.0)
    own = margin_distill_loss(own_cfg, logits, features, labels, 2, True)
    assert own.logged["loss_distill"] == pytest.approx((1.0 + 1 - 1 / math.sqrt(2)) / 2, abs=1e-6)
    assert "loss_distill_unmasked" not in own.logged


def test_checkpoint_files_hold_the_student_and_resume_rebuilds_the_teacher(crops, tmp_path):
    """state.pt and model.pt (what loop.save_checkpoint writes) hold no teacher; a model rebuilt for a
    resume loads state.pt strictly and its teacher is the checkpoint file again, not the trained student;
    moving the model moves its teacher."""
    unmasked, masked, labels = crops
    cfg = teacher_config("optim.warmup_steps=0", "optim.lr=0.05")
    model = build_model(cfg, num_classes=2)
    optimizer = build_optimizer(cfg.optim, model)
    model.train()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        compute_loss(cfg.loss, model, unmasked, masked, labels).total.backward()
        optimizer.step()
    save_checkpoint(str(tmp_path), model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 0, 2)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    weights = torch.load(tmp_path / MODEL_FILE, weights_only=True)
    assert set(weights) == set(model.backbone.state_dict())
    assert not any(k.startswith("teacher") for k in state["model"])
    resumed = build_model(cfg, num_classes=2)
    resumed.load_state_dict(state["model"])  # strict
    original = ModelSpec(checkpoint=cfg.model.checkpoint).load().state_dict()
    for name, value in resumed.teacher.backbone.state_dict().items():
        assert torch.equal(value, original[name]), name
    trained = model.backbone.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in resumed.backbone.state_dict().items())
    assert not all(torch.equal(v, original[k]) for k, v in trained.items())
    resumed.to(torch.float64)  # what prepare_model's .to(device) does: the unregistered teacher moves too
    assert {p.dtype for p in resumed.teacher.parameters()} == {torch.float64}


def test_triplet_objective_builds_no_head_or_teacher_and_mines_all_crops(crops):
    """The triplet objective on real faces: build_model makes neither a head nor a teacher, and
    compute_loss is FaceNet's loss over the unmasked and masked embeddings together, labels repeated."""
    from mfr_ray.models.losses import triplet_loss

    unmasked, masked, labels = crops
    triplet = PROJECT_ROOT / "configs" / "train_triplet.yaml"
    cfg = load_config(triplet, ["data.uri=unused"], expected=TrainConfig)
    model = build_model(cfg, num_classes=2).eval()
    assert model.head is None and model.teacher is None
    with torch.no_grad():
        terms = compute_loss(cfg.loss, model, unmasked, masked, labels)
        embeddings = model.backbone(torch.cat([unmasked, masked]))
        expected = triplet_loss(embeddings, torch.cat([labels, labels]), margin=0.2, mining="batch_hard")
    assert set(terms.logged) == {"loss_triplet", "loss_total"}
    assert terms.total.item() == pytest.approx(expected.item()) and expected.item() > 0


def test_teacher_options_are_checked():
    with pytest.raises(ValidationError, match="teacher frozen is a term of kind margin_distill"):
        TripletObjective(kind="triplet", teacher="frozen", distillation="none")
    with pytest.raises(ValidationError, match="teacher_unmasked_weight needs teacher frozen"):
        MarginDistillObjective(teacher_unmasked_weight=1.0)
    with pytest.raises(ValidationError, match="head_weight 0 needs teacher frozen"):
        MarginDistillObjective(head_weight=0.0)
    with pytest.raises(ValidationError, match="teacher frozen needs a distillation"):
        MarginDistillObjective(teacher="frozen", distillation="none")
    with pytest.raises(ValidationError, match="dynamic_balancing needs the head"):
        MarginDistillObjective(teacher="frozen", head_weight=0.0, dynamic_balancing=True)
    with pytest.raises(ValidationError, match="no loss term left"):
        MarginDistillObjective(teacher="frozen", use_masked=False, head_weight=0.0)
    # Unmasked-only training that keeps to the checkpoint (learning without forgetting) is allowed.
    assert MarginDistillObjective(teacher="frozen", use_masked=False, teacher_unmasked_weight=1.0).teacher == "frozen"
    # A frozen teacher without model.checkpoint: refused at load (test_frozen_teacher_without_checkpoint_fails_at_load).
    for name in ("train_mobilefacenet_distill", "train_nomask", "train_triplet"):
        shipped = load_config(PROJECT_ROOT / "configs" / f"{name}.yaml", expected=TrainConfig)
        assert not shipped.loss.needs_teacher  # none ships a frozen teacher (its teacher is self)


@pytest.mark.slow
def test_ray_training_with_frozen_teacher_resumes_by_name(tiny_celeba_prepared, tmp_path):
    """Two DDP workers train with the frozen teacher for one epoch; the same run name with two epochs
    resumes from the checkpoint (the teacher rebuilt from the checkpoint file) and finishes."""
    from mfr_ray.models import create_backbone
    from mfr_ray.train import run_training

    overrides = [
        f"data.uri={tiny_celeba_prepared}", "data.val_identities=2", "data.val_max_images=24",
        "data.shuffle_buffer=16", "schedule.batch_size=8", "schedule.steps_per_epoch=2",
        "schedule.log_every_steps=1", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
        "scaling.torch_threads=1", f"checkpoint.storage_path={tmp_path / 'ckpt'}", "tracking.enabled=false",
        "registered_model_name=null", "loss.head_weight=0.5",
    ]
    first = run_training(load_config(TEACHER_CONFIG, [*overrides, "schedule.epochs=1"], expected=TrainConfig),
                         run_name="teacher")
    assert first.result.error is None and first.result.metrics["resumed_from_step"] == -1
    again = run_training(load_config(TEACHER_CONFIG, [*overrides, "schedule.epochs=2"], expected=TrainConfig),
                         run_name="teacher")
    metrics = again.result.metrics
    assert again.result.error is None
    assert metrics["resumed_from_step"] == 2 and metrics["global_step"] == 4 and metrics["epoch"] == 1
    for name in ("loss_distill", "loss_distill_unmasked", "loss_cls_unmasked", "loss_total"):
        assert math.isfinite(metrics[name]), name
    with again.result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)
        create_backbone("mobilefacenet").load_state_dict(torch.load(os.path.join(folder, MODEL_FILE),
                                                                    weights_only=True))
    assert not any(k.startswith("teacher") for k in state["model"])


def test_frozen_teacher_without_checkpoint_fails_at_load():
    from mfr_ray.config.base import ConfigError

    with pytest.raises(ConfigError, match="model.checkpoint"):
        load_config("configs/train_mobilefacenet_teacher.yaml", ["model.checkpoint=null"])
