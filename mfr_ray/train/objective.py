"""What one training step optimises: the model (backbone + margin head, with the distilled layer exposed,
and the frozen teacher when the config asks for one) and the loss terms of the paper's objective or of the
triplet baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mfr_ray.train.config import LossConfig, TrainConfig

EMBEDDING_LAYER = "embedding"


class LayerTap:
    """The output of one backbone module, captured by a forward hook: the distilled layer when it is not
    the embedding itself."""

    def __init__(self, backbone: nn.Module, layer: str):
        modules = dict(backbone.named_modules())
        if layer not in modules:
            raise ValueError(f"distill_layer {layer!r} is not a module of the backbone")
        self.output: torch.Tensor | None = None
        modules[layer].register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        self.output = output


def distilled_features(backbone: nn.Module, tap: LayerTap | None, images: torch.Tensor):
    """(embeddings, distilled features) of one forward pass."""
    embeddings = backbone(images)
    return embeddings, embeddings if tap is None else tap.output.flatten(1)


class FrozenTeacher(nn.Module):
    """The starting checkpoint, frozen: always in eval mode (BatchNorm uses and keeps its running
    statistics), no parameter requires a gradient, forward runs without autograd."""

    def __init__(self, backbone: nn.Module, distill_layer: str = EMBEDDING_LAYER):
        super().__init__()
        self.backbone = backbone
        self._tap = None if distill_layer == EMBEDDING_LAYER else LayerTap(backbone, distill_layer)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return distilled_features(self.backbone, self._tap, images)[1]


class FaceTrainModel(nn.Module):
    """Backbone + optional classification head in one module, so DDP synchronises both. `forward` returns
    the embeddings, the head's logits (None without a head) and the distilled layer's output.

    The frozen teacher rides along as a plain attribute, not a registered submodule: it moves with the
    model (`.to(device)`), but stays out of `state_dict` (state.pt, model.pt), `parameters()` (optimiser,
    gradient clipping) and DDP's gradient and buffer synchronisation."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None,
        distill_layer: str = EMBEDDING_LAYER,
        teacher: FrozenTeacher | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.distill_layer = distill_layer
        self._tap = None if distill_layer == EMBEDDING_LAYER else LayerTap(backbone, distill_layer)
        object.__setattr__(self, "teacher", teacher)  # bypasses nn.Module's registration on purpose

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        embeddings, features = distilled_features(self.backbone, self._tap, images)
        logits = self.head(embeddings, labels) if self.head is not None and labels is not None else None
        return embeddings, logits, features


def build_model(cfg: TrainConfig, num_classes: int) -> FaceTrainModel:
    """Backbone (from the configured checkpoint, or fresh), the margin head sized to the label map (unless
    head_weight is 0) and, for `teacher: frozen`, a second copy of the checkpoint read from its file (so a
    resumed run gets the same teacher, whatever the training state holds)."""
    from mfr_ray.models import load_backbone
    from mfr_ray.models.heads import create_head

    backbone = load_backbone(cfg.model.backbone, cfg.model.checkpoint, **cfg.model.backbone_kwargs)
    head = None
    if cfg.loss.kind == "margin_distill" and cfg.loss.head_weight > 0:
        head = create_head(cfg.model.head, backbone.embedding_size, num_classes, **cfg.model.head_kwargs)
    teacher = None
    if cfg.loss.kind == "margin_distill" and cfg.loss.teacher == "frozen":
        if cfg.model.checkpoint is None:
            raise ValueError("loss.teacher frozen needs model.checkpoint: the teacher is that checkpoint")
        teacher = FrozenTeacher(
            load_backbone(cfg.model.backbone, cfg.model.checkpoint, **cfg.model.backbone_kwargs),
            cfg.loss.distill_layer,
        )
    return FaceTrainModel(backbone, head, cfg.loss.distill_layer, teacher)


@dataclass
class LossTerms:
    total: torch.Tensor
    logged: dict[str, float]


