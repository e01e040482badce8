"""Config of an evaluation job (`kind: evaluate`): model, pairs, image sources per mask variant,
protocols and the optional extra analyses."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, create_model, model_validator
from pydantic_core import PydanticCustomError, ValidationError

from mfr_ray.config.base import SharedPath, StrictModel
from mfr_ray.config.common import RayConfig, StorageConfig, TrackingConfig
from mfr_ray.evaluation.analyses.catalog import analyses_config_fields, configured_analyses
from mfr_ray.faces.config import AlignConfig
from mfr_ray.imageio import UNMASKED
from mfr_ray.models.backbone_config import backbone_config
from mfr_ray.models.spec import ModelSpec
from mfr_ray.registry import RUNTIMES
from mfr_ray.runtime import DEFAULT_RUNTIME


class ImageSourceConfig(StrictModel):
    """Where the images of one evaluation variant come from."""

    type: Literal["folder", "parquet"] = "folder"
    uri: SharedPath = Field(
        "${shared}/datasets/lfw/lfw-deepfunneled", validate_default=True, description="image root or Parquet dataset"
    )
    variant: str = Field(UNMASKED, description="folder: mask type applied on the fly (unmasked = none); "
                         "parquet: value of the `variant` column")
    mask_seed: int = 0
    align: AlignConfig = AlignConfig()


class PairsConfig(StrictModel):
    path: SharedPath = Field("${shared}/datasets/lfw/pairs.txt", validate_default=True)
    key_format: str = Field("{name}/{name}_{index:04d}.jpg", description="image key of (name, index)")
    n_folds: int = Field(10, ge=2, description="folds for lists without official folds (MFR2)")
    limit_folds: int | None = Field(None, ge=1, description="use only the first N folds (quick runs)")
    max_pairs_per_fold: int | None = Field(
        None, ge=2, description="keep the first N/2 genuine and N/2 impostor pairs of each fold (quick runs)"
    )


class ProtocolSpec(StrictModel):
    """How pair scores are made from embeddings.
    - feature: "single" image only, "sum" image + mirror (then L2-normalised), "concat" [image, mirror];
    - subtract_train_mean: subtract the mean feature of the training folds (k-1 of k) before normalising
      (the SphereFace / Xiaoccer MobileFaceNet LFW protocol: concat + mean subtraction)."""

    name: str = Field("ours", pattern=r"^[A-Za-z0-9_-]+$")
    feature: Literal["single", "sum", "concat"] = "sum"
    subtract_train_mean: bool = False


# `analyses:` is the fields of every registered analysis (mfr_ray/evaluation/analyses/), flat as the shipped
# YAML writes them (`analyses.identification: false`, `analyses.ranks: [1, 5]`).
AnalysesConfig = create_model(
    "AnalysesConfig",
    __base__=StrictModel,
    __module__=__name__,
    __doc__="The extra analyses: each is switched on by the bool named like it; its settings sit beside it.",
    **analyses_config_fields(),
)


class EvaluateComputeConfig(StrictModel):
    num_actors: int = Field(1, ge=1, description="Ray actors for alignment and embedding (1 = in-process)")
    align_batch_size: int = Field(64, ge=1)
    embed_batch_size: int = Field(16, ge=1, description="small batches run faster on CPU (cache-bound)")
    runtime: RUNTIMES.name_type = Field(
        DEFAULT_RUNTIME, description="what runs the network: openvino | onnxruntime (an ONNX export, cached by "
        "the weights' fingerprint) | torch; a backbone that cannot export falls back to torch with a warning"
    )
    bf16: bool = Field(
        False, description="embed in bfloat16 (torch autocast or OpenVINO's bf16 precision; CPU: ~2x faster "
        "where AVX512-BF16/AMX exist; embeddings differ from float32 in the 3rd digit); not with onnxruntime"
    )
    torch_threads: int | None = Field(
        1, ge=1, description="threads per actor/process of torch, the runtime and OpenCV; 1 avoids OpenMP spin "
        "contention on shared CPUs (MTCNN was 7x slower with 2 threads on the loaded 2-core build machine); "
        "None: each library's default"
    )

    @model_validator(mode="after")
    def _bf16_runtime(self) -> EvaluateComputeConfig:
        if self.bf16 and self.runtime == "onnxruntime":
            raise ValueError("compute.bf16 needs runtime torch or openvino (onnxruntime computes in float32)")
        return self


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
    compute: EvaluateComputeConfig = EvaluateComputeConfig()
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
        for analysis in configured_analyses(self.analyses):
            analysis.check(self)
        if any(p.feature != "single" for p in self.protocols) and not self.flip:
            raise ValueError("protocols with feature sum/concat need flip: true")
        _refuse_unfit_crops(self)
        return self

    def primary_variant(self) -> str:
        return UNMASKED if UNMASKED in self.sources else next(iter(self.sources))


def _refuse_unfit_crops(cfg: EvaluateConfig) -> None:
    """Every source's crop must be one the backbone's default config accepts; the error names each bad
    `sources.<variant>.align.crop`. A `models:/` model names its backbone in the MLflow registry, which
    loading a config does not reach: not checked."""
    if cfg.model.registered():
        return
    config = backbone_config(cfg.model.backbone, cfg.model.kwargs)
    errors = [
        {"type": PydanticCustomError("crop_refused", "backbone {backbone}: {why}",
                                     {"backbone": cfg.model.backbone, "why": why}),
         "loc": ("sources", variant, "align", "crop"), "input": source.align.crop}
        for variant, source in cfg.sources.items() if (why := config.crop_refusal(source.align.crop))
    ]
    if errors:
        raise ValidationError.from_exception_data(type(cfg).__name__, errors)
