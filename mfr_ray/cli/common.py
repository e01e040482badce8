"""Pieces every subcommand shares: config loading with readable errors."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import BaseModel

from mfr_ray.config import ConfigError, load_config

OVERRIDES_HELP = "Overrides as key=value (dotted keys for nested sections), applied after the file."


def load_or_exit(path: Path, overrides: list[str] | None, expected: type[BaseModel] | None = None) -> BaseModel:
    """Load a config or exit with status 2 and the validation message (names key and file)."""
    try:
        return load_config(path, overrides or [], expected=expected)
    except ConfigError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
