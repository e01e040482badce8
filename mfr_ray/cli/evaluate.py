"""`mfr evaluate CONFIG [key=value ...]` and `mfr compare RUN_A RUN_B`."""

from __future__ import annotations

from pathlib import Path

import typer

from mfr_ray.cli.common import OVERRIDES_HELP, load_or_exit


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        config: Path = typer.Argument(..., help="YAML config of kind `evaluate` (configs/eval_*.yaml)."),
        overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
        output_dir: Path = typer.Option(None, "--output-dir", help="Report folder (default: output_dir/name)."),
    ) -> None:
        """Verification (k-fold, FAR), mask-pair matrix and identification; report + MLflow run."""
        from mfr_ray.evaluation.config import EvaluateConfig
        from mfr_ray.evaluation.metric_names import metric_key
        from mfr_ray.evaluation.runner import evaluate as run_evaluation

        cfg = load_or_exit(config, overrides, EvaluateConfig)
        summary = run_evaluation(cfg, output_dir)
        for row in summary["verification"]:
            far_parts = "  ".join(
                f"TPR@FAR={t}: {row[metric_key('tpr', t)] * 100:.2f}%" for t in summary["far_targets"]
            )
            mean, std = row[metric_key("accuracy")], row[metric_key("accuracy", stat="std")]
            accuracy = f"{mean * 100:.2f} +- {std * 100:.2f}%"
            typer.echo(f"{row['protocol']:>12} {row['variant']:>16}  acc {accuracy}  {far_parts}  "
                       f"EER {row['eer'] * 100:.2f}%")
        typer.echo(f"report: {Path(output_dir or Path(cfg.output_dir) / cfg.name) / 'report.md'}")
        if summary.get("run_id"):
            typer.echo(f"mlflow run: {summary['run_id']}")

    @app.command("compare")
    def compare(
        run_a: str = typer.Argument(..., help="MLflow run id (A, e.g. the no-mask network)."),
        run_b: str = typer.Argument(..., help="MLflow run id (B)."),
        tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store (default: env / ./mlflow.db)."),
        output: Path = typer.Option(None, "--output", help="Also write the table to this Markdown file."),
    ) -> None:
        """Side-by-side metrics of two evaluation runs; logged as an artifact of a new `compare` run."""
        from mfr_ray.config.common import TrackingConfig
        from mfr_ray.evaluation.compare import compare_runs

        table, run_id = compare_runs(run_a, run_b, TrackingConfig(tracking_uri=tracking_uri), output)
        typer.echo(table)
        typer.echo(f"logged as compare.md in run {run_id}")
