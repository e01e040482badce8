"""The paper's objective: a margin head on the unmasked and masked crops plus the distillation of the masked
embedding toward a teacher's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from mfr_ray.registry import OBJECTIVES
from mfr_ray.train.objectives.base import EMBEDDING_LAYER, LossTerms, Objective, StepOutputs

if TYPE_CHECKING:
    import torch


@OBJECTIVES.register("margin_distill")
class MarginDistillObjective(Objective):
    """head_weight * [head(unmasked) + masked_weight * head(masked)] + beta * distillation(masked ->
    teacher) + teacher_unmasked_weight * distillation(unmasked -> teacher), where the teacher is the
    network's own unmasked embedding (`self`, the paper's recipe) or the starting checkpoint, frozen, on the
    unmasked crop (`frozen`: the student cannot drift away from what it knew)."""

    kind: Literal["margin_distill"] = "margin_distill"
    masked_weight: float = Field(1.0, ge=0)
    head_weight: float = Field(
        1.0, ge=0, description="weight of the margin head's terms; 0 builds no head (frozen teacher only)"
    )
    distillation: Literal["none", "mse", "cosine", "margin_cosine"] = "cosine"
    teacher: Literal["self", "frozen"] = Field(
        "self",
        description="self: the unmasked embedding of the network being trained; frozen: a copy of "
        "model.checkpoint in eval mode, never updated, embedding the unmasked crop",
    )
    beta: float = Field(1.0, ge=0, description="weight of the distillation of the masked embedding")
    teacher_unmasked_weight: float = Field(
        0.0, ge=0, description="weight of the distillation of the unmasked embedding onto the frozen teacher"
    )
    distill_margin: float = Field(0.0, ge=0, le=2, description="margin of the margin cosine distillation")
    distill_layer: str = Field(
        EMBEDDING_LAYER,
        description="'embedding' or the dotted name of a backbone module whose output is distilled",
    )
    dynamic_balancing: bool = Field(
        False,
        description="count the masked distillation only for pairs whose masked and unmasked crops are both "
        "classified right by the head",
    )
    detach_teacher: bool = Field(
        True, description="self teacher: no gradient through the unmasked side (a frozen one never has any)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> MarginDistillObjective:
        if self.teacher == "self":
            if self.distillation != "none" and not self.use_masked:
                raise ValueError("distillation needs masked crops: set use_masked true or distillation none")
            if self.teacher_unmasked_weight > 0:
                raise ValueError("teacher_unmasked_weight needs teacher frozen (self: unmasked teaches)")
            if self.head_weight == 0:
                raise ValueError("head_weight 0 needs teacher frozen: self-distillation anchors nothing")
        else:
            if self.distillation == "none":
                raise ValueError("teacher frozen needs a distillation (mse, cosine or margin_cosine)")
            masked_term = self.use_masked and self.beta > 0
            if not masked_term and self.teacher_unmasked_weight == 0 and self.head_weight == 0:
                raise ValueError(
                    "no loss term left: set beta (with masked crops), teacher_unmasked_weight or head_weight"
                )
        if self.dynamic_balancing and self.head_weight == 0:
            raise ValueError("dynamic_balancing needs the head's predictions: head_weight > 0")
        return self

    @property
    def needs_head(self) -> bool:
        return self.head_weight > 0

    @property
    def needs_teacher(self) -> bool:
        return self.teacher == "frozen"

    @property
    def feature_layer(self) -> str:
        return self.distill_layer

    def loss(self, outputs: StepOutputs) -> LossTerms:
        return margin_distill_loss(
            self,
            outputs.logits.float() if outputs.logits is not None else None,
            outputs.features.float(),
            outputs.labels,
            outputs.batch,
            outputs.with_masked,
            outputs.teacher_features,
        )


def margin_distill_loss(
    cfg: MarginDistillObjective,
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
    from torch import nn

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
