"""`mfr ui`: open the MLflow UI on 127.0.0.1 over the same store the jobs write to."""

from __future__ import annotations

import os
import subprocess

import typer


def register(app: typer.Typer) -> None:
    @app.command("ui")
    def ui(
        port: int = typer.Option(5000, help="Port on 127.0.0.1."),
        tracking_uri: str = typer.Option(None, help="Store to browse (default: as the jobs resolve it)."),
    ) -> None:
        """Serve the MLflow UI for this folder's runs (embedded SQLite store by default)."""
        from mfr_ray.config.secrets import redact
        from mfr_ray.tracking import TrackingConfig, ui_command

        cmd = ui_command(TrackingConfig(tracking_uri=tracking_uri), port=port)
        typer.echo(f"MLflow UI on http://127.0.0.1:{port}  ({redact(cmd[3])})")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        raise typer.Exit(subprocess.call(cmd, env=env))
