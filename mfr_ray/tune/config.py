"""Config of a hyperparameter search: a base training config, dotted keys to search, how to search."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mfr_ray.config import StrictModel
from mfr_ray.config.base import deprecated_spelling
from mfr_ray.config.common import RayConfig, StorageConfig, TrackingConfig
from mfr_ray.evaluation.metric_names import VAL_TPR_AT_FAR, TrainingMetricName


class SearchDimension(StrictModel):
    """One searched key: `loguniform`/`uniform` between low and high, `choice` among values, `grid` over
    values (every value tried, for each sample)."""

    type: Literal["loguniform", "uniform", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> SearchDimension:
        if self.type in ("loguniform", "uniform"):
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"{self.type} needs low < high")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("loguniform needs low > 0")
        elif not self.values:
            raise ValueError(f"{self.type} needs a non-empty `values` list")
        return self


class SchedulerConfig(StrictModel):
    """ASHA early stopping on the per-epoch objective, or FIFO (every trial runs to the end)."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs before a trial may be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class TuneConfig(StrictModel):
    name: str = "mfr-tune"
    base_config: str = Field(..., description="train YAML (kind: train) every trial starts from")
    base_overrides: list[str] = Field(
        default_factory=list,
        description="key=value applied to the base first (deprecated: a base_config file with `base:` says it)",
    )
    search_space: dict[str, SearchDimension] = Field(..., min_length=1, description="dotted train-config key -> range")
    searcher: Literal["grid", "random", "optuna", "hyperopt"] = "random"
    num_samples: int = Field(8, ge=1, description="samples drawn (grid: repeats of the full grid)")
    max_concurrent_trials: int = Field(1, ge=1)
    metric: TrainingMetricName = Field(
        VAL_TPR_AT_FAR, description="the objective: a metric each trial's training reports per epoch"
    )
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = SchedulerConfig()
    trial_cpus: float = Field(0.01, gt=0, description="CPUs held by the trial driver; its trainer asks for its own")
    storage_path: str = Field("outputs/tune", description="local folder or s3:// prefix for Tune state")
    resume: bool = Field(True, description="continue an interrupted search of the same name")
    best_config_out: str = Field("outputs/tune/best_train.yaml", description="where the winning train YAML goes")
    seed: int = 0
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    _base_overrides_deprecated = deprecated_spelling(
        "base_overrides", "tune `base_overrides:` - point base_config at a file with `base: <train config>` and "
        "the values instead (configs/tune/trial_small.yaml)")
