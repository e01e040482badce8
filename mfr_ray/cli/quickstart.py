"""`mfr quickstart [CONFIG] [--quick]`: raw faces to a mask-robust model and its report, end to end."""

from __future__ import annotations

from pathlib import Path

import typer

from mfr_ray.cli.common import OVERRIDES_HELP, load_or_exit


def register(app: typer.Typer) -> None:
    @app.command("quickstart")
    def quickstart(
        config: Path = typer.Argument(Path("configs/quickstart.yaml"), help="Quickstart config."),
        overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
        quick: bool = typer.Option(False, "--quick", help="A few identities, pairs and steps (minutes)."),
    ) -> None:
        """Prepare, train the no-mask, mask and frozen-teacher networks, evaluate all four models, compare."""
        from mfr_ray.quickstart import QuickstartConfig, print_outcome, run_quickstart

        cfg = load_or_exit(config, [*(overrides or []), *(["quick=true"] if quick else [])], expected=QuickstartConfig)
        print_outcome(cfg, run_quickstart(cfg))
