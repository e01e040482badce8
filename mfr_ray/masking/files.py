"""Masking local files and folder trees: the work behind `mfr mask` (kept out of the CLI so jobs and
tests call it directly). Every input file becomes one manifest row, written or not."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mfr_ray.imageio import encode_image, read_image_file
from mfr_ray.masking.engine import MaskEngine, MaskRecord, MaskResult, record_schema

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
ENCODABLE = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}


@dataclass
class MaskJob:
    source: Path
    target: Path
    key: str


def plan_jobs(input_path: Path, output_path: Path) -> list[MaskJob]:
    """One job per image file; a folder keeps its sub-folder tree (any depth) under the output. Keys are
    relative POSIX paths, so masks are reproducible wherever the tree is mounted."""
    if input_path.is_file():
        return [MaskJob(input_path, output_path, input_path.name)]
    files = sorted(p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    jobs = []
    for path in files:
        rel = path.relative_to(input_path)
        target = output_path / rel
        if target.suffix.lower() not in ENCODABLE:
            target = target.with_suffix(".png")
        jobs.append(MaskJob(path, target, rel.as_posix()))
    return jobs


def manifest_path(output_path: Path, fmt: str) -> Path:
    """The manifest sits beside the output: `OUT_manifest.parquet` for a folder, `stem_manifest.*` for a file."""
    name = output_path.name if not output_path.suffix else output_path.stem
    return output_path.with_name(f"{name}_manifest.{fmt}")


def run_jobs(
    engine: MaskEngine,
    jobs: list[MaskJob],
    aligned: bool | None = None,
    on_result: Callable[[MaskJob, np.ndarray | None, MaskResult], None] | None = None,
) -> Iterator[dict]:
    """Mask each job's file and write the masked image; yield its manifest row (input/output paths added)."""
    for job in jobs:
        decoded = read_image_file(job.source, max_pixels=engine.config.max_pixels)
        if decoded.ok:
            result = engine.mask(decoded.image, job.key, aligned=aligned)
            result.record.reason = "; ".join(filter(None, [decoded.reason, result.record.reason]))
        else:
            result = MaskResult(None, MaskRecord(key=job.key, status=decoded.status, reason=decoded.reason))
        row = {"input_path": str(job.source), "output_path": "", **result.record.to_row()}
        if result.image is not None:
            job.target.parent.mkdir(parents=True, exist_ok=True)
            job.target.write_bytes(encode_image(result.image, ENCODABLE[job.target.suffix.lower()]))
            row["output_path"] = str(job.target)
        if on_result is not None:
            on_result(job, decoded.image, result)
        yield row


def write_manifest(rows: list[dict], path: Path) -> Path:
    """Parquet (typed list columns) or CSV (list columns as JSON) by the file's suffix."""
    import pyarrow as pa

    schema = pa.schema([("input_path", pa.string()), ("output_path", pa.string()), *record_schema()])
    table = pa.Table.from_pylist(rows, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        import csv

        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=schema.names)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
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
