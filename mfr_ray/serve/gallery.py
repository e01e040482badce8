"""The gallery of enrolled people: Parquet parts in a local folder or an `s3://` prefix.

    <gallery>/gallery.json                  package id, embedding size, the list of parts (the commit point),
                                            a version counter moved on by every write
    <gallery>/templates/part-*.parquet      one part per enrolment (identity, template_id, embedding,
                                            source_key, enrolled_at, status, reason, align_method)
    <gallery>/_lock.json                    held while an enrolment or a removal writes (a lease: taken over
                                            once older than Gallery.LOCK_LEASE_S)

Every enrolled file is a row, failed ones too (status and reason, no embedding): files in = rows out.
Only `ok` rows are templates. Enrolling again adds a part with the files not seen before (parts are merged
once there are many); removing an identity rewrites the parts that hold it. A part is written before `gallery.json` names it, so a killed
enrolment leaves the gallery as it was.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mfr_ray.config.common import StorageConfig
from mfr_ray.data.layout import DatasetLayout, OutputLocked, holds_lock, output_lock
from mfr_ray.serve.package import ModelPackage, PackageError
from mfr_ray.serve.synthetic import PHOTO

GALLERY_FORMAT = "mfr-ray/gallery/1"
GALLERY_JSON = "gallery.json"
TEMPLATES_DIR = "templates"


def gallery_schema() -> pa.Schema:
    """Rows of a gallery part. `embedding` is a plain list (null for failed rows; every `ok` row has the
    manifest's embedding_size values): Parquet does not read back null fixed-size lists. `template_kind`
    is `photo` (the enrolled file itself: one row per file, whatever its status) or `synthetic:<type>` (a
    masked copy of an `ok` photo); galleries written before it read as `photo`."""
    return pa.schema([
        ("identity", pa.string()),
        ("template_id", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("source_key", pa.string()),
        ("enrolled_at", pa.timestamp("ms", tz="UTC")),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("align_method", pa.string()),
        ("template_kind", pa.string()),
        ("mask_probability", pa.float32()),
    ])


def conform(table: pa.Table) -> pa.Table:
    """A part in today's schema: columns a part written by an older version lacks are added (template
    kind `photo`, no mask probability)."""
    schema = gallery_schema()
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        elif f.name == "template_kind":
            columns.append(pa.array([PHOTO] * table.num_rows, f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def template_id(identity: str, source_key: str) -> str:
    """Stable id of one enrolled image (the same file enrolled again after a removal keeps its id)."""
    return hashlib.sha1(f"{identity}\x00{source_key}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Match:
    identity: str
    template_id: str
    source_key: str
    score: float
    template_kind: str = PHOTO


def build_index(embeddings: np.ndarray):
    """The search index over the gallery's (n, d) L2-normalised templates (`mfr_ray.serve.index`: exact up to
    its configured size, approximate beyond): `index.search(queries, k) -> (scores (q, k), ids (q, k))`."""
    from mfr_ray.serve.index import make_index

    return make_index(embeddings)


@dataclass
class GalleryState:
    """One consistent view of the gallery: its manifest, every row, the `ok` rows and (built on first
    search) their index. Replaced whole, never changed in place, so a reader that took it sees no half
    enrolment or removal while a writer prepares the next one."""

    manifest: dict
    table: pa.Table
    templates: pa.Table
    index: object = None

    @classmethod
    def of(cls, manifest: dict, table: pa.Table) -> GalleryState:
        import pyarrow.compute as pc

        return cls(manifest, table, table.filter(pc.equal(table.column("status"), "ok")))

    @property
    def change_key(self) -> tuple:
        return change_key(self.manifest)


def change_key(manifest: dict) -> tuple:
    """What changes whenever the gallery does (its version counter; the part list for galleries written
    before the counter existed)."""
    return manifest.get("version", 0), tuple(manifest.get("parts", ()))


class Gallery:
    """An opened gallery: a `GalleryState` in memory, an index over its `ok` templates built on first search.
    Writers (`add_rows`, `remove`, `compact`) serialise on a thread lock here and `_lock.json` (a lease)
    across processes; `refresh_if_changed` is the cheap poll a long-lived reader runs."""

    LOCK_LEASE_S = 30.0  # a writer renews its `_lock.json` while it writes; one not renewed for this long died

    def __init__(self, uri: str, storage: StorageConfig | None = None):
        import threading

        self.uri = str(uri)
        self.storage = storage or StorageConfig()
        self.layout = DatasetLayout(self.uri, self.storage)
        self._writing = threading.RLock()
        self.state = GalleryState.of({}, gallery_schema().empty_table())
        self.refresh()

    # -- creation and reading --------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, uri: str, package: ModelPackage, storage: StorageConfig | None = None,
                       package_uri: str | None = None) -> Gallery:
        """Open the gallery at `uri`, creating it for `package` if there is none; a gallery made with
        another package (other weights or preprocessing) is refused."""
        gallery = cls(uri, storage)
        if not gallery.manifest:
            with gallery._writing, gallery._lock():
                gallery.refresh()
                if not gallery.manifest:
                    gallery.layout.write_json(gallery.layout.path(GALLERY_JSON), {
                        "format": GALLERY_FORMAT, "package_id": package.package_id, "version": 0,
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
    def manifest(self) -> dict:
        return self.state.manifest

    @property
    def table(self) -> pa.Table:
        return self.state.table

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

    def _read_manifest(self) -> dict:
        manifest = self.layout.read_json(self.layout.path(GALLERY_JSON)) or {}
        if manifest and manifest.get("format") != GALLERY_FORMAT:
            raise PackageError(f"{self.uri}/{GALLERY_JSON}: format {manifest.get('format')!r} is not "
                               f"{GALLERY_FORMAT!r}")
        return manifest

    def _load(self, manifest: dict) -> GalleryState:
        parts = [conform(self.layout.read_table(self.layout.path(TEMPLATES_DIR, name)))
                 for name in manifest.get("parts", [])]
        return GalleryState.of(manifest, pa.concat_tables(parts) if parts else gallery_schema().empty_table())

    def refresh(self) -> None:
        """Re-read gallery.json and its parts (another process may have enrolled since)."""
        with self._writing:
            self.state = self._load(self._read_manifest())

    def refresh_if_changed(self) -> bool:
        """Read gallery.json only, and the parts only when another process changed the gallery (a removal
        by `mfr unenrol`, an enrolment by `mfr enrol`); True when it had changed."""
        with self._writing:
            manifest = self._read_manifest()
            if change_key(manifest) == self.state.change_key:
                return False
            self.state = self._load(manifest)
            return True

    def identities(self) -> list[str]:
        """Identities with at least one usable template."""
        return sorted(set(self.templates().column("identity").to_pylist()))

    def templates(self) -> pa.Table:
        """The `ok` rows: what search sees."""
        return self.state.templates

    def source_keys(self) -> set[str]:
        """The files enrolled (their `photo` rows; synthetic templates are derived from them)."""
        import pyarrow.compute as pc

        photos = self.table.filter(pc.equal(self.table.column("template_kind"), PHOTO))
        return set(photos.column("source_key").to_pylist())

    # -- writing ---------------------------------------------------------------------------------------
    def _lock(self):
        return output_lock(self.layout, lease_s=self.LOCK_LEASE_S)

    def _commit(self, manifest: dict, parts: list[str], owner: dict) -> dict:
        """Write gallery.json naming `parts` (the commit point), with the version counter moved on; only
        while `owner` still holds the lock (fencing: a writer whose lease was taken over commits nothing)."""
        if not holds_lock(self.layout, owner):
            raise OutputLocked(f"gallery {self.uri}: this writer lost its lock before committing; nothing changed",
                               retry_after_s=1.0)
        manifest = dict(manifest, parts=parts, version=int(manifest.get("version", 0)) + 1,
                        updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.layout.write_json(self.layout.path(GALLERY_JSON), manifest)
        return manifest

    def _new_part_name(self) -> str:
        return f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.parquet"

    def add_rows(self, rows: list[dict]) -> int:
        """Append rows (dicts of the gallery schema; `embedding` None for failed inputs) as one new part,
        under the gallery's lock; returns the rows written. Durable once this returns. Only gallery.json is
        read back (the parts too only when another process changed the gallery meanwhile)."""
        if not rows:
            return 0
        sizes = {len(r["embedding"]) for r in rows if r["embedding"] is not None}
        if sizes - {self.embedding_size}:
            raise PackageError(f"embeddings of size {sorted(sizes)} do not fit gallery {self.uri} "
                               f"(size {self.embedding_size})")
        table = pa.Table.from_pylist(rows, schema=gallery_schema())
        with self._writing, self._lock() as owner:
            self.refresh_if_changed()
            name = self._new_part_name()
            self.layout.write_table(self.layout.path(TEMPLATES_DIR, name), table)
            manifest = self._commit(self.manifest, list(self.manifest["parts"]) + [name], owner)
            self.state = GalleryState.of(manifest, pa.concat_tables([self.table, table]))
        return len(rows)

    def compact(self, max_parts: int = 32) -> bool:
        """Merge the parts into one when there are more than `max_parts` (each enrolment adds one); the
        rows and their order stay. True when it merged."""
        with self._writing, self._lock() as owner:
            self.refresh_if_changed()
            old = list(self._manifest()["parts"])
            if len(old) <= max_parts:
                return False
            name = self._new_part_name()
            self.layout.write_table(self.layout.path(TEMPLATES_DIR, name), self.table)
            self.state = GalleryState.of(self._commit(self.manifest, [name], owner), self.table)
            for part in old:
                self.layout.delete_file(self.layout.path(TEMPLATES_DIR, part))
        return True

    def enrol_images(self, package: ModelPackage, identity: str, images: list[tuple[str, bytes]]) -> list[dict]:
        """Embed and add (source_key, bytes) images of one identity in this process; returns every row
        written, failed ones included."""
        self.check_package(package)
        results = package.embed_images([data for _, data in images])
        now = _utc_now()
        rows = [row for (key, _), result in zip(images, results, strict=True)
                for row in rows_of(identity, key, result, now)]
        self.add_rows(rows)
        return rows

    def remove(self, identity: str) -> int:
        """Delete every row of `identity` (templates and failed rows); returns how many went."""
        import pyarrow.compute as pc

        with self._writing, self._lock() as owner:
            self.refresh()
            kept_parts, removed, dropped = [], 0, []
            for name in self._manifest()["parts"]:
                part = conform(self.layout.read_table(self.layout.path(TEMPLATES_DIR, name)))
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
                self._commit(self.manifest, kept_parts, owner)
                for name in dropped:
                    self.layout.delete_file(self.layout.path(TEMPLATES_DIR, name))
            self.refresh()
        return removed

    # -- search ----------------------------------------------------------------------------------------
    def template_matrix(self, state: GalleryState | None = None) -> np.ndarray:
        """The usable templates' embeddings as one (n, embedding_size) float32 array, in row order."""
        templates = (state or self.state).templates
        flat = np.asarray(templates.column("embedding").combine_chunks().flatten(), dtype=np.float32)
        return flat.reshape(templates.num_rows, self.embedding_size)

    def search(self, queries: np.ndarray, k: int, state: GalleryState | None = None) -> list[list[Match]]:
        """The k best templates for each (n, d) L2-normalised query, best first."""
        state = state or self.state
        templates = state.templates
        if templates.num_rows == 0:
            return [[] for _ in range(len(queries))]
        if state.index is None:
            state.index = build_index(self.template_matrix(state))
        scores, ids = state.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, templates.num_rows))
        names = templates.column("identity").to_pylist()
        tids = templates.column("template_id").to_pylist()
        keys = templates.column("source_key").to_pylist()
        kinds = templates.column("template_kind").to_pylist()
        return [[Match(names[i], tids[i], keys[i], float(s), kinds[i]) for s, i in zip(row_s, row_i, strict=True)
                 if i >= 0] for row_s, row_i in zip(scores, ids, strict=True)]

    def search_identities(self, query: np.ndarray, k: int) -> list[Match]:
        """The k best identities for one query, each with its best template (templates per identity vary,
        so enough templates are searched to reach k distinct people)."""
        state = self.state
        counts = Counter(state.templates.column("identity").to_pylist())
        depth = min(sum(counts.values()), k * max(counts.values(), default=1))
        best: dict[str, Match] = {}
        for match in self.search(np.asarray(query, dtype=np.float32)[None], depth, state)[0]:
            best.setdefault(match.identity, match)
        return sorted(best.values(), key=lambda m: -m.score)[:k]


