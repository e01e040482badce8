"""Reading a prepared dataset back: rows of chosen variants, or (unmasked, masked) pairs for training.

The status filter is the caller's: training keeps `ok` rows (and `ok_fallback` only when asked), while
evaluation reads every row with `read_variant_table` because a verification protocol needs each image.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mfr_ray.config.common import StorageConfig
from mfr_ray.data.layout import (
    CARD_JSON,
    DATA_DIR,
    DONE_DIR,
    INDEX_DIR,
    INDEX_MANIFEST,
    LABEL_MAP,
    DatasetLayout,
    shard_name,
)
from mfr_ray.imageio import UNMASKED, Status

PAIR_COLUMNS = ("source_key", "identity_id", "image_unmasked", "image_masked", "mask_type")


class IncompleteDataset(RuntimeError):
    """The prepare job of this dataset has not finished: training on it would use part of the data."""


def require_complete(uri: str, storage: StorageConfig | None = None) -> None:
    """Refuse a dataset whose prepare did not finish: every indexed shard needs its `_done` marker and the
    card must exist and account for every input."""
    layout = DatasetLayout(uri, storage or StorageConfig())
    manifest = layout.read_json(layout.path(INDEX_DIR, INDEX_MANIFEST))
    if manifest is None:
        raise IncompleteDataset(
            f"{uri} is not a complete prepared dataset: its index ({INDEX_DIR}/{INDEX_MANIFEST}) is missing; "
            "rerun `mfr prepare` with the config that made it, or set data.allow_incomplete=true"
        )
    expected = len(manifest["shard_sizes"])
    done = len({f"{shard_name(i)}.json" for i in range(expected)} & set(layout.list_names(DONE_DIR)))
    card = layout.read_json(layout.path(CARD_JSON))
    problems = []
    if done < expected:
        problems.append(f"{done}/{expected} shards done")
    if card is None:
        problems.append("no dataset card")
    elif card["counts"]["inputs"] != manifest["num_images"]:
        problems.append(f"the card counts {card['counts']['inputs']} of {manifest['num_images']} images")
    if problems:
        raise IncompleteDataset(
            f"prepared dataset {uri} is incomplete ({'; '.join(problems)}): its prepare was interrupted or "
            "is still running. Rerun `mfr prepare` with the config that made it (it continues where it "
            "stopped), or set data.allow_incomplete=true to use the finished shards only"
        )


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


def _finished_shards(layout: DatasetLayout) -> list[str]:
    """File names (`shard-00000.parquet`) of the shards with a `_done` marker: all their variants written."""
    done = {n.removesuffix(".json") for n in layout.list_names(DONE_DIR) if n.endswith(".json")}
    return [n for n in layout.list_names(DATA_DIR, UNMASKED) if n.removesuffix(".parquet") in done]


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
    statuses: Sequence[str] | None = (Status.OK,),
    num_cpus: float = 1.0,
):
    """A `ray.data.Dataset` of the rows of `variants` (default: all) of the finished shards whose status
    is one of `statuses` (None keeps every row, failed ones included); its tasks ask for `num_cpus` each."""
    import ray

    layout = DatasetLayout(uri, storage_cfg or StorageConfig())
    finished = _finished_shards(layout)
    chosen = variants or prepared_variants(uri, storage_cfg)
    paths = [layout.path(DATA_DIR, variant, name) for variant in chosen for name in finished]
    if not paths:
        raise FileNotFoundError(f"no finished prepared shards for variants {variants or 'any'} under {uri}")
    dataset = ray.data.read_parquet(paths, filesystem=layout.fs, num_cpus=num_cpus)
    if statuses is None:
        return dataset
    wanted = pa.array(list(statuses), pa.string())
    return dataset.map_batches(
        lambda table: table.filter(pc.is_in(table["status"], value_set=wanted)),
        batch_format="pyarrow",
        num_cpus=num_cpus,
    )


def pick_copy(source_key: str, copies: int, seed: int) -> int:
    """Deterministic choice of one masked copy per image (stable across workers and runs)."""
    return zlib.crc32(f"{seed}:{source_key}".encode()) % copies


def pair_rows(
    unmasked: pa.Table, masked: pa.Table, seed: int = 0, statuses: Sequence[str] = (Status.OK,)
) -> dict[str, list]:
    """Join one shard's unmasked crops whose status is in `statuses` with one such masked copy each
    (images without one are left out)."""
    copies: dict[str, list[tuple[bytes, str]]] = {}
    for key, image, mask_type, status in zip(
        masked["source_key"].to_pylist(),
        masked["image"].to_pylist(),
        masked["mask_type"].to_pylist(),
        masked["status"].to_pylist(),
        strict=True,
    ):
        if status in statuses:
            copies.setdefault(key, []).append((image, mask_type))
    out: dict[str, list] = {name: [] for name in PAIR_COLUMNS}
    for key, identity_id, image, status in zip(
        unmasked["source_key"].to_pylist(),
        unmasked["identity_id"].to_pylist(),
        unmasked["image"].to_pylist(),
        unmasked["status"].to_pylist(),
        strict=True,
    ):
        if status not in statuses or key not in copies:
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
    statuses: Sequence[str] = (Status.OK,),
):
    """A `ray.data.Dataset` of (image_unmasked, image_masked, identity_id, mask_type, source_key) rows:
    every unmasked crop of the finished shards whose status is in `statuses`, paired with one of its
    masked copies. Pairs never cross shards (a shard holds all copies of its images), so pairing streams
    shard by shard without a shuffle. Its tasks ask for `num_cpus` each."""
    import ray

    storage = storage_cfg or StorageConfig()
    layout = DatasetLayout(uri, storage)
    names = _finished_shards(layout)
    if not names:
        raise FileNotFoundError(f"no finished prepared shards under {uri}/{DATA_DIR}/{UNMASKED}")
    statuses = tuple(statuses)

    def pair_shards(batch: dict[str, np.ndarray]) -> dict[str, list]:
        shard_layout = DatasetLayout(uri, storage)
        merged: dict[str, list] = {name: [] for name in PAIR_COLUMNS}
        for name in batch["shard"]:
            tables = [
                pq.read_table(shard_layout.path(DATA_DIR, variant, str(name)), filesystem=shard_layout.fs)
                for variant in (UNMASKED, masked_variant)
            ]
            for column, values in pair_rows(*tables, seed=seed, statuses=statuses).items():
                merged[column].extend(values)
        return merged

    shards = ray.data.from_items([{"shard": n} for n in names], override_num_blocks=min(len(names), 200))
    return shards.map_batches(pair_shards, batch_size=1, num_cpus=num_cpus)
