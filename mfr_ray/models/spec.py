"""The one description of a model that training and evaluation share: a registered backbone, its arguments
and the weights to start from, read through `mfr_ray.storage` (a path, `file://`, `s3://`) or from the MLflow
registry (`models:/`), never unpickled."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from mfr_ray.config.base import SharedPath, StrictModel
from mfr_ray.config.common import StorageConfig
from mfr_ray.models.store import StoredModel, is_registry_uri
from mfr_ray.registry import BACKBONES

if TYPE_CHECKING:
    from torch import nn


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

    @classmethod
    def of_stored(cls, stored: StoredModel, label: str | None = None) -> ModelSpec:
        """The spec of a model-files folder's network (`mfr_ray.models.store`)."""
        return cls(backbone=stored.backbone, kwargs=stored.kwargs, checkpoint=stored.weights, label=label)

    def registered(self) -> bool:
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
            from mfr_ray.models.store import registered_version

            identity = list(registered_version(self.checkpoint, self._tracking_uri()))
        else:
            identity = file_version(self.checkpoint, storage) if self.checkpoint else None
        exclude = {"tracking_uri", "label"} | ({"checkpoint"} if self.registered() else set())  # version counts
        payload = [self.model_dump(mode="json", exclude=exclude, include=set(ModelSpec.model_fields)), identity]
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def load(self, storage: StorageConfig | None = None) -> nn.Module:
        """The backbone with its weights, in eval mode: the one loader of a network (a checkpoint file,
        `s3://` through `storage`, or `models:/`). Weights only: nothing from a file, a bucket or the
        registry is unpickled."""
        if self.registered():
            import tempfile

            from mfr_ray.models.store import download_model_files

            with tempfile.TemporaryDirectory(prefix="mfr-model-") as folder:
                return load_stored(download_model_files(self.checkpoint, self._tracking_uri(), folder))
        from mfr_ray.models.factory import create_backbone
        from mfr_ray.models.weights import extract_state_dict, read_weights

        model = create_backbone(self.backbone, **self.kwargs)
        if self.checkpoint:
            model.load_state_dict(extract_state_dict(read_weights(self.checkpoint, storage)), strict=True)
        return model.eval()


def load_stored(stored: StoredModel) -> nn.Module:
    """The network a model-files folder describes, checked against the sizes it was saved with."""
    model = ModelSpec.of_stored(stored).load()
    stored.check_sizes(model)
    return model
