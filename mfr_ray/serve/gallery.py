"""The gallery of enrolled people: Parquet parts in a local folder or an `s3://` prefix.

    <gallery>/gallery.json                  package id, embedding size, the list of parts (the commit point)
    <gallery>/templates/part-*.parquet      one part per enrolment (identity, template_id, embedding,
                                            source_key, enrolled_at, status, reason, align_method)
    <gallery>/_lock.json                    held while an enrolment or a removal writes

Every enrolled file is a row, failed ones too (status and reason, no embedding): files in = rows out.
Only `ok` rows are templates. Enrolling again adds a part with the files not seen before; removing an
identity rewrites the parts that hold it. A part is written before `gallery.json` names it, so a killed
enrolment leaves the gallery as it was.
"""

from __future__ import annotations

import hashlib
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from mfr_ray.config.common import RayConfig, StorageConfig
from mfr_ray.data.index import identity_of
from mfr_ray.data.layout import DatasetLayout, output_lock
from mfr_ray.serve.package import ModelPackage, PackageError, load_package

GALLERY_FORMAT = "mfr-ray/gallery/1"
GALLERY_JSON = "gallery.json"
TEMPLATES_DIR = "templates"
MAX_FILE_BYTES = 64 * 2**20
UNLABELLED_REASON = "not inside an <identity>/ folder: the folder name is the identity"


