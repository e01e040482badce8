"""The `mfr` command. Each subcommand lives in its own module with a `register(app)` function and
imports its heavy dependencies (torch, ray, dlib) inside the command, so `mfr --help` stays fast. The
`jobs/*.py` scripts that `ray job submit` runs are these subcommands too (`run_job`)."""

from __future__ import annotations

import importlib
import sys

import typer

from mfr_ray import __version__

COMMAND_MODULES = [  # in pipeline order, as `mfr --help` lists them
    "mfr_ray.cli.mask",
    "mfr_ray.cli.prepare",
    "mfr_ray.cli.train",
    "mfr_ray.cli.tune",
    "mfr_ray.cli.evaluate",
    "mfr_ray.cli.serve",
    "mfr_ray.cli.quickstart",
    "mfr_ray.cli.ui",
    "mfr_ray.cli.doctor",
    "mfr_ray.cli.config_cmd",
]

app = typer.Typer(
    name="mfr",
    help="mfr-ray: make face recognition robust to masks (mask, prepare, train, tune, evaluate).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mfr-ray {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """mfr-ray command line."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


def job_arguments(argv: list[str]) -> list[str]:
    """The `mfr COMMAND` arguments of a job's command line: a leading `--config FILE` (the jobs' earlier
    spelling, kept for users' own scripts and `ray job submit` lines; the shipped manifests in `cluster/`
    pass the config positionally) names the config argument."""
    return argv[1:] if argv[:1] == ["--config"] else argv


def run_job(command: str) -> None:
    """A `jobs/*.py` entrypoint (what `ray job submit` runs): the `mfr COMMAND` command itself, with its
    arguments, options, messages and exit status."""
    typer.main.get_command(app).commands[command].main(
        job_arguments(sys.argv[1:]), prog_name=f"python {sys.argv[0]}"
    )
