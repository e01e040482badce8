"""`mfr enrol`: every file of `<root>/<identity>/<image>` (local or s3://) not yet in a gallery, embedded by
Ray Data actors that each hold the package (preparation's read -> decode -> align path), written as one
new gallery part. Every file is a `photo` row with a status (files in = photo rows out); with synthetic
masks, each `ok` photo also adds its masked copies as `synthetic:<type>` templates."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mfr_ray.config.common import RayConfig, StorageConfig
from mfr_ray.data.index import identity_of
from mfr_ray.serve.gallery import Gallery, _utc_now, result_row, rows_of
from mfr_ray.serve.package import EmbedResult, load_package
from mfr_ray.serve.synthetic import PHOTO, SyntheticMasks, SyntheticTemplate

MAX_FILE_BYTES = 64 * 2**20
UNLABELLED_REASON = "not inside an <identity>/ folder: the folder name is the identity"


class EnrolEmbedder:
    """Ray Data batch UDF (one per actor, like preparation's ShardProcessor): read -> decode -> align ->
    embed the files of a batch with the package's own path; every file leaves a status. Synthetic
    templates come back as fixed-size columns (count per file; an empty kind where the engine drew none)."""

    def __init__(self, package_uri: str, root: str, storage: StorageConfig | None, synthetic: SyntheticMasks,
                 num_threads: int = 1, runtime: str | None = None):
        self.package = load_package(package_uri, storage, num_threads=num_threads).use_runtime(runtime)
        self.root, self.storage, self.synthetic = root, storage, synthetic

    def _read(self, keys: list[str]) -> tuple[list[bytes], list[int], dict[int, str]]:
        from mfr_ray.storage import StorageError, join_uri, read_bytes

        data, slots, failed = [], [], {}
        for i, key in enumerate(keys):
            try:
                data.append(read_bytes(join_uri(self.root, key), self.storage))
                slots.append(i)
            except StorageError as exc:
                failed[i] = str(exc)
        return data, slots, failed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["source_key"]]
        out = empty_batch(keys, self.synthetic.count, self.package.embedding_size)
        data, slots, failed = self._read(keys)
        for i, reason in failed.items():
            out["status"][i], out["reason"][i] = "decode_error", reason
        for i, result in zip(slots, self.package.embed_images(data, synthetic=self.synthetic), strict=True):
            put_result(out, i, result)
        return out


def empty_batch(keys: list[str], count: int, size: int) -> dict[str, np.ndarray]:
    n = len(keys)
    return {"source_key": np.array(keys, dtype=object), "status": np.array(["ok"] * n, dtype=object),
            "reason": np.array([""] * n, dtype=object), "align_method": np.array(["none"] * n, dtype=object),
            "embedding": np.zeros((n, size), np.float32), "mask_probability": np.full(n, np.nan, np.float32),
            "synthetic_kind": np.full((n, count), "", dtype="<U64"),  # fixed width: Arrow takes it as is
            "synthetic_embedding": np.zeros((n, count, size), np.float32),
            "synthetic_probability": np.zeros((n, count), np.float32)}


def put_result(out: dict[str, np.ndarray], i: int, result: EmbedResult) -> None:
    out["status"][i], out["reason"][i], out["align_method"][i] = result.status, result.reason, result.align_method
    if result.ok:
        out["embedding"][i], out["mask_probability"][i] = result.embedding, result.mask_probability
    for j, template in enumerate(result.synthetic):
        out["synthetic_kind"][i, j], out["synthetic_embedding"][i, j] = template.kind, template.embedding
        out["synthetic_probability"][i, j] = template.mask_probability


def result_of(part: dict[str, np.ndarray], i: int) -> EmbedResult:
    """Row `i` of an EnrolEmbedder batch back as the EmbedResult it was made from."""
    p = float(part["mask_probability"][i])
    synthetic = [SyntheticTemplate(str(kind), part["synthetic_embedding"][i, j], float(part["synthetic_probability"][i, j]))
                 for j, kind in enumerate(part["synthetic_kind"][i]) if kind]
    embedding = part["embedding"][i] if str(part["status"][i]) == "ok" else None
    return EmbedResult(str(part["status"][i]), str(part["reason"][i]), embedding, str(part["align_method"][i]),
                       None if np.isnan(p) else p, synthetic)


def _embed_on_actors(items: list[dict], package_uri: str, root: str, storage: StorageConfig | None,
                     synthetic: SyntheticMasks, embedding_size: int, num_actors: int, batch_size: int,
                     runtime: str | None = None):
    """EnrolEmbedder batches over a bounded actor pool; an image that kills its actor is a `crashed` row."""
    from mfr_ray.imageio import Status
    from mfr_ray.pools import run_on_actors

    def crashed(item: dict, reason: str) -> dict[str, np.ndarray]:
        out = empty_batch([item["source_key"]], synthetic.count, embedding_size)
        out["status"][0], out["reason"][0] = Status.CRASHED, reason
        return out

    kwargs = {"package_uri": str(package_uri), "root": str(root), "storage": storage, "synthetic": synthetic,
              "runtime": runtime}
    return run_on_actors(items, EnrolEmbedder, constructor_kwargs=kwargs, key="source_key",
                         batch_size=batch_size, num_actors=num_actors, on_crash=crashed, num_cpus=1)


@dataclass
class EnrolSummary:
    gallery: str
    files: int
    already_enrolled: int
    rows_written: int  # photo rows: one per file
    status_counts: dict[str, int]
    identities_added: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    synthetic_templates: int = 0

    def table(self) -> str:
        lines = [(f"enrolled into {self.gallery}: {self.files} files listed, {self.already_enrolled} already "
                 f"enrolled (skipped), {self.rows_written} rows written in {self.elapsed_s:.1f} s "
                 f"({self.rows_written / self.elapsed_s if self.elapsed_s else 0:.2f} images/s)"),
                 f"{'status':<14} {'rows':>6}"]
        lines += [f"{s:<14} {n:>6}" for s, n in sorted(self.status_counts.items())]
        lines.append(f"check: files {self.files} = rows written {self.rows_written} + already enrolled "
                     f"{self.already_enrolled}: "
                     f"{'OK' if self.files == self.rows_written + self.already_enrolled else 'MISMATCH'}")
        if self.synthetic_templates:
            lines.append(f"synthetic-mask templates added: {self.synthetic_templates}")
        lines.append(f"identities with new rows: {len(self.identities_added)}")
        return "\n".join(lines)


def _list_new(root_or_uri: str, storage, known: set[str], now) -> tuple[list[dict], list[dict], int, int]:
    """(rows of files refused without reading, items to embed, files listed, already enrolled)."""
    from mfr_ray.storage import iter_files

    rows, items, files, already = [], [], 0, 0
    for key, size in iter_files(root_or_uri, storage):
        files += 1
        if key in known:
            already += 1
            continue
        identity = identity_of(key)
        if identity is None:
            rows.append(result_row("", key, "unsupported", UNLABELLED_REASON, "none", None, now))
        elif size > MAX_FILE_BYTES:
            rows.append(result_row(identity, key, "too_large", f"file of {size} bytes exceeds {MAX_FILE_BYTES}; "
                                   "not read", "none", None, now))
        else:
            items.append({"source_key": key, "identity": identity})
    return rows, items, files, already


def enrol(
    package_uri: str,
    root_or_uri: str,
    out: str,
    storage: StorageConfig | None = None,
    num_actors: int = 1,
    batch_size: int = 16,
    ray: RayConfig | None = None,
    progress: bool = True,
    synthetic: SyntheticMasks | None = None,
    runtime: str | None = None,
) -> EnrolSummary:
    """Enrol every file of `<root>/<identity>/<image>` (local or s3://) not yet in gallery `out`, with
    Ray Data actors each holding the package, as preparation does; prints the summary table. `runtime`
    replaces the package's inference runtime."""
    from tqdm import tqdm

    from mfr_ray.raycluster import init_ray

    started, synthetic = time.perf_counter(), synthetic or SyntheticMasks()
    package = load_package(package_uri, storage).use_runtime(runtime)  # an unknown runtime fails here, early
    gallery = Gallery.create_or_open(out, package, storage, package_uri=str(package_uri))
    now = _utc_now()
    rows, items, files, already = _list_new(root_or_uri, storage, gallery.source_keys(), now)
    if items:
        init_ray(ray or RayConfig())
        identity_of_key = {item["source_key"]: item["identity"] for item in items}
        with tqdm(total=len(items), unit="img", desc="enrol", disable=not progress, file=sys.stderr) as bar:
            for part in _embed_on_actors(items, package_uri, root_or_uri, storage, synthetic,
                                         package.embedding_size, num_actors, batch_size, runtime):
                for i, key in enumerate(part["source_key"]):
                    rows += rows_of(identity_of_key[str(key)], str(key), result_of(part, i), now)
                bar.update(len(part["source_key"]))
    gallery.add_rows(rows)
    summary = _summary(out, rows, files, already, time.perf_counter() - started)
    if progress:
        print(summary.table(), flush=True)
    return summary


def _summary(out: str, rows: list[dict], files: int, already: int, elapsed_s: float) -> EnrolSummary:
    photos = [r for r in rows if r["template_kind"] == PHOTO]
    return EnrolSummary(
        gallery=str(out), files=files, already_enrolled=already, rows_written=len(photos),
        status_counts=dict(Counter(r["status"] for r in photos)),
        identities_added=sorted({r["identity"] for r in photos if r["status"] == "ok"}),
        elapsed_s=elapsed_s, synthetic_templates=len(rows) - len(photos),
    )
