"""Side-by-side comparison of the metrics of two MLflow runs (e.g. the no-mask vs the mask network)."""

from __future__ import annotations

import math
from pathlib import Path

from mfr_ray.config.common import TrackingConfig


def compare_metrics(a: dict[str, float], b: dict[str, float], names: tuple[str, str]) -> list[dict]:
    """Rows of (metric, a, b, b - a) over the metrics both runs have, sorted by metric name."""
    rows = []
    for key in sorted(set(a) & set(b)):
        delta = b[key] - a[key]
        rows.append({"metric": key, names[0]: a[key], names[1]: b[key], "delta": delta})
    return rows


def format_table(rows: list[dict], names: tuple[str, str]) -> str:
    """A Markdown table (readable in a terminal too)."""
    def cell(value: float) -> str:
        return "nan" if math.isnan(value) else f"{value:.4f}"

    lines = [f"| metric | {names[0]} | {names[1]} | delta |", "|---|---:|---:|---:|"]
    lines += [f"| {r['metric']} | {cell(r[names[0]])} | {cell(r[names[1]])} | {cell(r['delta']):>s} |" for r in rows]
    return "\n".join(lines) + "\n"


def compare_runs(run_a: str, run_b: str, tracking: TrackingConfig | None = None,
                 output: Path | None = None) -> tuple[str, str]:
    """Compare two runs by id; log the table as `compare.md` in a new run tagged with both ids and
    return (table, new run id)."""
    import mlflow

    from mfr_ray.tracking import resolve_tracking_uri, start_run

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(tracking))
    runs = [client.get_run(run_a), client.get_run(run_b)]
    names = tuple(r.info.run_name or r.info.run_id[:8] for r in runs)
    if names[0] == names[1]:
        names = (f"{names[0]} ({run_a[:6]})", f"{names[1]} ({run_b[:6]})")
    table = format_table(compare_metrics(runs[0].data.metrics, runs[1].data.metrics, names), names)
    header = f"# {names[0]} vs {names[1]}\n\nruns `{run_a}` (A) and `{run_b}` (B); delta = B - A\n\n"
    with start_run(tracking, run_name=f"compare {names[0]} vs {names[1]}",
                   tags={"mfr.stage": "compare", "mfr.run_a": run_a, "mfr.run_b": run_b}) as run:
        mlflow.log_text(header + table, "compare.md")
        new_id = run.info.run_id
    if output is not None:
        output.write_text(header + table)
    return table, new_id
