"""Config of a training run (`kind: train`): data, model, objective, optimiser, Ray Train scaling,
checkpoints and tracking. One model validated on the driver and again inside every worker."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mfr_ray.config.base import StrictModel
from mfr_ray.config.common import RayConfig, StorageConfig, TrackingConfig
from mfr_ray.masking.config import MaskingConfig
from mfr_ray.paths import expand_shared


class TrainDataConfig(StrictModel):
    """A prepared dataset (`mfr prepare`) read as (unmasked, masked) pairs of the same image."""

    uri: str = Field(..., description="prepared dataset root: local folder, file:// or s3://bucket/prefix")
    masked_variant: str = Field("masked", description="prepared variant paired with each unmasked crop")
    on_the_fly_masking: bool = Field(
        False,
        description="mask the unmasked crops inside the Ray Data ingest, so every epoch sees fresh masks",
    )
    masking: MaskingConfig = Field(
        default_factory=MaskingConfig, description="engine settings for on-the-fly masks"
    )
    masking_actors: int = Field(1, ge=1, description="Ray Data actors running the mask engine")
    masking_cpus: float = Field(0.5, gt=0, description="CPUs reserved per masking actor")
    ingest_cpus: float = Field(
        0.25, gt=0, description="CPUs each Ray Data read/pair/filter task asks for: a fraction, so ingest "
        "still runs beside workers that hold all but part of a CPU (Tune trials, cpus_per_worker near 1)"
    )
    val_identities: int = Field(3, ge=0, description="identities held out of training for validation pairs")
    val_max_images: int = Field(
        64, ge=2, description="held-out images used for validation pairs (each seen masked and unmasked)"
    )
    val_folds: int = Field(5, ge=2, description="folds of the verification protocol on the validation pairs")
    hflip: bool = Field(True, description="random horizontal flip of each pair (same flip for both crops)")
    materialize: bool = Field(
        True,
        description="keep the encoded training crops in the object store after reading them once "
        "(fast epochs for sets that fit; false streams from storage every epoch)",
    )
    shuffle_buffer: int = Field(256, ge=0, description="local shuffle buffer per worker (0: off)")
    keep_fallback: bool = Field(
        False, description="also train on `ok_fallback` crops (no face found, a guessed box: often not a face)"
    )
    allow_incomplete: bool = Field(
        False, description="train on a dataset whose prepare did not finish (its finished shards only)"
    )
    seed: int = 0

    @field_validator("uri")
    @classmethod
    def _expand(cls, value: str) -> str:
        return expand_shared(value)


class TrainModelConfig(StrictModel):
    backbone: str = "mobilefacenet"
    checkpoint: str | None = Field(None, description="fine-tune from these weights; None trains from scratch")
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    head: Literal["arcface", "cosface", "softmax"] = "arcface"
    head_kwargs: dict[str, Any] = Field(default_factory=dict, description="e.g. {s: 32, m: 0.5} for arcface")

    @field_validator("checkpoint")
    @classmethod
    def _expand(cls, value: str | None) -> str | None:
        return expand_shared(value) if value else None


class LossConfig(StrictModel):
    """`margin_distill`: head_weight * [head(unmasked) + masked_weight * head(masked)] + beta *
    distillation(masked -> teacher) + teacher_unmasked_weight * distillation(unmasked -> teacher), where the
    teacher is the network's own unmasked embedding (`self`, the paper's recipe) or the starting checkpoint,
    frozen, on the unmasked crop (`frozen`: the student cannot drift away from what it knew); `triplet`:
    FaceNet's triplet loss on all embeddings of the batch (the paper's baseline)."""

    kind: Literal["margin_distill", "triplet"] = "margin_distill"
    use_masked: bool = Field(
        True, description="train on the masked crops too (False: unmasked-only baseline)"
    )
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
        "embedding",
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
    triplet_margin: float = Field(0.2, gt=0)
    triplet_mining: Literal["batch_hard", "semi_hard"] = "batch_hard"

    @model_validator(mode="after")
    def _consistent(self) -> LossConfig:
        if self.kind == "triplet":
            if self.teacher == "frozen":
                raise ValueError("teacher frozen is a term of kind margin_distill, not of the triplet loss")
            return self
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


class OptimConfig(StrictModel):
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    head_lr: float | None = Field(None, gt=0, description="learning rate of the head; None: lr")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "step", "cosine"] = "step"
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75],
        description="step schedule: fractions of all steps where lr *= gamma",
    )
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    grad_clip_norm: float | None = Field(5.0, gt=0, description="clip the global gradient norm; None: off")
    amp: bool = Field(True, description="mixed precision (float16 autocast + gradient scaling) when on GPU")


class ScheduleConfig(StrictModel):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2, description="pairs per worker and step")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="cap per epoch; None: one pass over the shard"
    )
    log_every_steps: int = Field(10, ge=1)
    validate_every_epochs: int = Field(1, ge=1)


class ScalingSection(StrictModel):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per worker; None: cpus_per_worker"
    )


class CheckpointSection(StrictModel):
    storage_path: str = Field(
        "outputs/train", description="RunConfig storage: local folder or s3://bucket/prefix"
    )
    num_to_keep: int | None = Field(2, ge=1)
    score_attribute: str | None = Field("val_tpr_at_far", description="reported metric ranking checkpoints")
    score_order: Literal["max", "min"] = "max"
    max_failures: int = Field(
        1, ge=-1, description="worker failures tolerated (restart from the last checkpoint)"
    )

    @field_validator("storage_path")
    @classmethod
    def _expand(cls, value: str) -> str:
        return expand_shared(value)


class TrainConfig(StrictModel):
    """One training run; rerunning the same `name` into the same storage resumes it."""

    name: str = Field("train", pattern=r"^[A-Za-z0-9_.-]+$")
    data: TrainDataConfig
    model: TrainModelConfig = Field(default_factory=TrainModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    val_far: float = Field(1e-3, gt=0, lt=1, description="FAR of the validation operating point")
    registered_model_name: str | None = Field(None, description="register the final model under this name")
    worker_pid_dir: str | None = Field(
        None,
        description="each worker writes <dir>/epoch<E>-rank<R>.pid when it starts an epoch (fault injection)",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _teacher_has_weights(self) -> TrainConfig:
        """A frozen teacher is the starting checkpoint: without one there is nothing to distil toward, and the
        worker would only find out after the cluster has started."""
        if self.loss.teacher == "frozen" and not self.model.checkpoint:
            raise ValueError("loss.teacher frozen needs model.checkpoint (the frozen teacher's weights)")
        return self
