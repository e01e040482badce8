"""Config of an evaluation job (`kind: evaluate`): model, pairs, image sources per mask variant,
protocols and the optional extra analyses."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mfr_ray.config.base import StrictModel
from mfr_ray.config.common import RayConfig, StorageConfig, TrackingConfig
from mfr_ray.evaluation.embed import ModelSpec
from mfr_ray.evaluation.sources import UNMASKED, ImageSourceConfig
from mfr_ray.paths import expand_shared


class PairsConfig(StrictModel):
    path: str = Field("${shared}/datasets/lfw/pairs.txt", validate_default=True)
    key_format: str = Field("{name}/{name}_{index:04d}.jpg", description="image key of (name, index)")
    n_folds: int = Field(10, ge=2, description="folds for lists without official folds (MFR2)")
    limit_folds: int | None = Field(None, ge=1, description="use only the first N folds (quick runs)")
    max_pairs_per_fold: int | None = Field(
        None, ge=2, description="keep the first N/2 genuine and N/2 impostor pairs of each fold (quick runs)"
    )

    @field_validator("path")
    @classmethod
    def _expand(cls, value: str) -> str:
        return expand_shared(value)


class ProtocolSpec(StrictModel):
    """How pair scores are made from embeddings.
    - feature: "single" image only, "sum" image + mirror (then L2-normalised), "concat" [image, mirror];
    - subtract_train_mean: subtract the mean feature of the 9 training folds before normalising
      (the SphereFace / Xiaoccer MobileFaceNet LFW protocol: concat + mean subtraction)."""

    name: str = Field("ours", pattern=r"^[A-Za-z0-9_-]+$")
    feature: Literal["single", "sum", "concat"] = "sum"
    subtract_train_mean: bool = False


class AnalysesConfig(StrictModel):
    mask_matrix: bool = Field(True, description="template x probe variant tables when several variants")
    mask_matrix_variants: list[str] | None = Field(
        None, description="variants in the matrix, in order (e.g. leave out 'mixed'); None: all sources"
    )
    identification: bool = True
    open_set: bool = True
    clustering: bool = True
    classifiers: bool = True
    upper_half: bool = Field(False, description="also evaluate on crops whose lower half is blanked out")
    ranks: list[int] = Field(default_factory=lambda: [1, 5])
    fpir_targets: list[float] = Field(default_factory=lambda: [0.01, 0.1])
    unknown_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    cluster_distance_threshold: float = Field(0.6, gt=0.0, le=2.0, description="cosine distance cut")
    classifier_min_images: int = Field(4, ge=2)
    knn_k: int = Field(1, ge=1)
    mlp_hidden: int = Field(256, ge=1)


class ComputeConfig(StrictModel):
    num_actors: int = Field(1, ge=1, description="Ray actors for alignment and embedding (1 = in-process)")
    align_batch_size: int = Field(64, ge=1)
    embed_batch_size: int = Field(16, ge=1, description="small batches run faster on CPU (cache-bound)")
    bf16: bool = Field(
        False, description="embed under bfloat16 autocast (CPU: ~2x faster where AVX512-BF16/AMX exist; "
        "embeddings differ from float32 in the 3rd digit)"
    )
    torch_threads: int | None = Field(
        1, ge=1, description="torch threads per actor/process; 1 avoids OpenMP spin contention on shared CPUs "
        "(MTCNN was 7x slower with 2 threads on the loaded 2-core build machine); None: torch's default"
    )


class EvaluateConfig(StrictModel):
    name: str = "evaluate"
    model: ModelSpec = ModelSpec()
    pairs: PairsConfig = PairsConfig()
    sources: dict[str, ImageSourceConfig] = Field(
        default_factory=lambda: {UNMASKED: ImageSourceConfig()},
        description="variant name -> where its images come from; 'unmasked' is the reference variant",
    )
    far_targets: list[float] = Field(default_factory=lambda: [0.001], min_length=1)
    flip: bool = True
    protocols: list[ProtocolSpec] = Field(default_factory=lambda: [ProtocolSpec()], min_length=1)
    analyses: AnalysesConfig = AnalysesConfig()
    compute: ComputeConfig = ComputeConfig()
    cache_dir: str | None = Field("~/.cache/mfr-ray/evaluation", description="crops/embeddings cache; None: off")
    output_dir: str = Field("eval_outputs", description="local folder for the report and its files")
    parent_run_id: str | None = Field(None, description="nest the MLflow run under this (training) run")
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _checks(self) -> EvaluateConfig:
        if self.model.registered() and self.model.tracking_uri is None and self.tracking.tracking_uri:
            self.model.tracking_uri = self.tracking.tracking_uri  # the registry of the evaluation's store
        if not self.sources:
            raise ValueError("sources: at least one variant is needed")
        if len({p.name for p in self.protocols}) != len(self.protocols):
            raise ValueError("protocols: names must be distinct")
        unknown = set(self.analyses.mask_matrix_variants or []) - set(self.sources)
        if unknown:
            raise ValueError(f"analyses.mask_matrix_variants: {sorted(unknown)} are not in sources")
        if any(p.feature != "single" for p in self.protocols) and not self.flip:
            raise ValueError("protocols with feature sum/concat need flip: true")
        return self

    def primary_variant(self) -> str:
        return UNMASKED if UNMASKED in self.sources else next(iter(self.sources))
