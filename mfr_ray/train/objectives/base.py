"""What every training objective is: its own config section (`loss:` in a train config, picked by its
`kind`), whether the model needs a classification head or the frozen teacher, and its loss over the outputs
of one step."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from mfr_ray.config.base import StrictModel
from mfr_ray.registry import OBJECTIVES

if TYPE_CHECKING:
    import torch

EMBEDDING_LAYER = "embedding"


@dataclass
class StepOutputs:
    """One forward pass over a batch of pairs: rows [0, batch) of the model outputs are the unmasked crops,
    rows [batch, 2 batch) their masked twins (when `with_masked`)."""

    embeddings: torch.Tensor
    logits: torch.Tensor | None  # the head's, None without a head
    features: torch.Tensor  # the distilled layer's output (the embeddings unless another layer is tapped)
    labels: torch.Tensor  # one per pair
    row_labels: torch.Tensor  # one per row of the outputs
    with_masked: bool
    teacher_features: torch.Tensor | None = None  # the frozen teacher on the unmasked crops

    @property
    def batch(self) -> int:
        return len(self.labels)


@dataclass
class LossTerms:
    total: torch.Tensor
    logged: dict[str, float]


class Objective(StrictModel):
    """Base of every objective's config. A key that belongs to another objective is an error naming the key
    and its objective (not silently a default of this one)."""

    kind: str
    use_masked: bool = Field(
        True, description="train on the masked crops too (False: unmasked-only baseline)"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_terms_of_other_objectives(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kind = cls.model_fields["kind"].default
        foreign = []
        for key, value in data.items():
            owners = [name for name, other in OBJECTIVES.items() if key in other.model_fields]
            if key not in cls.model_fields and owners:
                shown = f" {value}" if isinstance(value, str | int | float | bool) else ""
                foreign.append(f"{key}{shown} is a term of kind {' or '.join(owners)}, not of kind {kind}")
        if foreign:
            raise ValueError("; ".join(foreign))
        return data

    @property
    @abstractmethod
    def needs_head(self) -> bool:
        """Whether the model gets the configured classification head (its logits reach `loss`)."""

    @property
    def needs_teacher(self) -> bool:
        """Whether a frozen copy of model.checkpoint embeds the unmasked crops (`teacher_features`)."""
        return False

    @property
    def feature_layer(self) -> str:
        """The backbone module whose output is `features`."""
        return EMBEDDING_LAYER

    @abstractmethod
    def loss(self, outputs: StepOutputs) -> LossTerms:
        """The total to minimise and the terms logged (always `loss_total`)."""
