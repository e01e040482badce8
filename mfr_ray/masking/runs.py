"""One `mfr mask` run over a file or folder tree: which files an earlier run's journal already holds
(`--resume`), when this run may not touch that journal (other options, or an earlier run neither resumed
nor overwritten), then masking the rest and rewriting the manifest from the journal. The CLI only parses
its options into a `MaskRun` and prints what comes back."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mfr_ray.imageio import Status
from mfr_ray.masking.config import MaskingConfig
from mfr_ray.masking.engine import MaskEngine
from mfr_ray.masking.files import (
    Journal,
    MaskJob,
    check_paths,
    is_done,
    journal_rows,
    manifest_path,
    plan_jobs,
    run_jobs,
    scan_journal,
    write_manifest,
)


class RunRefused(ValueError):
    """The run would overwrite the input or mix with an earlier run's rows; the message says what to pass."""


@dataclass
class MaskRun:
    """A planned run: every file under `input_path` (`jobs`), those to mask (`pending`), the earlier run's
    rows kept (key -> journal line), the unreadable journal lines dropped, and where the journal and
    manifest go."""

    input_path: Path
    cfg: MaskingConfig
    aligned: bool | None
    jobs: list[MaskJob]
    pending: list[MaskJob]
    kept: dict[str, int]
    broken: int
    journal_path: Path
    manifest: Path
    options: dict


@dataclass
class RunCounts:
    """Manifest rows per status and masked images per mask type, and the seconds spent masking."""

    statuses: Counter = field(default_factory=Counter)
    types: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def counted(self, rows: Iterable[dict]) -> Iterator[dict]:
        for row in rows:
            self.statuses[row["status"]] += 1
            if row["status"] == Status.OK:
                self.types[row["mask_type"]] += 1
            yield row


def plan_run(
    input_path: Path, output_path: Path, cfg: MaskingConfig, *, manifest_format: str = "parquet",
    aligned: bool | None = None, resume: bool = False, overwrite: bool = False, in_place: bool = False,
    follow_symlinks: bool = False, contact_sheet: Path | None = None,
) -> MaskRun:
    """The files to mask and the earlier rows to keep; raises RunRefused instead of writing anything."""
    input_path, output_path = input_path.absolute(), output_path.absolute()  # rows resume from any cwd
    refused = check_paths(input_path, output_path, in_place)
    if refused:
        raise RunRefused(refused)
    manifest = manifest_path(output_path, manifest_format)
    journal_path = manifest_path(output_path, "jsonl")
    earlier = [p for p in (journal_path, manifest) if p.exists()]
    if earlier and not (resume or overwrite):
        raise RunRefused(f"{earlier[0]} exists from an earlier run: pass --resume to continue it, "
                         "or --overwrite to start clean")
    own_files = [manifest, journal_path, *([contact_sheet] if contact_sheet else [])]
    if input_path.is_dir() and output_path.resolve() != input_path.resolve():
        own_files.append(output_path)
    jobs = plan_jobs(input_path, output_path, follow_symlinks, excluded=own_files)
    flags = {"--aligned": aligned, "--follow-symlinks": follow_symlinks}
    options = json.loads(json.dumps({**cfg.model_dump(mode="json"), **flags}))  # as the journal holds it
    run = MaskRun(input_path, cfg, aligned, jobs, jobs, {}, 0, journal_path, manifest, options)
    if resume and jobs:
        _keep_earlier_rows(run)
    return run


def _keep_earlier_rows(run: MaskRun) -> None:
    """Keep the journal's final rows whose outputs still exist; refuse a journal of other options."""
    earlier_options, entries, run.broken = scan_journal(run.journal_path)
    if entries and earlier_options != run.options:
        earlier_options = earlier_options or {}
        changed = sorted(
            k for k in {*run.options, *earlier_options} if run.options.get(k) != earlier_options.get(k)
        )
        raise RunRefused(f"{run.journal_path} was written with other options ({', '.join(changed)} differ): "
                         "resume with the same options, or --overwrite to start clean")
    run.kept = {job.key: entries[job.key].line for job in run.jobs if is_done(entries.get(job.key), job)}
    run.pending = [job for job in run.jobs if job.key not in run.kept]


def execute_run(
    run: MaskRun, on_result: Callable | None = None, on_row: Callable[[], object] | None = None
) -> RunCounts:
    """Mask the pending files (the journal keeps the earlier rows first), then write the manifest from the
    journal; `on_result(job, before, result)` sees each masked image, `on_row()` each finished file."""
    engine = MaskEngine(run.cfg)
    run.manifest.unlink(missing_ok=True)  # rewritten from the journal at the end; never stale meanwhile
    journal = Journal(run.journal_path, run.options, journal_rows(run.journal_path, set(run.kept.values())))
    start = time.perf_counter()
    try:
        for _ in run_jobs(engine, run.pending, journal, run.aligned, on_result=on_result):
            if on_row is not None:
                on_row()
    finally:
        journal.close()
    counts = RunCounts(seconds=time.perf_counter() - start)
    write_manifest(counts.counted(journal_rows(run.journal_path)), run.manifest)
    return counts
