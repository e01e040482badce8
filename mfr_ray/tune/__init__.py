"""Hyperparameter search over the distillation weight, margins and loss choice on Ray Tune."""

from mfr_ray.tune.config import SchedulerConfig, SearchDimension, TuneConfig
from mfr_ray.tune.search import SearchResult, print_search, run_search

__all__ = ["SchedulerConfig", "SearchDimension", "SearchResult", "TuneConfig", "print_search", "run_search"]
