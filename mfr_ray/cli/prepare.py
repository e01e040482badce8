"""`mfr prepare CONFIG [key=value ...]`: index, align and mask a face dataset into Parquet shards."""

from __future__ import annotations

from pathlib import Path

import typer

from mfr_ray.cli.common import OVERRIDES_HELP, load_or_exit


def register(app: typer.Typer) -> None:
    @app.command("prepare")
    def prepare(
        config: Path = typer.Argument(..., help="YAML config of kind `prepare` (configs/prepare_*.yaml)."),
        overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    ) -> None:
        """Build (or resume) a masked, aligned dataset; rerunning a finished one does nothing."""
        from mfr_ray.data.config import PrepareConfig
        from mfr_ray.data.job import prepare_and_report

        cfg = load_or_exit(config, overrides, expected=PrepareConfig)
        raise typer.Exit(prepare_and_report(cfg, progress=progress))
