"""Checkpoint tensors: read from a path, `file://` or `s3://` with weights_only=True (nothing is unpickled),
and the state dict found inside any checkpoint layout we meet."""

from __future__ import annotations

import io
import pickle
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mfr_ray.config.common import StorageConfig

MODEL_FILE = "model.pt"  # the bare backbone state dict in every training checkpoint: what evaluation reads


def read_weights(uri: str, storage: StorageConfig | None = None) -> dict:
    """A checkpoint's tensors from a path, `file://` or `s3://` URI, loaded with weights_only=True: a
    pickled object inside raises a ValueError and is never run."""
    import torch

    from mfr_ray.storage import read_bytes

    data = read_bytes(uri, storage)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{uri} is not a plain state dict (refused, not unpickled): {type(exc).__name__}") from None


def extract_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights inside any checkpoint layout we meet: Xiaoccer's {"net_state_dict": ...}, ours
    {"model": ...}, or a plain state dict. A DataParallel `module.` prefix is dropped."""
    for key in ("net_state_dict", "model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    return checkpoint
