"""`mfr config show CONFIG [key=value ...] [--origin]`: print the resolved, validated config (its `base:`
chain merged, secrets redacted); `--origin` names, per key, the file (or the command line) it came from."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from mfr_ray.cli.common import OVERRIDES_HELP, load_or_exit
from mfr_ray.config import ConfigError, dump_config, flatten_config, origin_of, read_config_with_origins

DEFAULT_ORIGIN = "(code default)"
ORIGIN_COLUMN = 64


def origin_lines(config: Path, overrides: list[str], model) -> list[str]:
    """`key: value  # origin` for every leaf of the resolved config, in the model's order."""
    _, origins = read_config_with_origins(config, overrides, type(model))
    flat = flatten_config(model)
    rows = [(f"{key}: {_flow(value)}", origin_of(origins, key) or DEFAULT_ORIGIN) for key, value in flat.items()]
    width = min(ORIGIN_COLUMN, max(len(text) for text, _ in rows))
    return [f"{text.ljust(width)}  # {origin}" for text, origin in rows]


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Inspect experiment configs.", no_args_is_help=True)

    @config_app.command("show")
    def show(
        config: Path = typer.Argument(..., help="YAML config file (configs/...)."),
        overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
        origin: bool = typer.Option(
            False, "--origin", help="One line per key with the file (base chain, command line) it came from."
        ),
    ) -> None:
        """Validate CONFIG (its `base:` chain merged) and print it with every default filled in."""
        model = load_or_exit(config, overrides)
        if not origin:
            typer.echo(yaml.safe_dump(dump_config(model), sort_keys=False))
            return
        try:
            lines = origin_lines(config, overrides or [], model)
        except ConfigError as exc:  # pragma: no cover - load_or_exit read the same files
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        typer.echo("\n".join(lines))

    app.add_typer(config_app, name="config")
