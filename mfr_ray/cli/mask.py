"""`mfr mask INPUT OUTPUT`: put masks on a file or a folder tree, write a manifest and a contact sheet."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NoReturn

import typer

from mfr_ray.cli.common import load_or_exit


def refuse(message: str) -> NoReturn:
    """A usage error: the reason in red on stderr, exit status 2, nothing written."""
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command("mask")(mask)


def mask(
    input_path: Path = typer.Argument(..., exists=True, help="Image file or folder (sub-folders kept)."),
    output_path: Path = typer.Argument(..., help="Output file or folder."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML of kind `mask` (configs/mask_*.yaml)."),
    overrides: list[str] | None = typer.Option(None, "--set", help="Config override key=value (repeatable)."),
    mask_type: str | None = typer.Option(None, "--mask-type", help="One mask type for every image."),
    pattern: str | None = typer.Option(None, "--pattern", help="Pattern name or 'random'."),
    color: str | None = typer.Option(None, "--color", help="#rrggbb or 'random'."),
    mix: str | None = typer.Option(None, "--mix", help='Weighted types, e.g. "surgical_blue:1,N95:1,cloth:2".'),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the per-image draws."),
    aligned: bool | None = typer.Option(None, "--aligned/--detect", help="Inputs are aligned crops (no detector)."),
    contact_sheet: Path | None = typer.Option(None, "--contact-sheet", help="PNG grid of before/after samples."),
    manifest_format: str = typer.Option("parquet", "--manifest-format", help="parquet or csv."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a killed run: keep the rows of OUTPUT_manifest.jsonl, redo the rest."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start clean over an earlier run's manifest (its rows are dropped)."
    ),
    in_place: bool = typer.Option(
        False, "--in-place", help="Allow OUTPUT to be INPUT or inside it (overwrites originals)."
    ),
    follow_symlinks: bool = typer.Option(
        False, "--follow-symlinks", help="Read symlinks that point inside INPUT (never outside it)."
    ),
) -> None:
    """Mask every face in INPUT and write the results under OUTPUT, plus OUTPUT_manifest.parquet.

    Every file under INPUT is one manifest row with a status and a reason: non-images are `skipped`,
    symlinks are `skipped` unless --follow-symlinks. Outputs keep the relative path; a file in a format
    that cannot be written (.tif, .gif, ...) becomes PNG with its suffix kept (a.tif -> a.tif.png), so no
    two inputs share an output. Rows are appended to OUTPUT_manifest.jsonl as files finish; --resume
    continues a killed run. OUTPUT may not be INPUT or inside it unless --in-place.
    """
    from mfr_ray.masking.runs import RunRefused, plan_run

    if manifest_format not in ("parquet", "csv"):
        raise typer.BadParameter("use parquet or csv", param_hint="--manifest-format")
    if resume and overwrite:
        raise typer.BadParameter("use one of --resume and --overwrite", param_hint="--resume")
    cfg = masking_config(config, overrides, mix, mask_type=mask_type, pattern=pattern, color=color, seed=seed)
    try:
        run = plan_run(input_path, output_path, cfg, manifest_format=manifest_format, aligned=aligned,
                       resume=resume, overwrite=overwrite, in_place=in_place, follow_symlinks=follow_symlinks,
                       contact_sheet=contact_sheet)
    except RunRefused as exc:
        refuse(str(exc))
    mask_and_report(run, contact_sheet, resume)


def masking_config(config: Path | None, overrides: list[str] | None, mix: str | None, **flags):
    """The config file (or the defaults) with the command line's masking options over it."""
    from pydantic import ValidationError

    from mfr_ray.masking import MaskingConfig, parse_mix

    base = load_or_exit(config, overrides, MaskingConfig) if config else MaskingConfig()
    data = base.model_dump()
    data.update({k: v for k, v in flags.items() if k != "mask_type" and v is not None})
    try:
        if mix is not None:
            data.update(mix=parse_mix(mix), mask_type=None)
        if flags["mask_type"] is not None:
            data.update(mask_type=flags["mask_type"], mix={})
        return MaskingConfig.model_validate(data)
    except (ValidationError, ValueError) as exc:
        refuse(f"invalid masking options: {exc}")


def mask_and_report(run, contact_sheet: Path | None, resume: bool) -> None:
    """Run it under a progress bar, then print the counts, the manifest and the contact sheet."""
    import sys

    from tqdm import tqdm

    from mfr_ray.masking.files import ContactSheet
    from mfr_ray.masking.runs import execute_run

    if not run.jobs:
        typer.secho(f"no files under {run.input_path}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(1)
    if resume:
        typer.echo(
            f"resume: {len(run.kept)} of {len(run.jobs)} files done in {run.journal_path}, "
            f"{len(run.pending)} to do"
            + (f" ({run.broken} unreadable journal lines dropped)" if run.broken else "")
        )
    sheet = ContactSheet() if contact_sheet else None
    bar_options = {"unit": "img", "desc": "mask", "file": sys.stderr, "disable": not run.pending}
    with tqdm(total=len(run.pending), **bar_options) as bar:
        counts = execute_run(
            run, on_result=lambda job, before, result: sheet and sheet.add(before, result), on_row=bar.update
        )
    typer.echo(summary_table(counts.statuses, counts.types, len(run.jobs), len(run.pending), len(run.kept),
                             counts.seconds))
    typer.echo(f"manifest: {run.manifest} (rows as they finished: {run.journal_path})")
    if sheet is not None:
        saved = sheet.save(contact_sheet)
        typer.echo(f"contact sheet: {saved}" if saved else "contact sheet: nothing masked, not written")


def summary_table(
    statuses: Counter, types: Counter, files_in: int, processed: int, kept: int, seconds: float
) -> str:
    """Rows per status and mask type, and the files-in = rows-out check."""
    rows_out = sum(statuses.values())
    lines = [
        (
            f"this run: {processed} files processed in {seconds:.1f} s "
            f"({processed / max(seconds, 1e-9):.1f} files/s), {kept} kept from the earlier run"
        ),
        f"{'status':<14} {'rows':>8}",
        *(f"{status:<14} {count:>8}" for status, count in sorted(statuses.items())),
        f"{'total':<14} {rows_out:>8}",
        f"check: files in {files_in} = rows out {rows_out}: "
        + ("OK" if files_in == rows_out else "MISMATCH"),
        "mask types: " + (", ".join(f"{k} {v}" for k, v in types.most_common()) or "none"),
    ]
    return "\n".join(lines)
