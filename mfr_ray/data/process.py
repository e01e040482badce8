"""Stages 2-4 inside a Ray Data actor: read + decode, align, mask, encode and write one shard at a time.

Images are read, decoded and aligned by `mfr_ray.faces.reading.read_decode_align`, the path evaluation
and serving take too, so an input gets the same status and reason in each.

`ShardProcessor` is the class UDF of `map_batches(..., compute=ActorPoolStrategy)`: MTCNN, dlib and the
mask templates load once per actor in `__init__`; each call gets shard ids and writes those shards
atomically. Every input image leaves exactly one "unmasked" row (ok, ok_fallback, or failed with status
and reason); bad content never raises. An image that kills its actor outright (a native crash, memory) is
found from the shard's attempt record when Ray retries the shard, and after `compute.max_image_attempts`
deaths becomes a `crashed` row. Only storage that stays unreachable past the retry budget fails a shard.
"""

from __future__ import annotations

import ctypes
import json
import os
import posixpath
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa

from mfr_ray.data.config import PrepareConfig
from mfr_ray.data.index import read_index_shard
from mfr_ray.data.layout import DatasetLayout, with_retry
from mfr_ray.faces.reading import ReadResult, read_decode_align
from mfr_ray.imageio import UNMASKED, USABLE_STATUSES, Status, encode_image, join_reasons
from mfr_ray.storage import filesystem_for