def _utc_now():
    import datetime as dt

    return dt.datetime.now(dt.UTC)


def result_row(identity: str, source_key: str, status: str, reason: str, align_method: str,
               embedding: np.ndarray | None, enrolled_at, template_kind: str = PHOTO,
               mask_probability: float | None = None) -> dict:
    """One gallery row; a synthetic template's id is the photo's key with its kind and number appended."""
    return {"identity": identity, "template_id": template_id(identity, source_key),
            "embedding": None if embedding is None or status != "ok" else np.asarray(embedding, np.float32).tolist(),
            "source_key": source_key, "enrolled_at": enrolled_at, "status": status, "reason": reason,
            "align_method": align_method, "template_kind": template_kind,
            "mask_probability": None if mask_probability is None else float(mask_probability)}


def rows_of(identity: str, source_key: str, result, enrolled_at) -> list[dict]:
    """The rows of one enrolled file: its own (`photo`, whatever its status) and, for an `ok` face, one
    per synthetic-mask template (ids stable: the photo's key + `#kind#n`)."""
    rows = [result_row(identity, source_key, result.status, result.reason, result.align_method, result.embedding,
                       enrolled_at, PHOTO, result.mask_probability)]
    if result.status == "ok":
        rows += [result_row(identity, f"{source_key}#{t.kind}#{n}", "ok", "", result.align_method, t.embedding,
                            enrolled_at, t.kind, t.mask_probability) for n, t in enumerate(result.synthetic)]
    return rows
