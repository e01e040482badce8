"""Embeddings of aligned crops with any registered backbone: in-process for small sets, Ray Data
`map_batches` over an actor pool (model loaded once per actor) for large ones; cached per
(model, crops)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mfr_ray.config.common import StorageConfig
from mfr_ray.evaluation.timing import EvaluationTimer, per_row_seconds
from mfr_ray.models.backbone_config import Normalisation
from mfr_ray.models.spec import ModelSpec
from mfr_ray.runtime import DEFAULT_RUNTIME


@dataclass
class EmbeddingSet:
    """Raw (un-normalised) embeddings of each key and, with flip, of its mirror image."""

    keys: list[str]
    embedding: np.ndarray  # (n, d) float32
    embedding_flip: np.ndarray | None = None

    def features(self, mode: str = "sum") -> np.ndarray:
        """Per-image feature: "single" (the image only), "sum" (image + mirror), "concat" ([image, mirror])."""
        if mode == "single" or self.embedding_flip is None:
            return self.embedding
        if mode == "sum":
            return self.embedding + self.embedding_flip
        if mode == "concat":
            return np.concatenate([self.embedding, self.embedding_flip], axis=1)
        raise ValueError(f"unknown feature mode {mode!r}")

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        arrays = {"keys": np.array(self.keys), "embedding": self.embedding}
        if self.embedding_flip is not None:
            arrays["embedding_flip"] = self.embedding_flip
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> EmbeddingSet:
        with np.load(path) as data:
            return cls(list(data["keys"]), data["embedding"], data.get("embedding_flip"))


class BatchEmbedder:
    """Batch UDF: {"crop": uint8 NHWC} -> {"embedding", "embedding_flip"}. Loads the model once and runs it
    on `runtime` (`mfr_ray.runtime`), exported to ONNX at `onnx_file` (a package's) or else in the cache,
    keyed by the weights' fingerprint (fresh weights: a temporary export). Crops are resized to the input
    size and normalised as the backbone's config says (`normalisation`: a package's own record)."""

    def __init__(
        self,
        model: ModelSpec,
        flip: bool = True,
        num_threads: int | None = None,
        bf16: bool = False,
        storage: StorageConfig | None = None,
        runtime: str = DEFAULT_RUNTIME,
        onnx_file: str | Path | None = None,
        normalisation: Normalisation | None = None,
    ):
        from mfr_ray.runtime import RuntimeModel, open_session
        from mfr_ray.runtime.onnx import spec_onnx_file
        from mfr_ray.threads import use_threads

        started = time.perf_counter()
        if num_threads:
            use_threads(num_threads)
        self.flip = flip
        net = model.load(storage)
        self.input_size = net.backbone_config.input_size
        self.normalisation = normalisation or net.backbone_config.normalisation
        onnx_file = Path(onnx_file) if onnx_file else spec_onnx_file(model, storage)
        self.session = open_session(runtime, RuntimeModel(net, onnx_file), num_threads, bf16)
        self.load_seconds = time.perf_counter() - started  # reported once, with the first batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch with its embeddings, and its seconds per part as `seconds_*` columns
        (`mfr_ray.evaluation.timing`)."""
        import cv2

        from mfr_ray.models.preprocessing import preprocess

        ticks = [time.perf_counter()]
        crops = batch["crop"]
        height, width = self.input_size
        if crops.shape[1:3] != (height, width):
            crops = np.stack([cv2.resize(c, (width, height), interpolation=cv2.INTER_AREA) for c in crops])
        x = preprocess(crops, self.normalisation).numpy()
        out = dict(batch)
        out.pop("crop")
        ticks.append(time.perf_counter())
        out["embedding"] = self.session(x)
        ticks.append(time.perf_counter())
        if self.flip:
            out["embedding_flip"] = self.session(x[:, :, :, ::-1])
        ticks.append(time.perf_counter())
        seconds = dict(zip(("preprocess", "embed", "flip"), np.diff(ticks), strict=True))
        seconds["load_embedder"], self.load_seconds = self.load_seconds, 0.0
        return out | per_row_seconds(seconds, len(crops))


class SharedEmbedder:
    """The in-process BatchEmbedder kept for the next `embed_crops` with the same settings: an evaluation's
    variants load (and the runtime compiles) the network once, not once per variant."""

    def __init__(self) -> None:
        self.kwargs: dict | None = None
        self.embedder: BatchEmbedder | None = None

    def get(self, kwargs: dict) -> BatchEmbedder:
        if self.embedder is None or kwargs != self.kwargs:
            self.embedder, self.kwargs = BatchEmbedder(**kwargs), kwargs
        return self.embedder


def _embedded_batches(crops: np.ndarray, embedder_kwargs: dict, num_actors: int, batch_size: int,
                      shared: SharedEmbedder) -> Iterator[dict]:
    """The BatchEmbedder's output batches (each with its `row` numbers), in this process (the shared
    embedder) or on an actor pool (`pools.run_batches`)."""
    from mfr_ray.pools import run_batches

    def crashed(item: dict, reason: str) -> dict:
        raise RuntimeError(f"embedding crop {item['row']} {reason}: an aligned crop cannot be skipped")

    items = [{"row": i, "crop": crop} for i, crop in enumerate(crops)]
    yield from run_batches(items, BatchEmbedder, constructor_kwargs=embedder_kwargs, key="row",
                           batch_size=batch_size, num_actors=num_actors, on_crash=crashed,
                           local=lambda: shared.get(embedder_kwargs))


def embed_crops(
    keys: list[str],
    crops: np.ndarray,
    model: ModelSpec,
    flip: bool = True,
    cache_path: Path | None = None,
    num_actors: int = 1,
    batch_size: int = 128,
    num_threads: int | None = None,
    bf16: bool = False,
    progress: Callable[[int], Any] | None = None,
    storage: StorageConfig | None = None,
    runtime: str = DEFAULT_RUNTIME,
    onnx_file: str | Path | None = None,
    timer: EvaluationTimer | None = None,
    shared: SharedEmbedder | None = None,
) -> EmbeddingSet:
    """Embed `crops` (n, H, W, 3) uint8; cached at `cache_path` when given. `progress(n)` is called as
    each batch of n crops is done (e.g. a tqdm bar's `update`); `storage` reaches an `s3://` checkpoint;
    `runtime` and `onnx_file` are the BatchEmbedder's; `timer` sums the embedders' seconds per part; `shared` keeps the in-process BatchEmbedder for the next call."""
    if cache_path is not None and cache_path.is_file():
        return EmbeddingSet.load(cache_path)
    progress = progress or (lambda n: None)
    timer = timer or EvaluationTimer()
    kwargs = {"model": model, "flip": flip, "num_threads": num_threads, "bf16": bf16, "storage": storage,
              "runtime": runtime, "onnx_file": onnx_file}
    parts = []
    for part in _embedded_batches(crops, kwargs, num_actors, batch_size, shared or SharedEmbedder()):
        parts.append(timer.take(part))
        progress(len(part["row"]))
    rows = np.concatenate([p["row"] for p in parts])
    order = np.argsort(rows)
    embedding = np.concatenate([p["embedding"] for p in parts])[order]
    embedding_flip = np.concatenate([p["embedding_flip"] for p in parts])[order] if flip else None
    result = EmbeddingSet(list(keys), embedding.astype(np.float32), embedding_flip)
    if cache_path is not None:
        result.save(cache_path)
    return result
