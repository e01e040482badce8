"""Training inputs from a prepared dataset: the identity split, the Ray Data stream of (unmasked, masked)
pairs that Ray Train shards across workers (optionally masked on the fly by mask-engine actors), the
small held-out validation set, and the decoding of encoded crops into model-ready arrays."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mfr_ray.config.common import StorageConfig
from mfr_ray.data import load_label_map, paired_dataset, read_prepared, require_complete
from mfr_ray.imageio import decode_image, encode_image
from mfr_ray.masking.config import MaskingConfig
from mfr_ray.pools import map_batches_bounded
from mfr_ray.train.config import TrainDataConfig

TRAIN_COLUMNS = ["identity_id", "image_unmasked", "image_masked"]


def training_statuses(cfg: TrainDataConfig) -> tuple[str, ...]:
    """Row statuses trained on: detected faces, plus the guessed-box fallbacks only when asked."""
    return ("ok", "ok_fallback") if cfg.keep_fallback else ("ok",)


def check_dataset(cfg: TrainDataConfig, storage: StorageConfig) -> None:
    """Refuse a dataset whose prepare did not finish (unless `data.allow_incomplete`)."""
    if not cfg.allow_incomplete:
        require_complete(cfg.uri, storage)


def validation_identities(num_identities: int, count: int, seed: int) -> list[int]:
    """Identity ids held out of training; the same for a given (dataset size, count, seed)."""
    if count >= num_identities:
        raise ValueError(f"cannot hold out {count} of {num_identities} identities and still train")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(num_identities, size=count, replace=False))


def _select(
    ds,
    columns: dict[str, str],
    num_cpus: float,
    drop: Sequence[int] = (),
    keep: Sequence[int] | None = None,
    drop_mask_types: Sequence[str] = (),
):
    """Columns picked and renamed ({name: new name}) and rows of unwanted identities dropped (`drop`, or all
    but `keep`) with the pairs of held-out mask types (`drop_mask_types`), in one operator whose tasks ask
    for `num_cpus` (`data.ingest_cpus`): an ingest operator asking for a whole CPU would never start beside
    the training workers."""
    ids = np.asarray(drop if keep is None else keep, dtype=np.int64)
    held_out_types = np.asarray(list(drop_mask_types), dtype=object)

    def pick(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = np.isin(batch["identity_id"], ids, invert=keep is None)
        if len(held_out_types):
            wanted &= ~np.isin(batch["mask_type"].astype(object), held_out_types)
        return {new: batch[name][wanted] for name, new in columns.items()}

    return ds.map_batches(pick, batch_format="numpy", num_cpus=num_cpus)


class OnTheFlyMasker:
    """Ray Data class UDF: adds `image_masked` to rows of unmasked aligned crops. The mask engine loads once
    per actor; every pass draws a fresh mask (the engine's draw key gets a per-call nonce)."""

    def __init__(self, masking: MaskingConfig, cpus: float):
        from mfr_ray.masking import MaskEngine
        from mfr_ray.threads import threads_for, use_threads

        use_threads(threads_for(cpus))
        self.engine = MaskEngine(masking)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        masked, keep = [], []
        for key, data in zip(batch["source_key"], batch["image_unmasked"], strict=True):
            decoded = decode_image(data)
            result = (
                self.engine.mask(decoded.image, f"{key}#{uuid.uuid4().hex}", aligned=True)
                if decoded.ok
                else None
            )
            ok = result is not None and result.image is not None
            keep.append(ok)
            masked.append(encode_image(result.image) if ok else b"")
        keep_arr = np.asarray(keep, dtype=bool)
        out = {k: batch[k][keep_arr] for k in ("identity_id", "image_unmasked")}
        out["image_masked"] = np.asarray(masked, dtype=object)[keep_arr]
        return out


def training_dataset(
    cfg: TrainDataConfig, storage: StorageConfig, held_out: list[int], use_masked: bool = True
) -> tuple[Any, int]:
    """The `ray.data.Dataset` Ray Train splits across workers, rows {identity_id, image_unmasked,
    image_masked} (encoded crops) of the training identities, and its row count (on-the-fly masking:
    the count before masking). Unmasked-only runs carry an empty `image_masked`."""

    check_dataset(cfg, storage)
    ingest, statuses = cfg.ingest_cpus, training_statuses(cfg)
    if use_masked and not cfg.on_the_fly_masking:
        pairs = paired_dataset(
            cfg.uri, storage, cfg.masked_variant, seed=cfg.seed, num_cpus=ingest, statuses=statuses
        )
        ds = _select(
            pairs, {c: c for c in TRAIN_COLUMNS}, ingest, drop=held_out, drop_mask_types=cfg.exclude_mask_types
        )
        ds = ds.materialize() if cfg.materialize else ds
        return ds, ds.count()
    unmasked = _select(
        read_prepared(cfg.uri, storage, variants=["unmasked"], statuses=statuses, num_cpus=ingest),
        {"source_key": "source_key", "identity_id": "identity_id", "image": "image_unmasked"},
        ingest,
        drop=held_out,
    )
    unmasked = unmasked.materialize() if cfg.materialize else unmasked
    rows = unmasked.count()
    if not use_masked:
        without_masks = unmasked.map_batches(
            lambda b: {
                "identity_id": b["identity_id"],
                "image_unmasked": b["image_unmasked"],
                "image_masked": np.full(len(b["identity_id"]), b"", dtype=object),
            },
            batch_format="numpy",
            num_cpus=ingest,
        )
        return without_masks, rows
    masking = cfg.masking.model_copy(
        update={"aligned": True, "exclude_types": sorted({*cfg.masking.exclude_types, *cfg.exclude_mask_types})}
    )
    # bounded restarts: a crop that kills its masker fails training instead of retrying for ever
    masked = map_batches_bounded(unmasked, OnTheFlyMasker, batch_size=32, num_actors=cfg.masking_actors,
                                 constructor_kwargs={"masking": masking, "cpus": cfg.masking_cpus},
                                 num_cpus=cfg.masking_cpus, batch_format="numpy")
    return masked, rows


@dataclass
class ValidationSet:
    """Held-out crops, each seen masked and unmasked; pairs are (masked i, unmasked j), i != j."""

    unmasked: np.ndarray  # (n, H, W, 3) uint8
    masked: np.ndarray
    identity: np.ndarray  # (n,) int

    def pair_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(self.identity)
        left, right = np.nonzero(~np.eye(n, dtype=bool))
        return left, right, self.identity[left] == self.identity[right]


def validation_set(
    cfg: TrainDataConfig, storage: StorageConfig, held_out: list[int], size: tuple[int, int]
) -> ValidationSet | None:
    """Pairs of the held-out identities, deterministic in the seed; None when nothing is held out."""
    if not held_out:
        return None
    pairs = paired_dataset(
        cfg.uri,
        storage,
        masked_variant=cfg.masked_variant,
        seed=cfg.seed,
        num_cpus=cfg.ingest_cpus,
        statuses=training_statuses(cfg),
    )
    ds = _select(
        pairs,
        {c: c for c in ["source_key", *TRAIN_COLUMNS]},
        cfg.ingest_cpus,
        keep=held_out,
        drop_mask_types=cfg.exclude_mask_types,  # a held-out type must not pick the checkpoints either
    )
    rows = sorted(ds.take_all(), key=lambda r: r["source_key"])
    order = np.random.default_rng(cfg.seed).permutation(len(rows))[: cfg.val_max_images]
    chosen = [rows[i] for i in sorted(order)]
    unmasked, masked, valid = decode_pairs(
        [r["image_unmasked"] for r in chosen], [r["image_masked"] for r in chosen], size
    )
    identity = np.asarray([r["identity_id"] for r in chosen], dtype=np.int64)[valid]
    if len(np.unique(identity)) < 2:
        raise ValueError(
            f"validation needs >= 2 held-out identities with images, got {len(np.unique(identity))}"
        )
    return ValidationSet(unmasked, masked, identity)


def decode_pairs(
    unmasked: list[bytes], masked: list[bytes], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Decode encoded crops into (n, H, W, 3) uint8 stacks of the model's input `size`. `valid` marks the
    pairs kept: a pair with a crop that does not decode or has another size is left out (the caller
    counts it). Unmasked-only rows (empty masked bytes) give `None` for the masked stack."""
    with_masked = any(len(m) for m in masked)
    first, second, valid = [], [], []
    for u, m in zip(unmasked, masked, strict=True):
        decoded = [decode_image(u)] + ([decode_image(m)] if with_masked else [])
        ok = all(d.ok and d.image.shape[:2] == tuple(size) for d in decoded)
        valid.append(ok)
        if ok:
            first.append(decoded[0].image)
            if with_masked:
                second.append(decoded[1].image)
    empty = np.zeros((0, *size, 3), np.uint8)
    return (
        np.stack(first) if first else empty,
        (np.stack(second) if second else empty) if with_masked else None,
        np.asarray(valid, dtype=bool),
    )


def label_count(cfg: TrainDataConfig, storage: StorageConfig) -> int:
    """Classes of the head: the identities of a finished dataset (the first thing a run reads, so an
    unfinished prepare is refused before any worker starts)."""
    check_dataset(cfg, storage)
    return len(load_label_map(cfg.uri, storage))
