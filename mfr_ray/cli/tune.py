"""`mfr tune CONFIG [key=value ...]`: run or resume a Ray Tune search; writes the best train config."""

from __future__ import annotations

from pathlib import Path

import typer

from mfr_ray.cli.common import OVERRIDES_HELP, load_or_exit


def register(app: typer.Typer) -> None:
    @app.command("tune")
    def tune(
        config: Path = typer.Argument(..., help="Search config (kind: tune)."),
        overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    ) -> None:
        """Search beta, margins and the distillation loss with Ray Tune; every trial is an MLflow run."""
        from mfr_ray.tune import TuneConfig, print_search, run_search

        cfg = load_or_exit(config, overrides, expected=TuneConfig)
        print_search(cfg, run_search(cfg))