def margin_distill_loss(
    cfg: LossConfig,
    logits: torch.Tensor | None,
    features: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    with_masked: bool,
    teacher_features: torch.Tensor | None = None,
) -> LossTerms:
    """head_weight * [CE(head(unmasked)) + masked_weight * CE(head(masked))] + beta * distillation(masked ->
    teacher) + teacher_unmasked_weight * distillation(unmasked -> teacher); the teacher is
    `teacher_features` (the frozen network on the unmasked crops) when given, else the unmasked rows of
    `features`. Logged as loss_cls_* (the configured head: ArcFace by default), loss_distill,
    distill_share_counted, loss_distill_unmasked. Rows [0, batch) of the model outputs are the unmasked
    crops, rows [batch, 2 batch) their masked twins."""
    from mfr_ray.models import losses

    ce = nn.functional.cross_entropy
    total = features.new_zeros(())
    logged: dict[str, float] = {}
    if logits is not None:
        unmasked_ce = ce(logits[:batch], labels)
        head_total = unmasked_ce
        logged["loss_cls_unmasked"] = unmasked_ce.item()
        if with_masked:
            masked_ce = ce(logits[batch:], labels)
            head_total = head_total + cfg.masked_weight * masked_ce
            logged["loss_cls_masked"] = masked_ce.item()
        total = total + cfg.head_weight * head_total
    if teacher_features is not None:
        teacher = teacher_features.detach()
    else:
        teacher = features[:batch].detach() if cfg.detach_teacher else features[:batch]
    if with_masked and cfg.distillation != "none" and cfg.beta > 0:
        per_pair = losses.pairwise_distillation(
            features[batch:], teacher, cfg.distillation, cfg.distill_margin
        )
        counted = (
            losses.dynamic_balancing_mask(logits[batch:], logits[:batch], labels)
            if cfg.dynamic_balancing
            else None
        )
        distill = losses.balanced_mean(per_pair, counted)
        total = total + cfg.beta * distill
        logged["loss_distill"] = distill.item()
        logged["distill_share_counted"] = counted.mean().item() if counted is not None else 1.0
    if teacher_features is not None and cfg.teacher_unmasked_weight > 0:
        per_pair = losses.pairwise_distillation(
            features[:batch], teacher, cfg.distillation, cfg.distill_margin
        )
        unmasked_distill = per_pair.mean()
        total = total + cfg.teacher_unmasked_weight * unmasked_distill
        logged["loss_distill_unmasked"] = unmasked_distill.item()
    logged["loss_total"] = total.item()
    return LossTerms(total, logged)


def triplet_objective(cfg: LossConfig, embeddings: torch.Tensor, labels: torch.Tensor) -> LossTerms:
    """FaceNet's triplet loss over every embedding of the batch (unmasked and masked crops together)."""
    from mfr_ray.models import losses

    total = losses.triplet_loss(embeddings, labels, margin=cfg.triplet_margin, mining=cfg.triplet_mining)
    return LossTerms(total, {"loss_triplet": total.item(), "loss_total": total.item()})


def compute_loss(
    cfg: LossConfig,
    model: nn.Module,
    unmasked: torch.Tensor,
    masked: torch.Tensor | None,
    labels: torch.Tensor,
) -> LossTerms:
    """One forward pass over the unmasked and masked crops stacked together (plus the frozen teacher's on
    the unmasked crops, when there is one), and the configured loss. `model` is the FaceTrainModel or its
    DDP wrapper."""
    with_masked = masked is not None
    images = torch.cat([unmasked, masked]) if with_masked else unmasked
    all_labels = torch.cat([labels, labels]) if with_masked else labels
    embeddings, logits, features = model(images, all_labels)
    if cfg.kind == "triplet":
        return triplet_objective(cfg, embeddings, all_labels)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    teacher_features = core.teacher(unmasked).float() if core.teacher is not None else None
    return margin_distill_loss(
        cfg,
        logits.float() if logits is not None else None,
        features.float(),
        labels,
        len(labels),
        with_masked,
        teacher_features,
    )