OUTPUT_SCHEMA = pa.schema(
    [
        ("source_key", pa.string()),
        ("identity", pa.string()),
        ("identity_id", pa.int32()),
        ("variant", pa.string()),
        ("copy_index", pa.int16()),
        ("mask_type", pa.string()),
        ("pattern", pa.string()),
        ("color", pa.string()),
        ("image", pa.binary()),
        ("image_format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("align_method", pa.string()),
        ("num_faces", pa.int32()),
    ]
)
STAGES = ("read", "decode", "align", "mask", "encode", "write")
DETECTED_METHODS = ("mtcnn", "dlib", "mtcnn_rescue", "prealigned")
# Fault injection for the tests: the actor processing this source key exits on the spot, like an image
# that crashes a native decoder would make it.
EXIT_ON_KEY_ENV = "MFR_TEST_EXIT_ON_KEY"


class StageTimer:
    """Seconds spent per stage, summed over a shard (the benchmark's 'where the time goes')."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


def color_text(color: Any) -> str | None:
    """Mask colour as `#rrggbb` for RGB triples, as text otherwise."""
    if color is None or isinstance(color, str):
        return color
    if isinstance(color, list | tuple | np.ndarray) and len(color) == 3:
        return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in color))
    return str(color)


def failed_row(base: dict, variant: str, copy_index: int, status: str, reason: str, align_method: str) -> dict:
    return {
        **base,
        "variant": variant,
        "copy_index": copy_index,
        "status": status,
        "reason": reason,
        "align_method": align_method,
        "num_faces": 0,
    }


def too_large_reason(size: int, max_bytes: int) -> str:
    return f"file of {size} bytes exceeds index.max_file_bytes = {max_bytes}; not read"


def read_source(fs, path: str, retry_s: float, max_bytes: int) -> ReadResult:
    """(bytes, "", "") of one input file, or (None, status, reason): a file gone since indexing is a
    decode_error row and one grown past `max_bytes` a too_large row, not a failure."""

    def attempt() -> bytes | int:
        with fs.open_input_file(path) as handle:
            size = handle.size()
            return size if size > max_bytes else handle.read()

    try:
        data = with_retry(attempt, f"reading {path}", retry_s)
    except FileNotFoundError:
        return None, Status.DECODE_ERROR, "file disappeared after indexing"
    if isinstance(data, int):
        return None, Status.TOO_LARGE, too_large_reason(data, max_bytes)
    return data, "", ""


class ShardAttempts:
    """The images a shard is working on, recorded in `_attempts/<shard>.json` before each group, so that
    when the actor dies and Ray retries the shard the images in progress are known: each gets one death,
    goes alone from then on (an innocent neighbour of a batch is cleared by its own run), and after
    `max_attempts` deaths is not tried again."""

    def __init__(self, layout: DatasetLayout, shard_id: int, max_attempts: int):
        self.layout = layout
        self.path = layout.attempts_path(shard_id)
        self.max_attempts = max_attempts
        try:
            record = layout.read_json(self.path) or {}
        except ValueError:  # torn by a crash mid-write: nothing usable in it
            record = {}
        self.deaths: Counter = Counter(record.get("deaths", {}))
        self.deaths.update(record.get("in_progress", []))
        if self.deaths:
            self.begin([])  # count each death once, even if this attempt dies before its first group

    def crashed(self, key: str) -> int:
        """Deaths caused by `key` if it reached the limit (it is not tried again), else 0."""
        return self.deaths[key] if self.deaths[key] >= self.max_attempts else 0

    def groups(self, entries: list[dict], batch_size: int) -> Iterator[list[dict]]:
        """Batches of entries to try; an image that was in progress at a death goes alone."""
        group: list[dict] = []
        for entry in entries:
            if self.deaths[entry["source_key"]]:
                yield [entry]
                continue
            group.append(entry)
            if len(group) == batch_size:
                yield group
                group = []
        if group:
            yield group

    def begin(self, entries: list[dict]) -> None:
        """Record the group about to be processed (no fsync: it only has to outlive the process)."""
        record = {"deaths": dict(self.deaths), "in_progress": [e["source_key"] for e in entries]}
        self.layout.write_json(self.path, record, durable=False)

    def finish(self) -> None:
        self.layout.delete_file(self.path)


class ShardProcessor:
    """Ray Data class UDF: batch {"shard_id"} -> {"shard_id", "marker"} (marker = the shard's JSON summary)."""

    def __init__(self, config: PrepareConfig, identities: list[str]):
        import ray

        from mfr_ray.faces.aligner import FaceAligner
        from mfr_ray.threads import threads_for, use_threads

        use_threads(config.align.num_threads or threads_for(config.compute.cpus_per_actor))
        self.cfg = config
        self.identity_ids = {name: i for i, name in enumerate(identities)}
        self.aligner = FaceAligner(config.align)
        self.engine = None
        if config.variants:  # an unmasked-only dataset needs no mask models
            from mfr_ray.masking import MaskEngine

            self.engine = MaskEngine(config.masking)
        self.source_fs, self.source_root = filesystem_for(config.index.uri, config.storage)
        self.layout = DatasetLayout(config.output.uri, config.storage, config.compute.io_retry_s)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.exit_on_key = os.environ.get(EXIT_ON_KEY_ENV)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        shard_ids = [int(s) for s in batch["shard_id"]]
        markers = [json.dumps(self.process_shard(s), sort_keys=True) for s in shard_ids]
        return {"shard_id": shard_ids, "marker": markers}

    # -- one shard -----------------------------------------------------------------------------------------
    def process_shard(self, shard_id: int) -> dict:
        timer = StageTimer()
        manifest = read_index_shard(self.layout, shard_id).to_pylist()
        rows: dict[str, list[dict]] = {UNMASKED: []}
        rows.update({v.name: [] for v in self.cfg.variants})
        attempts = ShardAttempts(self.layout, shard_id, self.cfg.compute.max_image_attempts)
        tried = []
        for entry in manifest:
            if deaths := attempts.crashed(entry["source_key"]):
                reason = f"killed its worker {deaths} times (in progress at each death); not tried again"
                row = failed_row(self.base_of(entry), UNMASKED, 0, Status.CRASHED, reason, "none")
                rows[UNMASKED].append(row)
            else:
                tried.append(entry)
        for group in attempts.groups(tried, self.cfg.align.batch_size):
            attempts.begin(group)
            for row in self.process_images(group, timer):
                rows[row["variant"]].append(row)
        if attempts.deaths:
            attempts.begin([])  # a death from here on is no image's fault
        with timer("write"):
            files = {}
            for variant, variant_rows in rows.items():
                table = pa.Table.from_pylist(variant_rows, schema=OUTPUT_SCHEMA)
                self.layout.write_table(self.layout.data_path(variant, shard_id), table)
                files[variant] = table.num_rows
        marker = shard_marker(shard_id, len(manifest), rows, files, timer.seconds, self.node_id)
        self.layout.write_json(self.layout.done_path(shard_id), marker)
        attempts.finish()
        release_freed_memory()
        return marker

    def base_of(self, entry: dict) -> dict:
        """The columns every row of an image shares; status and reason are those of its unmasked crop
        (ok_fallback and decode notes such as a colour conversion carry over to the masked copies)."""
        return {
            "source_key": entry["source_key"],
            "identity": entry["identity"],
            "identity_id": self.identity_ids[entry["identity"]],
            "status": Status.OK,
            "reason": "",
        }

    def process_images(self, entries: list[dict], timer: StageTimer) -> list[dict]:
        """Rows for a group of manifest entries, in their order: read, decode and align them together
        (`read_decode_align`), then mask and encode every aligned crop."""
        keys = [entry["source_key"] for entry in entries]
        sizes = {entry["source_key"]: entry["size"] for entry in entries}
        crops = read_decode_align(keys, lambda key: self.read(key, sizes[key]), self.aligner, timer=timer)
        out = []
        for entry, crop in zip(entries, crops, strict=True):
            base = {**self.base_of(entry), "status": crop.status, "reason": crop.reason}
            if crop.aligned is None:
                out.append(failed_row(base, UNMASKED, 0, crop.status, crop.reason, crop.method))
            else:
                out.extend(self.crop_rows(base, crop.aligned, timer))
        return out

    def read(self, key: str, size: int) -> ReadResult:
        """One input's bytes: a file indexed larger than `index.max_file_bytes` is never read."""
        if key == self.exit_on_key:
            os._exit(3)
        max_bytes = self.cfg.index.max_file_bytes
        if size > max_bytes:
            return None, Status.TOO_LARGE, too_large_reason(size, max_bytes)
        path = posixpath.join(self.source_root, key)
        return read_source(self.source_fs, path, self.cfg.compute.io_retry_s, max_bytes)

    def crop_rows(self, base: dict, aligned, timer: StageTimer) -> list[dict]:
        """The unmasked row of an aligned crop plus its masked copies for every configured variant, cut as
        `align.masked_twin` says (reuse: one landmark fit on the crop shared by all copies)."""
        from mfr_ray.data.twins import masked_twins

        detected = 1 if aligned.method in DETECTED_METHODS else 0
        rows = [self.image_row(base, UNMASKED, 0, aligned.crop, aligned.method, timer, num_faces=detected)]
        copies = [(variant, i) for variant in self.cfg.variants for i in range(variant.copies)]
        if not copies:
            return rows
        requests = [
            (base["source_key"] if i == 0 else f"{base['source_key']}#{variant.name}{i}", variant.mask_type)
            for variant, i in copies
        ]
        with timer("mask"):
            try:
                twins = masked_twins(self.aligner, self.engine, aligned, requests)
            except Exception as exc:  # noqa: BLE001 - becomes these copies' status
                reason = f"masking failed: {exc!r}"
                return rows + [
                    failed_row(base, v.name, i, Status.UNSUPPORTED, reason, aligned.method) for v, i in copies
                ]
        for (variant, copy_index), twin in zip(copies, twins, strict=True):
            rows.append(self.masked_row(base, variant.name, copy_index, twin, timer))
        return rows

    def masked_row(self, base: dict, variant: str, copy_index: int, twin, timer) -> dict:
        """Row of one masked copy (a `MaskedTwin`); its reason adds how the twin was cropped to the
        unmasked row's."""
        record = twin.result.record
        extra = {"mask_type": record.mask_type, "pattern": record.pattern, "color": color_text(record.color)}
        if twin.result.image is None or record.status != Status.OK:
            row = failed_row(base, variant, copy_index, record.status, record.reason, twin.align_method)
            return {**row, **extra, "num_faces": record.num_faces}
        base = {**base, "reason": join_reasons(base["reason"], twin.reason)}
        row = self.image_row(base, variant, copy_index, twin.result.image, twin.align_method, timer, record.num_faces)
        return {**row, **extra}

    def image_row(self, base, variant, copy_index, image, align_method, timer, num_faces) -> dict:
        fmt = self.cfg.output.image_format
        with timer("encode"):
            data = encode_image(image, fmt=fmt, quality=self.cfg.output.jpeg_quality)
        return {
            **base,
            "variant": variant,
            "copy_index": copy_index,
            "image": data,
            "image_format": fmt,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "status": base["status"],
            "reason": base["reason"],
            "align_method": align_method,
            "num_faces": num_faces,
        }


def release_freed_memory() -> None:
    """Give the heap pages freed by a shard back to the OS: glibc keeps them by default, and an actor's
    memory then grows with the number of shards it has processed instead of staying flat."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def shard_marker(
    shard_id: int, inputs: int, rows: dict[str, list[dict]], files: dict[str, int], seconds: dict, node_id: str
) -> dict:
    """What `_done/<shard>.json` records: enough to verify the shard and build the dataset card."""
    status: dict[str, Counter] = defaultdict(Counter)
    mask_types: dict[str, Counter] = defaultdict(Counter)
    identities: Counter = Counter()
    methods: Counter = Counter()
    for variant, variant_rows in rows.items():
        for row in variant_rows:
            status[variant][row["status"]] += 1
            if variant == UNMASKED:
                methods[row["align_method"]] += 1
                if row["status"] == Status.OK:
                    identities[row["identity"]] += 1
            elif row["status"] in USABLE_STATUSES:
                mask_types[variant][row.get("mask_type") or "none"] += 1
    return {
        "shard_id": shard_id,
        "inputs": inputs,
        "files": files,
        "status": {k: dict(v) for k, v in status.items()},
        "mask_types": {k: dict(v) for k, v in mask_types.items()},
        "align_methods": dict(methods),
        "identities_ok": dict(identities),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "node_id": node_id,
        "pid": os.getpid(),
        "finished_at": time.time(),
    }
