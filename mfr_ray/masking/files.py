"""Masking local files and folder trees: the work behind `mfr mask` (kept out of the CLI so jobs and
tests call it directly). Every file under the input becomes one manifest row, written or not, and each
row is appended to a journal as soon as its file is done, so a killed run loses nothing and resumes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mfr_ray.imageio import IMAGE_SUFFIXES, DecodedImage, Status, encode_image, read_image_file
from mfr_ray.masking.engine import MaskEngine
from mfr_ray.masking.records import MaskRecord, MaskResult, record_schema

# Image formats the decoder cannot read here: still tried (a mislabelled JPEG decodes), else `unsupported`.
UNSUPPORTED_SUFFIXES = {
    ".heic": "HEIC",
    ".heif": "HEIF",
    ".avif": "AVIF",
    ".jxl": "JPEG XL",
    ".jxr": "JPEG XR",
    ".psd": "Photoshop PSD",
}
ENCODABLE = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}
# A row with one of these statuses is final: `--resume` keeps it. `error` (an unexpected failure) is retried.
RETRIED_STATUSES = {Status.ERROR}


@dataclass
class MaskJob:
    """One input file. `skip` is (status, reason) for a file that is never decoded (not an image, symlink)."""

    source: Path
    target: Path | None
    key: str
    skip: tuple[str, str] | None = None


def output_name(name: str) -> str:
    """Writable suffixes are kept; any other file is written as PNG with its own suffix kept in the name
    (`a.tif` -> `a.tif.png`), so `a.png` and `a.tif` in one folder never share an output."""
    return name if Path(name).suffix.lower() in ENCODABLE else f"{name}.png"


def is_folder_output(input_path: Path, output_path: Path) -> bool:
    """A folder input always writes a folder; a file input writes into a folder when OUTPUT is an existing
    folder or has no suffix, else to OUTPUT itself."""
    return input_path.is_dir() or output_path.is_dir() or not output_path.suffix


def write_replacing(path: Path, data: bytes) -> None:
    """Write `path` through a temporary file beside it and a rename: a run killed mid-write (`--in-place`
    rewrites originals) leaves the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with staging.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def check_paths(input_path: Path, output_path: Path, in_place: bool) -> str | None:
    """Why writing `input_path` to `output_path` is refused, or None. Outputs over or inside the input
    would overwrite originals (or be read back as inputs), so they need `in_place`."""
    source, target = input_path.resolve(), output_path.resolve()
    if input_path.is_file():
        if is_folder_output(input_path, output_path):
            target = (output_path / output_name(input_path.name)).resolve()
        elif target.suffix.lower() not in ENCODABLE:
            return (
                f"cannot write {output_path.suffix} images; name the output file "
                f"{'/'.join(sorted(ENCODABLE))}, or give a folder (a path without suffix)"
            )
        if target == source and not in_place:
            return f"output {target} is the input file; pass --in-place to overwrite it"
        return None
    if input_path.is_dir() and output_path.exists() and not output_path.is_dir():
        return f"output {output_path} is a file; a folder input needs an output folder"
    if input_path.is_dir() and not in_place and (target == source or source in target.parents):
        where = "is" if target == source else "is inside"
        return f"output {output_path} {where} the input {input_path}; pass --in-place to write there anyway"
    return None


def _walk(root: Path, follow_symlinks: bool, excluded: set[Path]) -> Iterable[tuple[Path, str | None]]:
    """Every entry under `root` as (path, why it is skipped or None). Symlinks are rows of their own and
    are not followed unless asked; a followed link must stay inside the input and not loop."""
    real_root = root.resolve()
    seen = {real_root}
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            yield folder, f"cannot list folder: {exc.strerror or exc}"
            continue
        for entry in entries:
            path = Path(entry.path)
            if excluded and path.resolve() in excluded:
                continue
            if entry.is_symlink():
                if not follow_symlinks:
                    yield path, "symlink not followed (pass --follow-symlinks to read links inside the input)"
                    continue
                target = path.resolve()
                if not target.exists():
                    yield path, "broken symlink"
                elif not target.is_relative_to(real_root):
                    yield path, "symlink points outside the input, not followed"
                elif target.is_dir():
                    if target in seen:
                        yield path, "symlink to a folder already read (loop), not followed"
                    else:
                        seen.add(target)
                        folders.append(path)
                else:
                    yield path, None
            elif entry.is_dir(follow_symlinks=False):
                if follow_symlinks:
                    seen.add(path.resolve())
                folders.append(path)
            elif entry.is_file(follow_symlinks=False):
                yield path, None
            else:
                yield path, "not a regular file"


