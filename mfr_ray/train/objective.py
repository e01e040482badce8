"""What one training step optimises: the model (backbone + margin head, with the distilled layer exposed)
and the loss terms of the paper's objective or of the triplet baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mfr_ray.train.config import LossConfig, TrainConfig

EMBEDDING_LAYER = "embedding"


class FaceTrainModel(nn.Module):
    """Backbone + optional classification head in one module, so DDP synchronises both. `forward` returns
    the embeddings, the head's logits (None without a head) and the distilled layer's output."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None, distill_layer: str = EMBEDDING_LAYER):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.distill_layer = distill_layer
        self._captured: torch.Tensor | None = None
        if distill_layer != EMBEDDING_LAYER:
            modules = dict(backbone.named_modules())
            if distill_layer not in modules:
                raise ValueError(f"distill_layer {distill_layer!r} is not a module of the backbone")
            modules[distill_layer].register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        self._captured = output

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        embeddings = self.backbone(images)
        logits = self.head(embeddings, labels) if self.head is not None and labels is not None else None
        features = embeddings if self.distill_layer == EMBEDDING_LAYER else self._captured.flatten(1)
        return embeddings, logits, features


def build_model(cfg: TrainConfig, num_classes: int) -> FaceTrainModel:
    """Backbone (from the configured checkpoint, or fresh) and the margin head sized to the label map."""
    from mfr_ray.models import load_backbone
    from mfr_ray.models.heads import create_head

    backbone = load_backbone(cfg.model.backbone, cfg.model.checkpoint, **cfg.model.backbone_kwargs)
    head = None
    if cfg.loss.kind == "margin_distill":
        head = create_head(cfg.model.head, backbone.embedding_size, num_classes, **cfg.model.head_kwargs)
    return FaceTrainModel(backbone, head, cfg.loss.distill_layer)


@dataclass
class LossTerms:
    total: torch.Tensor
    logged: dict[str, float]


def margin_distill_loss(
    cfg: LossConfig,
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    with_masked: bool,
) -> LossTerms:
    """CE(head(unmasked)) + masked_weight * CE(head(masked)) + beta * distillation(masked -> unmasked);
    logged as loss_cls_* (the configured head: ArcFace by default), loss_distill, distill_share_counted.
    Rows [0, batch) of the model outputs are the unmasked crops, rows [batch, 2 batch) their masked twins."""
    from mfr_ray.models import losses

    ce = nn.functional.cross_entropy
    unmasked_ce = ce(logits[:batch], labels)
    total = unmasked_ce
    logged = {"loss_cls_unmasked": unmasked_ce.item()}
    if with_masked:
        masked_ce = ce(logits[batch:], labels)
        total = total + cfg.masked_weight * masked_ce
        logged["loss_cls_masked"] = masked_ce.item()
    if with_masked and cfg.distillation != "none" and cfg.beta > 0:
        teacher = features[:batch].detach() if cfg.detach_teacher else features[:batch]
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
    """One forward pass over the unmasked and masked crops stacked together, and the configured loss."""
    with_masked = masked is not None
    images = torch.cat([unmasked, masked]) if with_masked else unmasked
    all_labels = torch.cat([labels, labels]) if with_masked else labels
    embeddings, logits, features = model(images, all_labels)
    if cfg.kind == "triplet":
        return triplet_objective(cfg, embeddings, all_labels)
    return margin_distill_loss(cfg, logits.float(), features.float(), labels, len(labels), with_masked)
