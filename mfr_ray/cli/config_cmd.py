"""`mfr config show CONFIG [key=value ...]`: print the resolved, validated config (secrets redacted)."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from mfr_ray.cli.common import OVERRIDES_HELP, load_or_exit
from mfr_ray.config import dump_config


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Inspect experiment configs.", no_args_is_help=True)

    @config_app.command("show")
    def show(
        config: Path = typer.Argument(..., help="YAML config file (configs/...)."),
        overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    ) -> None:
        """Validate CONFIG and print it with every default filled in."""
        model = load_or_exit(config, overrides)
        typer.echo(yaml.safe_dump(dump_config(model), sort_keys=False))

    app.add_typer(config_app, name="config")
