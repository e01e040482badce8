"""Where an evaluation's time goes (issue 25, point 3): wall seconds of each driver stage, and the seconds
the croppers and embedders report for the parts they run (in Ray actors, so they come back as batch
columns). Shown as a table at the end, logged as MLflow metrics `timing/<stage>_s` and `timing.md`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

# A batch column `seconds_<part>` carries, on every row, that row's share of the batch's seconds in
# <part>: shares survive Ray Data re-chunking batches, and their sum is the part's total.
SECONDS_PREFIX = "seconds_"


def per_row_seconds(seconds: dict[str, float], rows: int) -> dict[str, np.ndarray]:
    """The batch columns that hand `seconds` (per part) back to the driver, spread over `rows` rows."""
    return {SECONDS_PREFIX + part: np.full(rows, value / max(rows, 1)) for part, value in seconds.items()}


class EvaluationTimer:
    """Driver stages timed by `stage(name)`, worker parts summed from batches by `take(batch)`."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.parts: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def add_part(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds

    def take(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Sum and remove the batch's `seconds_*` columns (a crashed input's batch has none)."""
        for column in [c for c in batch if c.startswith(SECONDS_PREFIX)]:
            self.add_part(column.removeprefix(SECONDS_PREFIX), float(np.sum(batch.pop(column))))
        return batch

    def total(self) -> float:
        return time.perf_counter() - self.started

    def metrics(self) -> dict[str, float]:
        """`timing/<stage>_s` per driver stage, `timing/worker_<part>_s` per worker part, `timing/total_s`."""
        out = {f"timing/{name}_s": round(s, 3) for name, s in self.stages.items()}
        out |= {f"timing/worker_{name}_s": round(s, 3) for name, s in self.parts.items()}
        return out | {"timing/total_s": round(self.total(), 3)}

    def table(self) -> str:
        """Markdown: the driver stages (wall seconds, share of the run), then the worker parts (seconds of
        all workers together: with 2 actors about twice the wall time they overlap)."""
        total = self.total()
        lines = ["| stage | seconds | share |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {s:.1f} | {100 * s / total:.0f}% |" for name, s in self.stages.items()]
        other = total - sum(self.stages.values())
        lines += [f"| other | {other:.1f} | {100 * other / total:.0f}% |", f"| **total** | {total:.1f} | 100% |"]
        if self.parts:
            worker_total = sum(self.parts.values())
            lines += ["", "| worker part | seconds | share |", "| --- | ---: | ---: |"]
            lines += [f"| {name} | {s:.1f} | {100 * s / worker_total:.0f}% |" for name, s in self.parts.items()]
        return "\n".join(lines)
