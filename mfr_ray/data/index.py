"""Stage 1, index: stream the listing of `<root>/<identity>/<image>` into manifest shards.

Keys are written shard by shard as they are listed, so memory holds one shard of keys plus the set of
identity names. The index is written once per output and reused by reruns (so shard ids stay stable
even if the input changes); `_manifest.json`, written last, marks it complete.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from mfr_ray.data.config import PrepareConfig
from mfr_ray.data.layout import INDEX_DIR, INDEX_MANIFEST, LABEL_MAP, DatasetLayout
from mfr_ray.storage import iter_files, read_bytes

INDEX_SCHEMA = pa.schema([("source_key", pa.string()), ("identity", pa.string()), ("size", pa.int64())])


class IndexMismatch(RuntimeError):
    """The output already holds a dataset prepared from different settings."""


@dataclass(frozen=True)
class DatasetIndex:
    num_images: int
    shard_sizes: list[int]
    identities: list[str]
    unlabelled: int
    fingerprint: str

    @property
    def shard_ids(self) -> list[int]:
        return list(range(len(self.shard_sizes)))


def identity_of(key: str) -> str | None:
    """Folder label of a key relative to the root; None for files lying directly in the root."""
    head, sep, _ = key.partition("/")
    return head if sep else None


def included_keys(cfg: PrepareConfig) -> set[str] | None:
    """The keys named by `index.include`, or None to index everything listed."""
    if not cfg.index.include:
        return None
    text = read_bytes(cfg.index.include, cfg.storage).decode()
    return {line.strip() for line in text.splitlines() if line.strip()}


def index_images(cfg: PrepareConfig, layout: DatasetLayout) -> DatasetIndex:
    """List the input once and write the manifest shards, the label map and `_manifest.json`."""
    layout.delete(INDEX_DIR)  # an incomplete index from a killed run is redone from scratch
    shard_size = cfg.index.shard_size
    identities: set[str] = set()
    shard_sizes: list[int] = []
    buffer: list[dict] = []
    unlabelled = 0

    def flush() -> None:
        layout.write_table(layout.index_path(len(shard_sizes)), pa.Table.from_pylist(buffer, schema=INDEX_SCHEMA))
        shard_sizes.append(len(buffer))
        buffer.clear()

    listing = iter_files(cfg.index.uri, cfg.storage, tuple(cfg.index.suffixes))
    wanted = included_keys(cfg)
    count = 0
    for key, size in listing:
        if wanted is not None and key not in wanted:
            continue
        identity = identity_of(key)
        if identity is None:
            unlabelled += 1
            continue
        identities.add(identity)
        buffer.append({"source_key": key, "identity": identity, "size": size})
        count += 1
        if len(buffer) == shard_size:
            flush()
        if cfg.index.limit and count >= cfg.index.limit:
            break
    if buffer:
        flush()
    if not shard_sizes:
        raise FileNotFoundError(f"no images with suffixes {cfg.index.suffixes} in {cfg.index.uri}/<identity>/")
    index = DatasetIndex(
        num_images=count,
        shard_sizes=shard_sizes,
        identities=sorted(identities),
        unlabelled=unlabelled,
        fingerprint=cfg.fingerprint(),
    )
    layout.write_json(layout.path(LABEL_MAP), {"identities": index.identities})
    layout.write_json(
        layout.path(INDEX_DIR, INDEX_MANIFEST),
        {
            "num_images": index.num_images,
            "shard_sizes": index.shard_sizes,
            "unlabelled": index.unlabelled,
            "fingerprint": index.fingerprint,
            "input_uri": cfg.index.uri,
        },
    )
    return index


def load_index(cfg: PrepareConfig, layout: DatasetLayout) -> DatasetIndex | None:
    """The complete index of a previous run into this output, or None if there is none."""
    manifest = layout.read_json(layout.path(INDEX_DIR, INDEX_MANIFEST))
    if manifest is None:
        return None
    if manifest["fingerprint"] != cfg.fingerprint():
        raise IndexMismatch(
            f"{cfg.output.uri} already holds a dataset prepared with other settings "
            f"(fingerprint {manifest['fingerprint']} != {cfg.fingerprint()}); use a new output uri"
        )
    label_map = layout.read_json(layout.path(LABEL_MAP))
    if label_map is None:
        return None
    return DatasetIndex(
        num_images=manifest["num_images"],
        shard_sizes=manifest["shard_sizes"],
        identities=label_map["identities"],
        unlabelled=manifest["unlabelled"],
        fingerprint=manifest["fingerprint"],
    )


def read_index_shard(layout: DatasetLayout, shard_id: int) -> pa.Table:
    return layout.read_table(layout.index_path(shard_id))
