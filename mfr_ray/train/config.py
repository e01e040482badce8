"""Config of a training run (`kind: train`): data, model, objective, optimiser, Ray Train scaling,
checkpoints and tracking. One model validated on the driver and again inside every worker."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from mfr_ray.config.base import SharedPath, StrictModel
from mfr_ray.config.common import RayConfig, StorageConfig, TrackingConfig
from mfr_ray.evaluation.metric_names import VAL_TPR_AT_FAR, TrainingMetricName
from mfr_ray.masking.config import MaskingConfig
from mfr_ray.models.spec import ModelSpec
from mfr_ray.registry import HEADS, MASK_TYPES, OBJECTIVES
from mfr_ray.train.augment import OccluderConfig
from mfr_ray.train.objectives.margin_distill import MarginDistillObjective


class TrainDataConfig(StrictModel):
    """A prepared dataset (`mfr prepare`) read as (unmasked, masked) pairs of the same image."""

    uri: SharedPath = Field(
        ..., description="prepared dataset root: local folder, file:// or s3://bucket/prefix"
    )
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
    occluders: OccluderConfig = Field(
        default_factory=OccluderConfig,
        description="random lower-face occluders (not masks) in place of a share of the masked crops",
    )
    exclude_mask_types: list[MASK_TYPES.name_type] = Field(
        default_factory=list,
        description="pairs whose masked crop has one of these mask types are left out of training and "
        "validation: a mask type held out without preparing the dataset again",
    )
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


class TrainModelConfig(ModelSpec):
    """The model a run fine-tunes, described as evaluation describes one (a `ModelSpec`), and the margin head
    trained on top of it."""

    checkpoint: SharedPath | None = Field(None, description="fine-tune from these weights; None trains from scratch")
    head: HEADS.name_type = "arcface"
    head_kwargs: dict[str, Any] = Field(default_factory=dict, description="e.g. {s: 32, m: 0.5} for arcface")
    batchnorm: Literal["train", "frozen"] = Field(
        "train",
        description="frozen: BatchNorm layers keep the checkpoint's statistics (eval mode) while the rest "
        "trains, so batches of masked crops do not move what unmasked faces are normalised with",
    )

    def trained(self, checkpoint: str, label: str | None = None) -> ModelSpec:
        """The ModelSpec of what a run trained: this backbone and its arguments with the run's weights
        (a checkpoint folder's `mfr_ray.models.weights.MODEL_FILE`), as `mfr evaluate` takes it."""
        spec = self.model_dump(include=set(ModelSpec.model_fields))
        return ModelSpec.model_validate({**spec, "checkpoint": checkpoint, "label": label})


def _objective_kind(section: Any) -> str | None:
    """The `kind` a `loss:` section names (margin_distill when it names none)."""
    if isinstance(section, dict):
        return section.get("kind", MarginDistillObjective.model_fields["kind"].default)
    return getattr(section, "kind", None)


# The `loss:` section: one of the registered objectives (mfr_ray/train/objectives/), picked by its `kind`.
LossConfig = Annotated[
    Union[tuple(Annotated[objective, Tag(kind)] for kind, objective in OBJECTIVES.items())],  # noqa: UP007
    Discriminator(_objective_kind),
]

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
    storage_path: SharedPath = Field(
        "outputs/train", description="RunConfig storage: local folder or s3://bucket/prefix"
    )
    num_to_keep: int | None = Field(2, ge=1)
    score_attribute: TrainingMetricName | None = Field(
        VAL_TPR_AT_FAR, description="reported metric ranking checkpoints"
    )
    score_order: Literal["max", "min"] = "max"
    max_failures: int = Field(
        1, ge=-1, description="worker failures tolerated (restart from the last checkpoint)"
    )


class TrainConfig(StrictModel):
    """One training run; rerunning the same `name` into the same storage resumes it."""

    name: str = Field("train", pattern=r"^[A-Za-z0-9_.-]+$")
    data: TrainDataConfig
    model: TrainModelConfig = Field(default_factory=TrainModelConfig)
    loss: LossConfig = Field(default_factory=MarginDistillObjective)
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
        if self.loss.needs_teacher and not self.model.checkpoint:
            raise ValueError("loss.teacher frozen needs model.checkpoint (the frozen teacher's weights)")
        if self.model.batchnorm == "frozen" and not self.model.checkpoint:
            raise ValueError(
                "model.batchnorm frozen needs model.checkpoint: a network trained from scratch has no "
                "BatchNorm statistics to keep"
            )
        return self
