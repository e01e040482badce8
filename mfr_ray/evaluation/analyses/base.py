"""What an evaluation analysis is: its config fields, its `run` and its report section. The runner and the
report loop over the registered analyses (analyses/catalog.py); `analyses:` in an evaluate config is
their fields, flat."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from mfr_ray.config.base import StrictModel
from mfr_ray.evaluation.metric_names import scoped

if TYPE_CHECKING:
    from mfr_ray.evaluation.analyses.context import AnalysisContext
    from mfr_ray.evaluation.config import EvaluateConfig


@dataclass
class AnalysisResult:
    """`section` goes to summary.json and the report under the analysis's name; `metrics` to MLflow."""

    section: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)


class Analysis(ABC):
    """An extra analysis. A subclass names its `title`, its `order` (where its section sits in the report)
    and its `config`, a model whose bool field named like the analysis switches it on (the YAML key
    `analyses.<name>`) and whose other fields are its settings, also directly under `analyses:`:
    `class MyAnalysis(Analysis, title="My analysis", order=60, config=MyConfig)`."""

    title: ClassVar[str]
    order: ClassVar[int]
    Config: ClassVar[type[StrictModel]]

    def __init_subclass__(cls, *, title: str, order: int, config: type[StrictModel], **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.title, cls.order, cls.Config = title, order, config

    def __init__(self, name: str, cfg: StrictModel):
        self.name = name
        self.cfg = cfg

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.cfg, self.name))

    def check(self, evaluate_cfg: EvaluateConfig) -> None:
        """Raise ValueError when the evaluate config cannot run this analysis (called at config load)."""

    @abstractmethod
    def run(self, ctx: AnalysisContext) -> AnalysisResult | None:
        """The analysis on the evaluation's embeddings; None when there is nothing to report."""

    def result(self, section: dict[str, Any]) -> AnalysisResult:
        """A section whose every value is also an MLflow metric `<name>.<key>`."""
        return AnalysisResult(section, {scoped(self.name, key): value for key, value in section.items()})

    @classmethod
    def report_section(cls, section: dict[str, Any]) -> list[str]:
        """Markdown lines of the report's section (default: a heading and one bullet per value)."""
        lines = ["", f"## {cls.title}", ""]
        return lines + [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}"
                        for k, v in section.items()]

