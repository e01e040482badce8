"""`mfr train CONFIG [key=value ...]`: train (or resume, same run name) a masked-face recognizer on Ray Train."""

from __future__ import annotations

from pathlib import Path

import typer

from mfr_ray.cli.common import OVERRIDES_HELP, load_or_exit


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        config: Path = typer.Argument(..., help="YAML config of kind `train` (configs/train_*.yaml)."),
        overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
        run_name: str = typer.Option(
            None, "--run-name", help="Run name (default: the config's name); reuse to resume."
        ),
    ) -> None:
        """Train with ArcFace + masked/unmasked distillation (or a baseline); rerunning a name resumes it."""
        from mfr_ray.train import TrainConfig, train_and_report

        cfg = load_or_exit(config, overrides, expected=TrainConfig)
        raise typer.Exit(train_and_report(cfg, run_name=run_name))
