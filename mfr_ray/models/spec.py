"""The one description of a model that training and evaluation share: a registered backbone, its arguments
and the weights to start from, read through `mfr_ray.storage` (a path, `file://`, `s3://`) or from the MLflow
registry (`models:/`), never unpickled."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from mfr_ray.config.base import SharedPath, StrictModel
from mfr_ray.config.common import StorageConfig
from mfr_ray.registry import BACKBONES

if TYPE_CHECKING:
    from torch import nn

MODEL_FILE = "model.pt"  # the bare backbone state dict in every training checkpoint: what evaluation reads


class ModelSpec(StrictModel):
    """A backbone by registry name and an optional checkpoint: a file (Xiaoccer's or ours) on disk or in
    object storage, or a model registered by `mfr train` (`models:/NAME/VERSION`, `models:/NAME@ALIAS`),
    which brings its own backbone and arguments."""

    backbone: BACKBONES.name_type = "mobilefacenet"  # checked when a config names one
    checkpoint: SharedPath | None = Field(
        "${shared}/weights/mobilefacenet_casia.ckpt", validate_default=True,
        description="weights: a path, file://, s3://bucket/key or models:/NAME/VERSION|@ALIAS; None: fresh",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="backbone arguments, e.g. embedding_size")
    label: str | None = Field(None, description="name shown in reports; default: backbone + checkpoint file")
    tracking_uri: str | None = Field(
        None, description="MLflow store of a models:/ checkpoint; None: the job's tracking store"
    )

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return value or None  # `model.checkpoint=` on the command line: no weights

    def registered(self) -> bool:
        from mfr_ray.models.registry import is_registry_uri

        return is_registry_uri(self.checkpoint)

    def _tracking_uri(self) -> str:
        from mfr_ray.tracking import TrackingConfig, resolve_tracking_uri

        return resolve_tracking_uri(TrackingConfig(tracking_uri=self.tracking_uri))

    def display_name(self) -> str:
        if self.label or not self.checkpoint:
            return self.label or self.backbone
        return self.checkpoint if self.registered() else f"{self.backbone}:{Path(self.checkpoint).name}"

    def fingerprint(self, storage: StorageConfig | None = None) -> str:
        """Cache key of these weights: the registered version a `models:/` URI names now (an alias moves),
        else the checkpoint's size and version (local mtime, S3 ETag) as its store reports them."""
        from mfr_ray.storage import file_version

        if self.registered():
            from mfr_ray.models.registry import registered_version

            identity = list(registered_version(self.checkpoint, self._tracking_uri()))
        else:
            identity = file_version(self.checkpoint, storage) if self.checkpoint else None
        exclude = {"tracking_uri", "label"} | ({"checkpoint"} if self.registered() else set())  # version counts
        payload = [self.model_dump(mode="json", exclude=exclude, include=set(ModelSpec.model_fields)), identity]
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def load(self, storage: StorageConfig | None = None) -> nn.Module:
        """The backbone with its weights, in eval mode; `storage` reaches an `s3://` checkpoint. Weights
        only: nothing from a file, a bucket or the registry is unpickled."""
        from mfr_ray.models import create_backbone, extract_state_dict
        from mfr_ray.models.registry import load_registered_model

        if self.registered():
            return load_registered_model(self.checkpoint, self._tracking_uri()).eval()
        model = create_backbone(self.backbone, **self.kwargs)
        if self.checkpoint:
            model.load_state_dict(extract_state_dict(read_weights(self.checkpoint, storage)), strict=True)
        return model.eval()


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
