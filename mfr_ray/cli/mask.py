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
        resume: bool = typer.Option(
            False,
            "--resume",
            help="Continue a killed run: keep the rows of OUTPUT_manifest.jsonl, redo the rest.",
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
        import json
        import sys
        import time

        from pydantic import ValidationError
        from tqdm import tqdm

        from mfr_ray.imageio import Status
        from mfr_ray.masking import MaskEngine, MaskingConfig, parse_mix
        from mfr_ray.masking.files import (
            ContactSheet,
            Journal,
            check_paths,
            is_done,
            journal_rows,
            manifest_path,
            plan_jobs,
            run_jobs,
            scan_journal,
            write_manifest,
        )

        if manifest_format not in ("parquet", "csv"):
            raise typer.BadParameter("use parquet or csv", param_hint="--manifest-format")
        if resume and overwrite:
            raise typer.BadParameter("use one of --resume and --overwrite", param_hint="--resume")
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
            refuse(f"invalid masking options: {exc}")

        input_path, output_path = input_path.absolute(), output_path.absolute()  # rows resume from any cwd
        refused = check_paths(input_path, output_path, in_place)
        if refused:
            refuse(refused)
        manifest = manifest_path(output_path, manifest_format)
        journal_path = manifest_path(output_path, "jsonl")
        earlier = [p for p in (journal_path, manifest) if p.exists()]
        if earlier and not (resume or overwrite):
            refuse(f"{earlier[0]} exists from an earlier run: pass --resume to continue it, "
                   "or --overwrite to start clean")
        own_files = [manifest, journal_path, *([contact_sheet] if contact_sheet else [])]
        if input_path.is_dir() and output_path.resolve() != input_path.resolve():
            own_files.append(output_path)
        jobs = plan_jobs(input_path, output_path, follow_symlinks, excluded=own_files)
        if not jobs:
            typer.secho(f"no files under {input_path}", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(1)
        flags = {"--aligned": aligned, "--follow-symlinks": follow_symlinks}
        options = json.loads(json.dumps({**cfg.model_dump(mode="json"), **flags}))  # as the journal holds it
        earlier_options, entries, broken = scan_journal(journal_path) if resume else (None, {}, 0)
        if entries and earlier_options != options:
            changed = sorted(
                key
                for key in {*options, *(earlier_options or {})}
                if options.get(key) != (earlier_options or {}).get(key)
            )
            refuse(f"{journal_path} was written with other options ({', '.join(changed)} differ): resume "
                   "with the same options, or --overwrite to start clean")
        kept = {job.key: entries[job.key].line for job in jobs if is_done(entries.get(job.key), job)}
        pending = [job for job in jobs if job.key not in kept]
        if resume:
            typer.echo(
                f"resume: {len(kept)} of {len(jobs)} files done in {journal_path}, {len(pending)} to do"
                + (f" ({broken} unreadable journal lines dropped)" if broken else "")
            )
        engine = MaskEngine(cfg)
        sheet = ContactSheet() if contact_sheet else None
        manifest.unlink(missing_ok=True)  # rewritten from the journal at the end; never stale meanwhile
        journal = Journal(journal_path, options, journal_rows(journal_path, set(kept.values())))
        start = time.perf_counter()
        try:
            with tqdm(
                total=len(pending), unit="img", desc="mask", file=sys.stderr, disable=not pending
            ) as bar:
                for row in run_jobs(
                    engine,
                    pending,
                    journal,
                    aligned,
                    on_result=lambda job, before, result: sheet and sheet.add(before, result),
                ):
                    bar.update()
        finally:
            journal.close()
        seconds = time.perf_counter() - start
        statuses, types = Counter(), Counter()

        def counted(rows):
            for row in rows:
                statuses[row["status"]] += 1
                if row["status"] == Status.OK:
                    types[row["mask_type"]] += 1
                yield row

        write_manifest(counted(journal_rows(journal_path)), manifest)
        typer.echo(summary_table(statuses, types, len(jobs), len(pending), len(kept), seconds))
        typer.echo(f"manifest: {manifest} (rows as they finished: {journal_path})")
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
