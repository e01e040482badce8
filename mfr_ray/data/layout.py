"""Where a prepared dataset keeps its parts, and the atomic writes that make reruns safe.

    <out>/label_map.json                     identity names; identity_id = position
    <out>/dataset_card.json, dataset_card.md counts, config, code version
    <out>/_index/shard-00000.parquet ...     the manifest (source_key, identity, size), one file per shard
    <out>/_index/_manifest.json              written last: the index is complete
    <out>/data/<variant>/shard-00000.parquet the rows, one file per shard and variant
    <out>/_done/shard-00000.json             written last for a shard: its files are complete
    <out>/_tmp/                              local staging for renames (never read)
    <out>/_attempts/shard-00000.json         images a shard was working on, kept until the shard is done
    <out>/_lock.json                         owner (host, pid, run id, time) of the run writing the output

A file becomes visible only complete: local files are written under `_tmp`, fsynced, renamed and their
folder fsynced (a marker never outlives its data after a power loss), S3 objects appear only when their
upload finishes. Every name derives from the shard id, so redoing a shard overwrites exactly what an
interrupted attempt may have left.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
ATTEMPTS_DIR = "_attempts"
LOCK_JSON = "_lock.json"
INDEX_MANIFEST = "_manifest.json"
LABEL_MAP = "label_map.json"
CARD_JSON = "dataset_card.json"
CARD_MD = "dataset_card.md"


class StorageUnavailable(RuntimeError):
    """Storage kept failing past the retry budget; finished shards are kept and a rerun continues."""


class OutputLocked(RuntimeError):
    """Another run is writing the same output (its `_lock.json` names it); `retry_after_s` when its lease
    says how long at most."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


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

    def attempts_path(self, shard_id: int) -> str:
        return self.path(ATTEMPTS_DIR, f"{shard_name(shard_id)}.json")

    # -- atomic writes -------------------------------------------------------------------------------------
    def _put(self, path: str, write: Callable[[Any], None], durable: bool = True) -> None:
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
            if durable:
                fsync_path(staging)
            os.replace(staging, path)
            if durable:
                fsync_path(posixpath.dirname(path), directory=True)

        with_retry(attempt, f"writing {path}", self.retry_s)

    def write_json(self, path: str, payload: Any, durable: bool = True) -> None:
        """`durable=False` skips the fsyncs, for records that only have to survive a crashed process."""
        data = json.dumps(payload, indent=1, sort_keys=True, default=str).encode()
        self._put(path, lambda sink: sink.write(data), durable)

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
        """Row count from the Parquet footer, or None when the file is missing or its footer unreadable
        (a file truncated by a power loss or a full disk: the shard is redone, not a crash)."""

        def attempt() -> int:
            with self.fs.open_input_file(path) as handle:
                return pq.ParquetFile(handle).metadata.num_rows

        try:
            return with_retry(attempt, f"reading {path}", self.retry_s)
        except (FileNotFoundError, pa.ArrowInvalid):
            return None

    def list_names(self, *parts: str) -> list[str]:
        """Base names of the files directly in a folder (empty when it does not exist)."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        infos = with_retry(lambda: self.fs.get_file_info(selector), f"listing {self.path(*parts)}", self.retry_s)
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)

    def delete_file(self, path: str) -> None:
        """Remove one file, if present."""
        try:
            with_retry(lambda: self.fs.delete_file(path), f"deleting {path}", self.retry_s)
        except FileNotFoundError:
            pass

    def delete(self, *parts: str) -> None:
        """Remove a folder and everything in it, if present."""
        target = self.path(*parts)
        if with_retry(lambda: self.fs.get_file_info(target), f"checking {target}", self.retry_s).type != (
            pafs.FileType.NotFound
        ):
            with_retry(lambda: self.fs.delete_dir(target), f"deleting {target}", self.retry_s)


def fsync_path(path: str, directory: bool = False) -> None:
    """Flush a local file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lease_expired(holder: dict) -> bool:
    """True when the lock carries a lease that ran out (its holder would have released it by now)."""
    expires = holder.get("expires")
    if not isinstance(expires, int | float) or time.time() < expires:
        return False
    print(f"warning: taking over a lock whose lease expired ({holder.get('host')} pid {holder.get('pid')}, "
          f"since {holder.get('since_utc')})", file=sys.stderr, flush=True)
    return True


