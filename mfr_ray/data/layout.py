"""Where a prepared dataset keeps its parts, and the atomic writes that make reruns safe.

    <out>/label_map.json                     identity names; identity_id = position
    <out>/dataset_card.json, dataset_card.md counts, config, code version
    <out>/_index/shard-00000.parquet ...     the manifest (source_key, identity, size), one file per shard
    <out>/_index/_manifest.json              written last: the index is complete
    <out>/data/<variant>/shard-00000.parquet the rows, one file per shard and variant
    <out>/_done/shard-00000.json             written last for a shard: its files are complete
    <out>/_tmp/                              local staging for renames (never read)

A file becomes visible only complete: local files are written under `_tmp` and renamed, S3 objects
appear only when their upload finishes. Every name derives from the shard id, so redoing a shard
overwrites exactly what an interrupted attempt may have left.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mfr_ray.config.common import StorageConfig
from mfr_ray.storage import filesystem_for

T = TypeVar("T")

INDEX_DIR = "_index"
DONE_DIR = "_done"
DATA_DIR = "data"
TMP_DIR = "_tmp"
INDEX_MANIFEST = "_manifest.json"
LABEL_MAP = "label_map.json"
CARD_JSON = "dataset_card.json"
CARD_MD = "dataset_card.md"
UNMASKED = "unmasked"


class StorageUnavailable(RuntimeError):
    """Storage kept failing past the retry budget; finished shards are kept and a rerun continues."""


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}"


def with_retry(action: Callable[[], T], what: str, budget_s: float) -> T:
    """Run `action`, retrying transient storage errors (OSError from pyarrow/S3) with backoff for up to
    `budget_s` seconds. A missing file is not transient and is raised at once."""
    deadline = time.monotonic() + budget_s
    delay = 0.5
    while True:
        try:
            return action()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if time.monotonic() + delay > deadline:
                raise StorageUnavailable(
                    f"{what}: storage still failing after {budget_s:.0f}s of retries ({exc}); "
                    "finished shards are kept, rerun the same command to continue"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


class DatasetLayout:
    """Paths and atomic reads/writes inside one output root (local or S3)."""

    def __init__(self, uri: str, storage: StorageConfig, retry_s: float = 60.0):
        self.uri = uri
        self.storage = storage
        self.retry_s = retry_s
        self.fs, self.root = filesystem_for(uri, storage)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- paths ---------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def index_path(self, shard_id: int) -> str:
        return self.path(INDEX_DIR, f"{shard_name(shard_id)}.parquet")

    def data_path(self, variant: str, shard_id: int) -> str:
        return self.path(DATA_DIR, variant, f"{shard_name(shard_id)}.parquet")

    def done_path(self, shard_id: int) -> str:
        return self.path(DONE_DIR, f"{shard_name(shard_id)}.json")

    # -- atomic writes -------------------------------------------------------------------------------------
    def _put(self, path: str, write: Callable[[Any], None]) -> None:
        def attempt() -> None:
            if not self.local:
                with self.fs.open_output_stream(path) as sink:
                    write(sink)
                return
            staging = self.path(TMP_DIR, f"{uuid.uuid4().hex}-{posixpath.basename(path)}")
            self.fs.create_dir(posixpath.dirname(staging), recursive=True)
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
            with self.fs.open_output_stream(staging) as sink:
                write(sink)
            os.replace(staging, path)

        with_retry(attempt, f"writing {path}", self.retry_s)

    def write_json(self, path: str, payload: Any) -> None:
        data = json.dumps(payload, indent=1, sort_keys=True, default=str).encode()
        self._put(path, lambda sink: sink.write(data))

    def write_text(self, path: str, text: str) -> None:
        self._put(path, lambda sink: sink.write(text.encode()))

    def write_table(self, path: str, table: pa.Table) -> None:
        self._put(path, lambda sink: pq.write_table(table, sink))

    # -- reads ---------------------------------------------------------------------------------------------
    def read_json(self, path: str) -> Any | None:
        """The parsed file, or None when it does not exist."""

        def attempt() -> Any:
            with self.fs.open_input_stream(path) as stream:
                return json.loads(stream.read())

        try:
            return with_retry(attempt, f"reading {path}", self.retry_s)
        except FileNotFoundError:
            return None

    def read_table(self, path: str) -> pa.Table:
        return with_retry(lambda: pq.read_table(path, filesystem=self.fs), f"reading {path}", self.retry_s)

    def parquet_rows(self, path: str) -> int | None:
        """Row count from the Parquet footer, or None when the file is missing."""

        def attempt() -> int:
            with self.fs.open_input_file(path) as handle:
                return pq.ParquetFile(handle).metadata.num_rows

        try:
            return with_retry(attempt, f"reading {path}", self.retry_s)
        except FileNotFoundError:
            return None

    def list_names(self, *parts: str) -> list[str]:
        """Base names of the files directly in a folder (empty when it does not exist)."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        infos = with_retry(lambda: self.fs.get_file_info(selector), f"listing {self.path(*parts)}", self.retry_s)
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)

    def delete(self, *parts: str) -> None:
        """Remove a folder and everything in it, if present."""
        target = self.path(*parts)
        if with_retry(lambda: self.fs.get_file_info(target), f"checking {target}", self.retry_s).type != (
            pafs.FileType.NotFound
        ):
            with_retry(lambda: self.fs.delete_dir(target), f"deleting {target}", self.retry_s)
