"""`mfr mask INPUT OUTPUT`: put masks on a file or a folder tree, write a manifest and a contact sheet."""

from __future__ import annotations

from pathlib import Path

import typer

from mfr_ray.cli.common import load_or_exit


def register(app: typer.Typer) -> None:
    @app.command("mask")
    def mask(
        input_path: Path = typer.Argument(..., exists=True, help="Image file or folder (sub-folders kept)."),
        output_path: Path = typer.Argument(..., help="Output file or folder."),
        config: Path | None = typer.Option(
            None, "--config", "-c", help="YAML of kind `mask` (configs/mask_*.yaml)."
        ),
        overrides: list[str] | None = typer.Option(
            None, "--set", help="Config override key=value (repeatable)."
        ),
        mask_type: str | None = typer.Option(None, "--mask-type", help="One mask type for every image."),
        pattern: str | None = typer.Option(None, "--pattern", help="Pattern name or 'random'."),
        color: str | None = typer.Option(None, "--color", help="#rrggbb or 'random'."),
        mix: str | None = typer.Option(
            None, "--mix", help='Weighted types, e.g. "surgical_blue:1,N95:1,cloth:2".'
        ),
        seed: int | None = typer.Option(None, "--seed", help="Seed of the per-image draws."),
        aligned: bool | None = typer.Option(
            None, "--aligned/--detect", help="Inputs are aligned crops (no detector)."
        ),
        contact_sheet: Path | None = typer.Option(
            None, "--contact-sheet", help="PNG grid of before/after samples."
        ),
        manifest_format: str = typer.Option("parquet", "--manifest-format", help="parquet or csv."),
    ) -> None:
        """Mask every face in INPUT and write the results under OUTPUT, plus OUTPUT_manifest.parquet."""
        import time
        from collections import Counter

        from pydantic import ValidationError
        from rich.progress import track

        from mfr_ray.masking import MaskEngine, MaskingConfig, parse_mix
        from mfr_ray.masking.files import ContactSheet, manifest_path, plan_jobs, run_jobs, write_manifest

        if manifest_format not in ("parquet", "csv"):
            raise typer.BadParameter("use parquet or csv", param_hint="--manifest-format")
        base = load_or_exit(config, overrides, MaskingConfig) if config else MaskingConfig()
        data = base.model_dump()
        data.update(
            {k: v for k, v in {"pattern": pattern, "color": color, "seed": seed}.items() if v is not None}
        )
        try:
            if mix is not None:
                data.update(mix=parse_mix(mix), mask_type=None)
            if mask_type is not None:
                data.update(mask_type=mask_type, mix={})
            cfg = MaskingConfig.model_validate(data)
        except (ValidationError, ValueError) as exc:
            typer.secho(f"invalid masking options: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

        jobs = plan_jobs(input_path, output_path)
        if not jobs:
            typer.secho(f"no images under {input_path}", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(1)
        engine = MaskEngine(cfg)
        sheet = ContactSheet() if contact_sheet else None
        start = time.perf_counter()
        rows = list(
            track(
                run_jobs(
                    engine,
                    jobs,
                    aligned,
                    on_result=lambda job, before, result: sheet and sheet.add(before, result),
                ),
                total=len(jobs),
                description="masking",
            )
        )
        seconds = time.perf_counter() - start
        manifest = write_manifest(rows, manifest_path(output_path, manifest_format))
        statuses = Counter(row["status"] for row in rows)
        types = Counter(row["mask_type"] for row in rows if row["status"] == "ok")
        typer.echo(f"{len(rows)} images in {seconds:.1f} s ({len(rows) / max(seconds, 1e-9):.1f} images/s)")
        typer.echo("status: " + ", ".join(f"{k} {v}" for k, v in statuses.most_common()))
        typer.echo("mask types: " + ", ".join(f"{k} {v}" for k, v in types.most_common()))
        typer.echo(f"manifest: {manifest}")
        if sheet is not None:
            saved = sheet.save(contact_sheet)
            typer.echo(f"contact sheet: {saved}" if saved else "contact sheet: nothing masked, not written")
