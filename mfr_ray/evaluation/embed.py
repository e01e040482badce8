"""Embeddings of aligned crops with any registered backbone: in-process for small sets, Ray Data
`map_batches` over an actor pool (model loaded once per actor) for large ones; cached per
(model, crops)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mfr_ray.config.common import StorageConfig
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

        if num_threads:
            use_threads(num_threads)
        self.flip = flip
        net = model.load(storage)
        self.input_size = net.backbone_config.input_size
        self.normalisation = normalisation or net.backbone_config.normalisation
        onnx_file = Path(onnx_file) if onnx_file else spec_onnx_file(model, storage)
        self.session = open_session(runtime, RuntimeModel(net, onnx_file), num_threads, bf16)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import cv2

        from mfr_ray.models.preprocessing import preprocess

        crops = batch["crop"]
        height, width = self.input_size
        if crops.shape[1:3] != (height, width):
            crops = np.stack([cv2.resize(c, (width, height), interpolation=cv2.INTER_AREA) for c in crops])
        x = preprocess(crops, self.normalisation).numpy()
        out = dict(batch)
        out.pop("crop")
        out["embedding"] = self.session(x)
        if self.flip:
            out["embedding_flip"] = self.session(x[:, :, :, ::-1])
        return out


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
) -> EmbeddingSet:
    """Embed `crops` (n, H, W, 3) uint8; cached at `cache_path` when given. `progress(n)` is called as
    each batch of n crops is done (e.g. a tqdm bar's `update`); `storage` reaches an `s3://` checkpoint;
    `runtime` and `onnx_file` are the BatchEmbedder's."""
    if cache_path is not None and cache_path.is_file():
        return EmbeddingSet.load(cache_path)
    progress = progress or (lambda n: None)
    embedder_kwargs = {
        "model": model, "flip": flip, "num_threads": num_threads, "bf16": bf16, "storage": storage,
        "runtime": runtime, "onnx_file": onnx_file,
    }
    if num_actors <= 1 or len(keys) <= batch_size:
        parts = _embed_in_process(crops, embedder_kwargs, batch_size, progress)
    else:
        parts = _embed_on_actors(crops, embedder_kwargs, batch_size, num_actors, progress)
    rows = np.concatenate([p["row"] for p in parts])
    order = np.argsort(rows)
    embedding = np.concatenate([p["embedding"] for p in parts])[order]
    embedding_flip = np.concatenate([p["embedding_flip"] for p in parts])[order] if flip else None
    result = EmbeddingSet(list(keys), embedding.astype(np.float32), embedding_flip)
    if cache_path is not None:
        result.save(cache_path)
    return result


def _embed_in_process(crops: np.ndarray, embedder_kwargs: dict, batch_size: int, progress) -> list[dict]:
    embedder = BatchEmbedder(**embedder_kwargs)
    parts = []
    for s in range(0, len(crops), batch_size):
        rows = np.arange(s, min(s + batch_size, len(crops)))
        parts.append(embedder({"crop": crops[s : s + batch_size], "row": rows}))
        progress(len(parts[-1]["row"]))
    return parts


def _embed_on_actors(
    crops: np.ndarray, embedder_kwargs: dict, batch_size: int, num_actors: int, progress
) -> list[dict]:
    """Ray Data over a bounded pool of BatchEmbedder actors (the model loaded once per actor)."""
    import ray

    from mfr_ray.pools import map_batches_bounded

    ds = ray.data.from_items([{"row": i, "crop": crop} for i, crop in enumerate(crops)])
    ds = map_batches_bounded(ds, BatchEmbedder, constructor_kwargs=embedder_kwargs, batch_size=batch_size,
                             num_actors=num_actors)
    ds.context.enable_progress_bars = False  # the caller's bar counts the crops instead
    parts = []
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        parts.append(part)
        progress(len(part["row"]))
    return parts
