"""The paper's baseline: FaceNet's triplet loss, no head and no teacher."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mfr_ray.registry import OBJECTIVES
from mfr_ray.train.objectives.base import LossTerms, Objective, StepOutputs


@OBJECTIVES.register("triplet")
class TripletObjective(Objective):
    """FaceNet's triplet loss mined online over every embedding of the batch (unmasked and masked crops
    together, a crop and its masked twin sharing the identity's label)."""

    kind: Literal["triplet"] = "triplet"
    triplet_margin: float = Field(0.2, gt=0)
    triplet_mining: Literal["batch_hard", "semi_hard"] = "batch_hard"

    @property
    def needs_head(self) -> bool:
        return False

    def loss(self, outputs: StepOutputs) -> LossTerms:
        from mfr_ray.models import losses

        total = losses.triplet_loss(
            outputs.embeddings, outputs.row_labels, margin=self.triplet_margin, mining=self.triplet_mining
        )
        return LossTerms(total, {"loss_triplet": total.item(), "loss_total": total.item()})
