"""Hyperparameter search over the distillation weight, margins and loss choice on Ray Tune."""

from mfr_ray.tune.config import SchedulerConfig, SearchDimension, TuneConfig
from mfr_ray.tune.search import SearchChangedError, SearchResult, print_search, run_search

__all__ = [
    "SchedulerConfig",
    "SearchChangedError",
    "SearchDimension",
    "SearchResult",
    "TuneConfig",
    "print_search",
    "run_search",
]
