"""Training pieces without a cluster: LR schedule, identity split, loss composition (worked by hand),
the distilled-layer hook, decoding of real crops, optimiser groups and the shipped configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mfr_ray.config import ConfigError, load_config
from mfr_ray.imageio import encode_image, read_image_file
from mfr_ray.models import create_backbone
from mfr_ray.paths import PROJECT_ROOT
from mfr_ray.registry import OBJECTIVES
from mfr_ray.train.config import OptimConfig, TrainConfig
from mfr_ray.train.data import decode_pairs, validation_identities
from mfr_ray.train.loop import build_optimizer, lr_factor
from mfr_ray.train.model import FaceTrainModel, build_model, compute_loss
from mfr_ray.train.objectives.margin_distill import MarginDistillObjective, margin_distill_loss
from mfr_ray.train.objectives.triplet import TripletObjective


def test_step_schedule_with_warmup():
    cfg = OptimConfig(schedule="step", milestones=[0.5, 0.75], gamma=0.1, warmup_steps=10)
    assert lr_factor(cfg, 0, 100) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_factor(cfg, 9, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 49, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 100) == pytest.approx(0.1)
    assert lr_factor(cfg, 75, 100) == pytest.approx(0.01)


def test_cosine_schedule():
    cfg = OptimConfig(schedule="cosine", warmup_steps=0)
    assert lr_factor(cfg, 0, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 100) == pytest.approx(0.5)
    assert lr_factor(cfg, 100, 100) == pytest.approx(0.0, abs=1e-12)


def test_validation_identities_are_deterministic_and_bounded():
    first = validation_identities(50, 5, seed=3)
    assert first == validation_identities(50, 5, seed=3)
    assert first != validation_identities(50, 5, seed=4)
    assert len(set(first)) == 5 and all(0 <= i < 50 for i in first)
    assert validation_identities(50, 0, seed=0) == []
    with pytest.raises(ValueError):
        validation_identities(5, 5, seed=0)


def test_distillation_counts_only_pairs_both_classified_right():
    """Two pairs. Pair 0: both crops classified right, student orthogonal to teacher (1 - cos = 1).
    Pair 1: the masked crop is classified wrong, student opposite to teacher (1 - cos = 2) - not counted.
    Balanced cosine distillation = 1 / 1 counted pair = 1.0; the share counted is 0.5."""
    labels = torch.tensor([0, 1])
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [5.0, 0.0]])  # unmasked rows, then masked rows
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    cfg = MarginDistillObjective(distillation="cosine", beta=2.0, dynamic_balancing=True)
    terms = margin_distill_loss(cfg, logits, features, labels, batch=2, with_masked=True)
    assert terms.logged["loss_distill"] == pytest.approx(1.0)
    assert terms.logged["distill_share_counted"] == pytest.approx(0.5)
    ce_unmasked = math.log(1 + math.exp(-5.0))  # both unmasked rows right by a logit gap of 5
    ce_masked = (math.log(1 + math.exp(-5.0)) + math.log(1 + math.exp(5.0))) / 2
    assert terms.logged["loss_cls_unmasked"] == pytest.approx(ce_unmasked, rel=1e-5)
    assert terms.logged["loss_cls_masked"] == pytest.approx(ce_masked, rel=1e-5)
    assert terms.total.item() == pytest.approx(ce_unmasked + ce_masked + 2.0 * 1.0, rel=1e-5)
    unbalanced = margin_distill_loss(
        cfg.model_copy(update={"dynamic_balancing": False}), logits, features, labels, 2, True
    )
    assert unbalanced.logged["loss_distill"] == pytest.approx(1.5)  # (1 + 2) / 2


def test_distilled_layer_hook_exposes_that_layer():
    backbone = create_backbone("mobilefacenet").eval()
    model = FaceTrainModel(backbone, head=None, distill_layer="linear7")
    embeddings, logits, features = model(torch.zeros(2, 3, 112, 96))
    assert embeddings.shape == (2, 128) and logits is None and features.shape == (2, 512)
    with pytest.raises(ValueError, match="not a module"):
        FaceTrainModel(create_backbone("mobilefacenet"), None, distill_layer="no.such.layer")


def test_decode_pairs_keeps_only_decodable_pairs_of_the_input_size(celeba_dir):
    face = read_image_file(next((celeba_dir / "07201").glob("*.jpg"))).image
    crop = np.ascontiguousarray(face[69:181, 77:173])  # a 112x96 window of a real face
    good, wrong_size = encode_image(crop), encode_image(face)
    unmasked, masked, valid = decode_pairs([good, good, wrong_size], [good, b"not an image", good], (112, 96))
    assert valid.tolist() == [True, False, False]
    assert unmasked.shape == masked.shape == (1, 112, 96, 3)
    only_unmasked, none_masked, valid = decode_pairs([good, good], [b"", b""], (112, 96))
    assert none_masked is None and valid.all() and only_unmasked.shape == (2, 112, 96, 3)


def test_optimizer_groups_skip_decay_on_vectors_and_use_head_lr():
    from mfr_ray.models import create_head

    backbone = create_backbone("mobilefacenet")
    model = FaceTrainModel(backbone, create_head("arcface", 128, 10), "embedding")
    optimizer = build_optimizer(OptimConfig(optimizer="sgd", lr=0.01, head_lr=0.1, weight_decay=5e-4), model)
    by_id = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert by_id[id(model.head.weight)]["lr"] == 0.1 and by_id[id(model.head.weight)]["weight_decay"] == 5e-4
    assert by_id[id(backbone.conv1.bn.weight)]["weight_decay"] == 0.0
    assert by_id[id(backbone.conv1.conv.weight)]["lr"] == 0.01
    assert len(by_id) == len(list(model.parameters()))


@pytest.mark.parametrize("kind", OBJECTIVES.names())
def test_every_objective_trains_a_fresh_model_from_its_defaults(kind):
    """Each registered objective (a new one included), with its default settings: `build_model` builds what
    it asks for, one step's loss is finite, logged as `loss_total`, and reaches the backbone's weights."""
    torch.manual_seed(0)
    cfg = TrainConfig(data={"uri": "unused"}, model={"checkpoint": None}, loss={"kind": kind})
    model = build_model(cfg, num_classes=2).train()
    size = model.backbone.backbone_config.input_size
    unmasked, masked = torch.randn(4, 3, *size), torch.randn(4, 3, *size)
    terms = compute_loss(cfg.loss, model, unmasked, masked if cfg.loss.use_masked else None, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(terms.total) and terms.logged["loss_total"] == pytest.approx(terms.total.item())
    terms.total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


@pytest.mark.parametrize("name", ["train_mobilefacenet_distill", "train_nomask", "train_triplet"])
def test_shipped_configs_load(name):
    cfg = load_config(PROJECT_ROOT / "configs" / f"{name}.yaml")
    assert isinstance(cfg, TrainConfig)


def test_distillation_without_masked_crops_is_rejected():
    with pytest.raises(ValidationError, match="distillation needs masked crops"):
        MarginDistillObjective(use_masked=False, distillation="cosine")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(PROJECT_ROOT / "configs" / "train_nomask.yaml", ["loss.betta=2"])


def test_loss_section_is_the_objective_its_kind_names():
    """`loss:` becomes the registered objective its `kind` names (margin_distill when it names none), which
    decides whether build_model makes a head; a key of another objective, an unknown kind or a typo is an
    error naming the key as the config spells it."""
    triplet = PROJECT_ROOT / "configs" / "train_triplet.yaml"
    nomask = PROJECT_ROOT / "configs" / "train_nomask.yaml"
    cfg = load_config(triplet, ["data.uri=unused"])
    assert isinstance(cfg.loss, TripletObjective) and not cfg.loss.needs_head and not cfg.loss.needs_teacher
    assert build_model(cfg, num_classes=5).head is None
    distill = load_config(nomask, ["data.uri=unused"])
    assert isinstance(distill.loss, MarginDistillObjective) and distill.loss.needs_head
    assert build_model(distill, num_classes=5).head.weight.shape == (5, 128)
    assert TrainConfig(data={"uri": "x"}, loss={"beta": 2.0}).loss == MarginDistillObjective(beta=2.0)
    with pytest.raises(ConfigError) as err:
        load_config(triplet, ["loss.beta=2", "loss.dynamic_balancing=true"])
    assert (
        "loss: Value error, beta 2 is a term of kind margin_distill, not of kind triplet; "
        "dynamic_balancing True is a term of kind margin_distill, not of kind triplet"
    ) in str(err.value)
    with pytest.raises(ConfigError, match=r"loss\.kind: unknown kind 'arcface'; known: 'margin_distill', "):
        load_config(triplet, ["loss.kind=arcface"])
    with pytest.raises(ConfigError, match=r"\n  loss\.betta: unknown key"):
        load_config(nomask, ["loss.betta=2"])
    with pytest.raises(ConfigError, match=r"loss\.triplet_margin: Input should be greater than 0 \(got -1\)"):
        load_config(triplet, ["loss.triplet_margin=-1"])


def test_checkpoint_ranking_names_a_reported_metric():
    nomask = PROJECT_ROOT / "configs" / "train_nomask.yaml"
    with pytest.raises(ConfigError, match="unknown training metric 'val_tpr'; known: val_tpr_at_far, "):
        load_config(nomask, ["checkpoint.score_attribute=val_tpr"])
    ranked = load_config(nomask, ["checkpoint.score_attribute=val_accuracy"])
    assert ranked.checkpoint.score_attribute == "val_accuracy"


def test_ingest_cpu_shortfall_warns_when_workers_leave_no_whole_cpu():
    from mfr_ray.train.trainer import ingest_cpu_shortfall

    cfg = load_config(
        PROJECT_ROOT / "configs" / "train_mobilefacenet_distill.yaml",
        ["scaling.num_workers=2", "scaling.cpus_per_worker=0.9"],
        expected=TrainConfig,
    )
    message = ingest_cpu_shortfall(cfg, cluster_cpus=2.0)
    assert message and "leave 0.20 of the cluster's 2 CPUs" in message
    assert ingest_cpu_shortfall(cfg, cluster_cpus=3.0) is None
    shipped = load_config(PROJECT_ROOT / "configs" / "train_mobilefacenet_distill.yaml", expected=TrainConfig)
    assert ingest_cpu_shortfall(shipped, cluster_cpus=2.0) is None  # the default config fits the 2-core default


def _tracked_config(storage) -> TrainConfig:
    return load_config(
        PROJECT_ROOT / "configs" / "train_mobilefacenet_distill.yaml",
        [f"checkpoint.storage_path={storage}", "tracking.experiment=reattach", "data.uri=/data/prepared"],
        expected=TrainConfig,
    )


def test_rerun_reattaches_only_to_the_newest_run_whose_checkpoints_remain(tmp_path, tmp_tracking_uri):
    """A real MLflow store: a rerun continues the newest earlier run of the same name and storage while
    Ray Train's checkpoint record of it is still there; once the checkpoints are deleted, a new run."""
    from mfr_ray.train.trainer import RAY_TRAIN_SNAPSHOT, _mlflow_run

    cfg = _tracked_config(tmp_path / "ckpt")
    first = _mlflow_run(cfg, "run-a", None, {})
    second = _mlflow_run(cfg, "run-a", None, {})  # no checkpoints yet: Ray Train starts afresh
    assert second != first
    snapshot = tmp_path / "ckpt" / "run-a" / RAY_TRAIN_SNAPSHOT
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text("{}")
    assert _mlflow_run(cfg, "run-a", None, {}) == second  # the newest, not the oldest
    other_storage = _tracked_config(tmp_path / "elsewhere")
    assert _mlflow_run(other_storage, "run-a", None, {}) not in (first, second)
    snapshot.unlink()  # checkpoints deleted
    assert _mlflow_run(cfg, "run-a", None, {}) not in (first, second)


def test_run_names_with_quotes_neither_break_nor_inject_the_search(tmp_path, tmp_tracking_uri):
    from mfr_ray.train.trainer import RAY_TRAIN_SNAPSHOT, _mlflow_run

    cfg = _tracked_config(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "plain").mkdir(parents=True)
    (tmp_path / "ckpt" / "plain" / RAY_TRAIN_SNAPSHOT).write_text("{}")
    plain = _mlflow_run(cfg, "plain", None, {})
    for name in ["it's \"quoted\"", "plain' or tags.`mfr.stage` = 'train", "x\\' OR 1=1 --"]:
        (tmp_path / "ckpt" / name).mkdir(parents=True)
        (tmp_path / "ckpt" / name / RAY_TRAIN_SNAPSHOT).write_text("{}")
        created = _mlflow_run(cfg, name, None, {})
        assert created != plain
        assert _mlflow_run(cfg, name, None, {}) == created  # found again by its exact name