def gallery_schema() -> pa.Schema:
    """Rows of a gallery part. `embedding` is a plain list (null for failed rows; every `ok` row has the
    manifest's embedding_size values): Parquet does not read back null fixed-size lists."""
    return pa.schema([
        ("identity", pa.string()),
        ("template_id", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("source_key", pa.string()),
        ("enrolled_at", pa.timestamp("ms", tz="UTC")),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("align_method", pa.string()),
    ])


def template_id(identity: str, source_key: str) -> str:
    """Stable id of one enrolled image (the same file enrolled again after a removal keeps its id)."""
    return hashlib.sha1(f"{identity}\x00{source_key}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Match:
    identity: str
    template_id: str
    source_key: str
    score: float


def build_index(embeddings: np.ndarray):
    """The search index over the gallery's (n, d) L2-normalised templates (`mfr_ray.serve.index`: exact up to
    its configured size, approximate beyond): `index.search(queries, k) -> (scores (q, k), ids (q, k))`."""
    from mfr_ray.serve.index import make_index

    return make_index(embeddings)


class Gallery:
    """An opened gallery: rows in memory, an index over its `ok` templates built on first search."""

    def __init__(self, uri: str, storage: StorageConfig | None = None):
        self.uri = str(uri)
        self.storage = storage or StorageConfig()
        self.layout = DatasetLayout(self.uri, self.storage)
        self.manifest: dict = {}
        self.table = gallery_schema().empty_table()
        self._index = None
        self._templates: pa.Table | None = None
        self.refresh()

    # -- creation and reading --------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, uri: str, package: ModelPackage, storage: StorageConfig | None = None,
                       package_uri: str | None = None) -> Gallery:
        """Open the gallery at `uri`, creating it for `package` if there is none; a gallery made with
        another package (other weights or preprocessing) is refused."""
        gallery = cls(uri, storage)
        if not gallery.manifest:
            gallery.layout.write_json(gallery.layout.path(GALLERY_JSON), {
                "format": GALLERY_FORMAT, "package_id": package.package_id,
                "embedding_size": package.embedding_size, "package": package_uri or str(package.folder),
                "parts": [], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
            gallery.refresh()
        gallery.check_package(package)
        return gallery

    def check_package(self, package: ModelPackage) -> None:
        if self.manifest.get("package_id") != package.package_id:
            raise PackageError(f"gallery {self.uri} holds embeddings of package {self.manifest.get('package_id')}, "
                               f"not {package.package_id}: enrol into a new gallery for this package")

    @property
    def embedding_size(self) -> int:
        return int(self._manifest()["embedding_size"])

    def _manifest(self) -> dict:
        if not self.manifest:
            raise PackageError(f"{self.uri} is not a gallery (no {GALLERY_JSON}): make one with `mfr enrol`")
        return self.manifest

    @property
    def package_uri(self) -> str | None:
        return self.manifest.get("package")

    def refresh(self) -> None:
        """Re-read gallery.json and its parts (another process may have enrolled since)."""
        self.manifest = self.layout.read_json(self.layout.path(GALLERY_JSON)) or {}
        if self.manifest and self.manifest.get("format") != GALLERY_FORMAT:
            raise PackageError(f"{self.uri}/{GALLERY_JSON}: format {self.manifest.get('format')!r} is not "
                               f"{GALLERY_FORMAT!r}")
        parts = [self.layout.read_table(self.layout.path(TEMPLATES_DIR, name)) for name in self.manifest.get("parts", [])]
        self.table = pa.concat_tables(parts) if parts else gallery_schema().empty_table()
        self._index = None
        self._templates = None

    def identities(self) -> list[str]:
        """Identities with at least one usable template."""
        return sorted(set(self.templates().column("identity").to_pylist()))

    def templates(self) -> pa.Table:
        """The `ok` rows: what search sees."""
        if self._templates is None:
            import pyarrow.compute as pc

            self._templates = self.table.filter(pc.equal(self.table.column("status"), "ok"))
        return self._templates

    def source_keys(self) -> set[str]:
        return set(self.table.column("source_key").to_pylist())

    # -- writing ---------------------------------------------------------------------------------------
    def _write_manifest(self, parts: list[str]) -> None:
        manifest = dict(self.manifest, parts=parts, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.layout.write_json(self.layout.path(GALLERY_JSON), manifest)

    def _new_part_name(self) -> str:
        return f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.parquet"

    def add_rows(self, rows: list[dict]) -> int:
        """Append rows (dicts of the gallery schema; `embedding` None for failed inputs) as one new part,
        under the gallery's lock; returns the rows written. Durable once this returns."""
        if not rows:
            return 0
        sizes = {len(r["embedding"]) for r in rows if r["embedding"] is not None}
        if sizes - {self.embedding_size}:
            raise PackageError(f"embeddings of size {sorted(sizes)} do not fit gallery {self.uri} "
                               f"(size {self.embedding_size})")
        table = pa.Table.from_pylist(rows, schema=gallery_schema())
        with output_lock(self.layout):
            self.refresh()
            name = self._new_part_name()
            self.layout.write_table(self.layout.path(TEMPLATES_DIR, name), table)
            self._write_manifest(list(self.manifest["parts"]) + [name])
            self.refresh()
        return len(rows)

    def enrol_images(self, package: ModelPackage, identity: str, images: list[tuple[str, bytes]]) -> list[dict]:
        """Embed and add (source_key, bytes) images of one identity in this process (the service's
        `/enrol`); returns every row written, failed ones included."""
        self.check_package(package)
        results = package.embed_images([data for _, data in images])
        now = _utc_now()
        rows = [result_row(identity, key, result.status, result.reason, result.align_method, result.embedding, now)
                for (key, _), result in zip(images, results, strict=True)]
        self.add_rows(rows)
        return rows

    def remove(self, identity: str) -> int:
        """Delete every row of `identity` (templates and failed rows); returns how many went."""
        import pyarrow.compute as pc

        with output_lock(self.layout):
            self.refresh()
            kept_parts, removed, dropped = [], 0, []
            for name in self._manifest()["parts"]:
                part = self.layout.read_table(self.layout.path(TEMPLATES_DIR, name))
                hit = pc.equal(part.column("identity"), identity)
                count = pc.sum(hit).as_py() or 0
                if not count:
                    kept_parts.append(name)
                    continue
                removed += count
                dropped.append(name)
                rest = part.filter(pc.invert(hit))
                if rest.num_rows:
                    new_name = self._new_part_name()
                    self.layout.write_table(self.layout.path(TEMPLATES_DIR, new_name), rest)
                    kept_parts.append(new_name)
            if removed:
                self._write_manifest(kept_parts)
                for name in dropped:
                    self.layout.delete_file(self.layout.path(TEMPLATES_DIR, name))
            self.refresh()
        return removed

    # -- search ----------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> list[list[Match]]:
        """The k best templates for each (n, d) L2-normalised query, best first."""
        templates = self.templates()
        if templates.num_rows == 0:
            return [[] for _ in range(len(queries))]
        if self._index is None:
            embeddings = np.asarray(templates.column("embedding").combine_chunks().flatten(), dtype=np.float32)
            self._index = build_index(embeddings.reshape(templates.num_rows, self.embedding_size))
        scores, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, templates.num_rows))
        names = templates.column("identity").to_pylist()
        tids = templates.column("template_id").to_pylist()
        keys = templates.column("source_key").to_pylist()
        return [[Match(names[i], tids[i], keys[i], float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
                for row_s, row_i in zip(scores, ids, strict=True)]

    def search_identities(self, query: np.ndarray, k: int) -> list[Match]:
        """The k best identities for one query, each with its best template (templates per identity vary,
        so enough templates are searched to reach k distinct people)."""
        counts = Counter(self.templates().column("identity").to_pylist())
        depth = min(sum(counts.values()), k * max(counts.values(), default=1))
        best: dict[str, Match] = {}
        for match in self.search(np.asarray(query, dtype=np.float32)[None], depth)[0]:
            best.setdefault(match.identity, match)
        return sorted(best.values(), key=lambda m: -m.score)[:k]


def _utc_now():
    import datetime as dt

    return dt.datetime.now(dt.UTC)


def result_row(identity: str, source_key: str, status: str, reason: str, align_method: str,
               embedding: np.ndarray | None, enrolled_at) -> dict:
    return {"identity": identity, "template_id": template_id(identity, source_key),
            "embedding": None if embedding is None or status != "ok" else np.asarray(embedding, np.float32).tolist(),
            "source_key": source_key, "enrolled_at": enrolled_at, "status": status, "reason": reason,
            "align_method": align_method}


class EnrolEmbedder:
    """Ray Data batch UDF (one per actor, like preparation's ShardProcessor): read -> decode -> align ->
    embed the files of a batch with the package's own path; every file leaves a status."""

    def __init__(self, package_uri: str, root: str, storage: StorageConfig | None, num_threads: int = 1,
                 runtime: str | None = None):
        from mfr_ray.storage import join_uri

        self.package = load_package(package_uri, storage, num_threads=num_threads).use_runtime(runtime)
        self.root = root
        self.storage = storage
        self.join = join_uri

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mfr_ray.storage import StorageError, read_bytes

        keys = [str(k) for k in batch["source_key"]]
        n = len(keys)
        status, reason, method = ["ok"] * n, [""] * n, ["none"] * n
        embedding = np.zeros((n, self.package.embedding_size), dtype=np.float32)
        data, slots = [], []
        for i, key in enumerate(keys):
            try:
                data.append(read_bytes(self.join(self.root, key), self.storage))
                slots.append(i)
            except StorageError as exc:
                status[i], reason[i] = "decode_error", str(exc)
        for i, result in zip(slots, self.package.embed_images(data), strict=True):
            status[i], reason[i], method[i] = result.status, result.reason, result.align_method
            if result.ok:
                embedding[i] = result.embedding
        return {"source_key": np.array(keys), "status": np.array(status), "reason": np.array(reason),
                "align_method": np.array(method), "embedding": embedding}


@dataclass
class EnrolSummary:
    gallery: str
    files: int
    already_enrolled: int
    rows_written: int
    status_counts: dict[str, int]
    identities_added: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def table(self) -> str:
        lines = [(f"enrolled into {self.gallery}: {self.files} files listed, {self.already_enrolled} already "
                 f"enrolled (skipped), {self.rows_written} rows written in {self.elapsed_s:.1f} s "
                 f"({self.rows_written / self.elapsed_s if self.elapsed_s else 0:.2f} images/s)"),
                 f"{'status':<14} {'rows':>6}"]
        lines += [f"{s:<14} {n:>6}" for s, n in sorted(self.status_counts.items())]
        lines.append(f"check: files {self.files} = rows written {self.rows_written} + already enrolled "
                     f"{self.already_enrolled}: "
                     f"{'OK' if self.files == self.rows_written + self.already_enrolled else 'MISMATCH'}")
        lines.append(f"identities with new rows: {len(self.identities_added)}")
        return "\n".join(lines)


def enrol(
    package_uri: str,
    root_or_uri: str,
    out: str,
    storage: StorageConfig | None = None,
    num_actors: int = 1,
    batch_size: int = 16,
    ray: RayConfig | None = None,
    progress: bool = True,
    runtime: str | None = None,
) -> EnrolSummary:
    """Enrol every file of `<root>/<identity>/<image>` (local or s3://) not yet in gallery `out`, with
    Ray Data actors each holding the package, as preparation does; prints the summary table. `runtime`
    replaces the package's inference runtime."""
    from tqdm import tqdm

    from mfr_ray.raycluster import init_ray
    from mfr_ray.storage import iter_files

    started = time.perf_counter()
    package = load_package(package_uri, storage).use_runtime(runtime)  # an unknown runtime fails here, early
    gallery = Gallery.create_or_open(out, package, storage, package_uri=str(package_uri))
    known = gallery.source_keys()
    now = _utc_now()
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
    if items:
        import ray as ray_module

        init_ray(ray or RayConfig())
        ds = ray_module.data.from_items(items, override_num_blocks=max(1, min(len(items), num_actors * 4)))
        ds = ds.map_batches(
            EnrolEmbedder,
            fn_constructor_kwargs={"package_uri": str(package_uri), "root": str(root_or_uri), "storage": storage,
                                   "runtime": runtime},
            batch_size=batch_size, compute=ray_module.data.ActorPoolStrategy(size=num_actors), num_cpus=1,
        )
        ds.context.enable_progress_bars = False  # the bar below counts images
        identity_of_key = {item["source_key"]: item["identity"] for item in items}
        with tqdm(total=len(items), unit="img", desc="enrol", disable=not progress, file=sys.stderr) as bar:
            for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for key, status, reason, method, emb in zip(part["source_key"], part["status"], part["reason"],
                                                            part["align_method"], part["embedding"], strict=True):
                    rows.append(result_row(identity_of_key[str(key)], str(key), str(status), str(reason),
                                           str(method), emb, now))
                bar.update(len(part["source_key"]))
    gallery.add_rows(rows)
    summary = EnrolSummary(
        gallery=str(out), files=files, already_enrolled=already, rows_written=len(rows),
        status_counts=dict(Counter(r["status"] for r in rows)),
        identities_added=sorted({r["identity"] for r in rows if r["status"] == "ok"}),
        elapsed_s=time.perf_counter() - started,
    )
    if progress:
        print(summary.table(), flush=True)
    return summary
