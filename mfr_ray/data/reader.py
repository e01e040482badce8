"""Reading a prepared dataset back: rows of chosen variants, or (unmasked, masked) pairs for training."""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mfr_ray.config.common import StorageConfig
from mfr_ray.data.layout import DATA_DIR, LABEL_MAP, UNMASKED, DatasetLayout

PAIR_COLUMNS = ("source_key", "identity_id", "image_unmasked", "image_masked", "mask_type")


def prepared_variants(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Variant folders present under `<uri>/data`."""
    layout = DatasetLayout(uri, storage or StorageConfig())
    selector = pafs.FileSelector(layout.path(DATA_DIR), allow_not_found=True)
    return sorted(i.base_name for i in layout.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)


def load_label_map(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Identity names; `identity_id` is the position in this list."""
    layout = DatasetLayout(uri, storage or StorageConfig())
    label_map = layout.read_json(layout.path(LABEL_MAP))
    if label_map is None:
        raise FileNotFoundError(f"{uri} has no {LABEL_MAP}: not a prepared dataset (or indexing never finished)")
    return label_map["identities"]


def _shard_paths(layout: DatasetLayout, variant: str) -> list[str]:
    return [layout.path(DATA_DIR, variant, n) for n in layout.list_names(DATA_DIR, variant) if n.endswith(".parquet")]


def read_variant_table(
    uri: str, variant: str, storage_cfg: StorageConfig | None = None, columns: list[str] | None = None
) -> pa.Table:
    """All rows of one variant, failed ones included, as one in-process table (small sets: evaluation)."""
    layout = DatasetLayout(uri, storage_cfg or StorageConfig())
    paths = _shard_paths(layout, variant)
    if not paths:
        raise FileNotFoundError(f"no prepared shards for variant {variant!r} under {uri}/{DATA_DIR}")
    return pa.concat_tables(pq.read_table(p, columns=columns, filesystem=layout.fs) for p in paths)


def read_prepared(
    uri: str,
    storage_cfg: StorageConfig | None = None,
    variants: list[str] | None = None,
    status: str | None = "ok",
    num_cpus: float = 1.0,
):
    """A `ray.data.Dataset` of the rows of `variants` (default: all) whose status is `status`
    (None keeps every row, failed ones included); its tasks ask for `num_cpus` each."""
    import ray

    layout = DatasetLayout(uri, storage_cfg or StorageConfig())
    paths = [p for v in (variants or prepared_variants(uri, storage_cfg)) for p in _shard_paths(layout, v)]
    if not paths:
        raise FileNotFoundError(f"no prepared shards for variants {variants or 'any'} under {uri}/{DATA_DIR}")
    dataset = ray.data.read_parquet(paths, filesystem=layout.fs, ray_remote_args={"num_cpus": num_cpus})
    if status is None:
        return dataset
    return dataset.map_batches(
        lambda table: table.filter(pc.equal(table["status"], status)), batch_format="pyarrow", num_cpus=num_cpus
    )


def pick_copy(source_key: str, copies: int, seed: int) -> int:
    """Deterministic choice of one masked copy per image (stable across workers and runs)."""
    return zlib.crc32(f"{seed}:{source_key}".encode()) % copies


def pair_rows(unmasked: pa.Table, masked: pa.Table, seed: int = 0) -> dict[str, list]:
    """Join one shard's ok unmasked crops with one ok masked copy each (images without one are left out)."""
    copies: dict[str, list[tuple[bytes, str]]] = {}
    for key, image, mask_type, ok in zip(
        masked["source_key"].to_pylist(),
        masked["image"].to_pylist(),
        masked["mask_type"].to_pylist(),
        pc.equal(masked["status"], "ok").to_pylist(),
        strict=True,
    ):
        if ok:
            copies.setdefault(key, []).append((image, mask_type))
    out: dict[str, list] = {name: [] for name in PAIR_COLUMNS}
    for key, identity_id, image, status in zip(
        unmasked["source_key"].to_pylist(),
        unmasked["identity_id"].to_pylist(),
        unmasked["image"].to_pylist(),
        unmasked["status"].to_pylist(),
        strict=True,
    ):
        if status != "ok" or key not in copies:
            continue
        masked_image, mask_type = copies[key][pick_copy(key, len(copies[key]), seed)]
        for name, value in zip(PAIR_COLUMNS, (key, identity_id, image, masked_image, mask_type), strict=True):
            out[name].append(value)
    return out


def paired_dataset(
    uri: str,
    storage_cfg: StorageConfig | None = None,
    masked_variant: str = "masked",
    seed: int = 0,
    num_cpus: float = 1.0,
):
    """A `ray.data.Dataset` of (image_unmasked, image_masked, identity_id, mask_type, source_key) rows:
    every ok unmasked crop paired with one of its masked copies. Pairs never cross shards (a shard holds
    all copies of its images), so pairing streams shard by shard without a shuffle. Its tasks ask for
    `num_cpus` each."""
    import ray

    storage = storage_cfg or StorageConfig()
    layout = DatasetLayout(uri, storage)
    names = [n for n in layout.list_names(DATA_DIR, UNMASKED) if n.endswith(".parquet")]
    if not names:
        raise FileNotFoundError(f"no prepared shards under {uri}/{DATA_DIR}/{UNMASKED}")

    def pair_shards(batch: dict[str, np.ndarray]) -> dict[str, list]:
        shard_layout = DatasetLayout(uri, storage)
        merged: dict[str, list] = {name: [] for name in PAIR_COLUMNS}
        for name in batch["shard"]:
            tables = [
                pq.read_table(shard_layout.path(DATA_DIR, variant, str(name)), filesystem=shard_layout.fs)
                for variant in (UNMASKED, masked_variant)
            ]
            for column, values in pair_rows(*tables, seed=seed).items():
                merged[column].extend(values)
        return merged

    shards = ray.data.from_items([{"shard": n} for n in names], override_num_blocks=min(len(names), 200))
    return shards.map_batches(pair_shards, batch_size=1, num_cpus=num_cpus)