def path_text(path: Path | str) -> str:
    """A path as manifest text: bytes that are not UTF-8 (legal in Linux file names) shown as \\x escapes,
    so the row can be written and the file is still found by its escaped name."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _skip_reason(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix in UNSUPPORTED_SUFFIXES:
        return None
    return f"not an image: suffix {suffix!r}" if suffix else "not an image: no file suffix"


def plan_jobs(
    input_path: Path, output_path: Path, follow_symlinks: bool = False, excluded: Iterable[Path] = ()
) -> list[MaskJob]:
    """One job per file under the input (images or not), sorted by key; a folder keeps its sub-folder tree
    (any depth) under the output. Keys are relative POSIX paths, so masks are reproducible wherever the
    tree is mounted. `excluded` are this run's own files (manifest, output folder), left out if inside the input."""
    if input_path.is_file():
        folder = is_folder_output(input_path, output_path)
        target = output_path / output_name(input_path.name) if folder else output_path
        why = _skip_reason(input_path)
        skip = (Status.SKIPPED, why) if why else None
        return [MaskJob(input_path, target, path_text(input_path.name), skip)]
    root = input_path.resolve()
    inside = {path for path in (p.resolve() for p in excluded) if path.is_relative_to(root)}
    jobs = []
    walked = _walk(input_path, follow_symlinks, inside)
    for path, why in sorted(walked, key=lambda item: item[0].relative_to(input_path).as_posix()):
        rel = path.relative_to(input_path)
        why = why or _skip_reason(path)
        skip = (Status.SKIPPED, why) if why else None
        jobs.append(MaskJob(path, None if skip else output_path / rel, path_text(rel.as_posix()), skip))
    _name_outputs([job for job in jobs if job.skip is None])
    return jobs


def _name_outputs(jobs: list[MaskJob]) -> None:
    """Turn each job's `target` (the input's place under the output) into its output file, unique even
    where two names differ only by case or `a.tif.png` lies beside `a.tif`: names kept as they are come
    first, then converted names, each taken in key order; a name already taken gets `~2`, `~3`, ..."""
    taken = set()
    for job in sorted(jobs, key=lambda job: (output_name(job.target.name) != job.target.name, job.key)):
        name = output_name(job.target.name)
        target, number = job.target.with_name(name), 1
        while target.as_posix().casefold() in taken:
            number += 1
            stem, suffix = os.path.splitext(name)
            target = job.target.with_name(f"{stem}~{number}{suffix}")
        taken.add(target.as_posix().casefold())
        job.target = target


def manifest_path(output_path: Path, fmt: str) -> Path:
    """The manifest sits beside the output: `OUT_manifest.parquet` for a folder, `stem_manifest.*` for a file;
    `fmt` "jsonl" is the journal appended while the run goes."""
    name = output_path.name if not output_path.suffix else output_path.stem
    return output_path.with_name(f"{name}_manifest.{fmt}")


def mask_job(
    engine: MaskEngine, job: MaskJob, aligned: bool | None = None
) -> tuple[dict, np.ndarray | None, MaskResult]:
    """Mask one job's file and write the masked image; return its manifest row (input/output paths added),
    the decoded input and the result. Never raises: an unexpected failure is an `error` row."""
    decoded_image = None
    try:
        if job.skip is not None:
            result = MaskResult(None, MaskRecord(key=job.key, status=job.skip[0], reason=job.skip[1]))
        else:
            decoded = read_image_file(job.source, max_pixels=engine.config.max_pixels)
            decoded_image = decoded.image
            name = UNSUPPORTED_SUFFIXES.get(job.source.suffix.lower())
            if name is not None and decoded.status == Status.DECODE_ERROR:
                reason = f"{name} images cannot be decoded here ({decoded.reason})"
                decoded = DecodedImage(None, Status.UNSUPPORTED, reason)
            result = engine.mask_decoded(decoded, job.key, aligned=aligned)
        row = {"input_path": path_text(job.source), "output_path": "", **result.record.to_row()}
        row["reason"] = path_text(row["reason"])  # it may quote a file name
        if result.image is not None:
            write_replacing(job.target, encode_image(result.image, ENCODABLE[job.target.suffix.lower()]))
            row["output_path"] = path_text(job.target)
    except Exception as exc:  # noqa: BLE001  one file's failure is its row, not the end of the run
        result = MaskResult(
            None,
            MaskRecord(key=job.key, status=Status.ERROR, reason=path_text(f"{type(exc).__name__}: {exc}")),
        )
        row = {"input_path": path_text(job.source), "output_path": "", **result.record.to_row()}
    return row, decoded_image, result


@dataclass(frozen=True)
class JournalEntry:
    """What `--resume` needs to know of one journal row, without holding the whole row in memory."""

    line: int
    input_path: str
    output_path: str
    status: str


