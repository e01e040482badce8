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
        restart: bool = typer.Option(
            False, "--restart", help="Start the search afresh (new MLflow parent run) instead of resuming it."
        ),
    ) -> None:
        """Search beta, margins and the distillation loss with Ray Tune; every trial is an MLflow run."""
        from mfr_ray.tune import SearchChangedError, TuneConfig, print_search, run_search

        cfg = load_or_exit(config, overrides, expected=TuneConfig)
        if restart:
            cfg.resume = False
        try:
            result = run_search(cfg)
        except SearchChangedError as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        print_search(cfg, result)