def _holder_is_dead(holder: dict) -> bool:
    """True only when the lock's owner ran on this host and its process is gone (a crashed driver)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


UNREADABLE_LOCK_GRACE_S = 60.0  # a lock file nobody could parse for this long was left by a creator that died


def _read_lock(layout: DatasetLayout) -> dict | None:
    try:
        return layout.read_json(layout.path(LOCK_JSON))
    except ValueError:  # half-written by an owner that died while creating it: expires a minute after
        try:
            mtime = layout.fs.get_file_info(layout.path(LOCK_JSON)).mtime.timestamp()
        except (OSError, AttributeError):
            mtime = time.time()
        return {"host": "unknown", "pid": None, "run_id": "unreadable lock file", "since_utc": "unknown",
                "expires": mtime + UNREADABLE_LOCK_GRACE_S}


def holds_lock(layout: DatasetLayout, owner: dict) -> bool:
    """Whether `owner` (what output_lock yielded) still holds the lock: the fencing check a writer makes
    before its commit point, so a writer whose lease was taken over never commits over the new holder."""
    holder = _read_lock(layout)
    return holder is not None and holder.get("run_id") == owner["run_id"]


def _refusal(layout: DatasetLayout, holder: dict) -> OutputLocked:
    expires = holder.get("expires")
    if isinstance(expires, int | float):
        then = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
        return OutputLocked(f"output {layout.uri} is locked by {holder.get('host')} pid {holder.get('pid')} "
                            f"since {holder.get('since_utc')}; its lease ends at {then} unless renewed (a writer "
                            "that died stops renewing it): retry then", retry_after_s=max(1.0, expires - time.time()))
    return OutputLocked(
        f"output {layout.uri} is locked by {holder.get('host')} pid {holder.get('pid')} (run "
        f"{holder.get('run_id')}) since {holder.get('since_utc')}; if that run is dead, delete "
        f"{layout.uri}/{LOCK_JSON} or rerun with output.force_unlock=true"
    )


def _create_lock(layout: DatasetLayout, owner: dict) -> bool:
    """Write the lock; False when another writer created it first (local: O_EXCL; S3: read back)."""
    path = layout.path(LOCK_JSON)
    if layout.local:
        os.makedirs(layout.root, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(owner, indent=1, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    layout.write_json(path, owner)
    time.sleep(1.0)  # let a concurrent writer's object land before reading back
    if not holds_lock(layout, owner):
        raise _refusal(layout, _read_lock(layout) or {})
    return True


class _LeaseRenewer:
    """Moves the lock's expiry on every third of its lease while the owner still holds it, so a long write
    (a removal rewriting many parts, a compaction) is never taken over mid-way; a dead writer stops."""

    def __init__(self, layout: DatasetLayout, owner: dict, lease_s: float):
        import threading

        self.layout, self.owner, self.lease_s = layout, owner, lease_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="lock-lease")
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.lease_s / 3):
            try:
                if not holds_lock(self.layout, self.owner):
                    return
                self.owner["expires"] = time.time() + self.lease_s
                self.layout.write_json(self.layout.path(LOCK_JSON), self.owner, durable=False)
            except (OSError, StorageUnavailable):  # the next round tries again; the lease covers the gap
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


@contextmanager
def output_lock(layout: DatasetLayout, force: bool = False, lease_s: float | None = None) -> Iterator[dict]:
    """Hold `<out>/_lock.json` while a run writes the output, so a second run into the same output fails
    at once instead of deleting the first one's staging and index. Local: created with O_EXCL. S3 has no
    conditional write through pyarrow: written, then read back after a pause (the later writer wins and
    the other one sees a foreign run id). A lock left by a dead process of this host is taken over, and so
    is one whose lease expired (`lease_s`: renewed while held, so a writer that died on another host or on
    S3 does not lock the output for ever); `force` takes over any lock. Writers check `holds_lock` before
    their commit point. Released on the way out, failure included."""
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": uuid.uuid4().hex, "since": time.time(),
             "since_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if lease_s is not None:
        owner["expires"] = owner["since"] + lease_s
    for _ in range(3):  # a lock that vanished or was taken over is tried again
        holder = _read_lock(layout)
        if holder is not None:
            if not (force or _holder_is_dead(holder) or _lease_expired(holder)):
                raise _refusal(layout, holder)
            layout.delete_file(layout.path(LOCK_JSON))
        if _create_lock(layout, owner):
            break
    else:
        raise _refusal(layout, _read_lock(layout) or {})
    renewer = _LeaseRenewer(layout, owner, lease_s) if lease_s is not None else None
    try:
        yield owner
    finally:
        if renewer is not None:
            renewer.close()
        _release(layout, owner)


def _release(layout: DatasetLayout, owner: dict) -> None:
    try:
        if holds_lock(layout, owner):
            layout.delete_file(layout.path(LOCK_JSON))
    except StorageUnavailable as exc:  # never hide the run's own outcome; a rerun here takes it over
        print(f"warning: could not release {layout.path(LOCK_JSON)}: {exc}", file=sys.stderr, flush=True)