def scan_journal(path: Path) -> tuple[dict | None, dict[str, JournalEntry], int]:
    """A journal's options line, its rows by key (the last row of a key wins) and the number of unreadable
    lines (the line a killed run was writing)."""
    options, entries, broken = None, {}, 0
    for number, row in _journal_lines(path):
        if row is None:
            broken += 1
        elif number == 0 and "options" in row:
            options = row["options"]
        else:
            entries[row["key"]] = JournalEntry(number, row["input_path"], row["output_path"], row["status"])
    return options, entries, broken


def journal_rows(path: Path, lines: set[int] | None = None) -> Iterator[dict]:
    """The rows of a journal, streamed: all of them, or those at the given line numbers."""
    for number, row in _journal_lines(path):
        if row is not None and "key" in row and (lines is None or number in lines):
            yield row


def _journal_lines(path: Path) -> Iterator[tuple[int, dict | None]]:
    if not path.exists():
        return
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            valid = isinstance(row, dict) and (
                "options" in row or {"key", "input_path", "status"} <= row.keys()
            )
            yield number, row if valid else None


def is_done(entry: JournalEntry | None, job: MaskJob) -> bool:
    """A journal row `--resume` keeps: same input, a final status, and its output still on disk."""
    if entry is None or entry.input_path != path_text(job.source) or entry.status in RETRIED_STATUSES:
        return False
    if entry.status == Status.OK:
        output = job.target if job.target and entry.output_path == path_text(job.target) else None
        return output is not None and output.is_file() and output.stat().st_size > 0
    return True


class Journal:
    """The manifest as it grows: the run's options on the first line, then one JSON row per line, flushed
    per row and fsynced at most once a second (and on close), so a crash at image 900,000 keeps the 899,999
    rows before it, and a resume can check it masks with the same options."""

    def __init__(self, path: Path, options: dict, kept_rows: Iterable[dict], fsync_every_s: float = 1.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".tmp")
        with staging.open("w", encoding="utf-8") as fh:  # kept rows first, each once, then the new ones
            fh.write(json.dumps({"options": options}) + "\n")
            for row in kept_rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(staging, path)
        self.path, self.fsync_every_s = path, fsync_every_s
        self._fh = path.open("a", encoding="utf-8")
        self._synced = time.monotonic()

    def append(self, row: dict) -> None:
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        if time.monotonic() - self._synced >= self.fsync_every_s:
            os.fsync(self._fh.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


def run_jobs(
    engine: MaskEngine,
    jobs: list[MaskJob],
    journal: Journal,
    aligned: bool | None = None,
    on_result: Callable[[MaskJob, np.ndarray | None, MaskResult], None] | None = None,
) -> Iterable[dict]:
    """Mask each job, append its row to the journal, and yield the row."""
    for job in jobs:
        row, before, result = mask_job(engine, job, aligned)
        journal.append(row)
        if on_result is not None:
            on_result(job, before, result)
        yield row


def write_manifest(rows: Iterable[dict], path: Path, batch_rows: int = 10_000) -> Path:
    """Parquet (typed list columns) or CSV (list columns as JSON) by the file's suffix, streamed in batches
    to a staging file and renamed, so a reader never sees half a manifest."""
    import pyarrow as pa

    schema = pa.schema([("input_path", pa.string()), ("output_path", pa.string()), *record_schema()])
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        with pq.ParquetWriter(staging, schema) as writer:
            batch = []
            for row in rows:
                batch.append(row)
                if len(batch) >= batch_rows:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    else:
        import csv

        with staging.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=schema.names)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    os.replace(staging, path)
    return path


class ContactSheet:
    """Collects up to `limit` before/after pairs (thumbnails only) and draws them as a labelled grid."""

    def __init__(self, limit: int = 24, columns: int = 4, height: int = 160):
        self.limit, self.columns, self.height = limit, columns, height
        self.cells: list[np.ndarray] = []

    def add(self, before: np.ndarray | None, result: MaskResult) -> None:
        if before is None or result.image is None or len(self.cells) >= self.limit:
            return
        scale = self.height / before.shape[0]
        size = (max(1, round(before.shape[1] * scale)), self.height)
        pair = np.hstack(
            [cv2.resize(img, size, interpolation=cv2.INTER_AREA) for img in (before, result.image)]
        )
        rec = result.record
        label = f"{rec.mask_type} {rec.template_view} {rec.pattern or rec.color or ''}".strip()
        cv2.putText(pair, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(pair, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
        self.cells.append(pair)

    def save(self, path: Path) -> Path | None:
        if not self.cells:
            return None
        width = max(c.shape[1] for c in self.cells)
        cells = [np.pad(c, ((2, 2), (2, width - c.shape[1] + 2), (0, 0))) for c in self.cells]
        cells += [np.zeros_like(cells[0])] * (-len(cells) % self.columns)
        rows = [np.hstack(cells[i : i + self.columns]) for i in range(0, len(cells), self.columns)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(np.vstack(rows), "png"))
        return path
