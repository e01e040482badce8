"""A trained model as files that load without unpickling - the state dict (tensors only, read back with
weights_only=True) and a JSON description naming the factory, backbone and arguments that rebuild the
module - and the MLflow model registry (`models:/NAME/VERSION`, `models:/NAME@ALIAS`) that keeps them.
Building and loading is `ModelSpec.load`'s (the one loader); this module only writes, reads and fetches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

MODEL_SPEC_FILE = "mfr_model.json"
WEIGHTS_FILE = "weights.pt"
MODEL_FORMAT = "mfr-ray/backbone-state-dict/1"
FACTORY = "mfr_ray.models:create_backbone"
REGISTRY_SCHEME = "models:/"


@dataclass(frozen=True)
class StoredModel:
    """What a model-files folder describes: the backbone and arguments to build, the weights to load and
    the sizes the rebuilt network must have."""

    backbone: str
    kwargs: dict
    weights: str
    input_size: list[int]
    embedding_size: int
    described_in: str

    def check_sizes(self, model: nn.Module) -> None:
        """Refuse a rebuilt network whose sizes differ from the ones the files were saved with."""
        if list(model.input_size) != self.input_size or model.embedding_size != self.embedding_size:
            raise ValueError(f"{self.described_in}: sizes {self.input_size}/{self.embedding_size} do not match "
                             f"the rebuilt {self.backbone}")


def save_model_files(model: nn.Module, backbone: str, kwargs: dict, folder: str | Path) -> Path:
    """Write `model`'s weights and description into `folder` (what training registers, what a package holds)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    spec = {
        "format": MODEL_FORMAT,
        "factory": FACTORY,
        "backbone": backbone,
        "kwargs": kwargs,
        "input_size": list(model.input_size),
        "embedding_size": int(model.embedding_size),
        "weights": WEIGHTS_FILE,
        "torch": torch.__version__,
    }
    (folder / MODEL_SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return folder


def read_model_files(folder: str | Path) -> StoredModel:
    """The description in a `save_model_files` folder; anything but our format and factory is refused, so
    nothing a file names is ever called."""
    folder = Path(folder)
    spec_path = folder / MODEL_SPEC_FILE
    if not spec_path.is_file():
        raise ValueError(f"{folder} has no {MODEL_SPEC_FILE}: not a model registered by mfr-ray")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != MODEL_FORMAT or spec.get("factory") != FACTORY:
        raise ValueError(f"{spec_path}: format {spec.get('format')!r} / factory {spec.get('factory')!r} "
                         f"is not {MODEL_FORMAT!r} / {FACTORY!r}")
    return StoredModel(spec["backbone"], spec.get("kwargs", {}), str(folder / WEIGHTS_FILE),
                       spec["input_size"], spec["embedding_size"], str(spec_path))


def is_registry_uri(checkpoint: str | Path | None) -> bool:
    return str(checkpoint or "").startswith(REGISTRY_SCHEME)


def registered_version(uri: str, tracking_uri: str) -> tuple[str, str, str]:
    """(name, version, run_id) of `models:/NAME/VERSION` or `models:/NAME@ALIAS` (an alias can move:
    caches key on the version it points at now)."""
    from mlflow import MlflowClient

    ref = uri.removeprefix(REGISTRY_SCHEME)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif ref.count("/") == 1 and ref.rsplit("/", 1)[1].isdigit():
        name, number = ref.rsplit("/", 1)
        version = client.get_model_version(name, number)
    else:
        raise ValueError(f"{uri!r}: use models:/NAME/VERSION or models:/NAME@ALIAS")
    return name, str(version.version), version.run_id or ""


def download_model_files(uri: str, tracking_uri: str, folder: str | Path) -> StoredModel:
    """Fetch the model files at an MLflow URI (`models:/...`, `runs:/.../model`) into `folder`."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri, dst_path=str(folder))
    return read_model_files(local)


def register_model_version(name: str, artifact_path: str, run_id: str, tags: dict[str, str]) -> str:
    """A new version of registered model `name` (created on first use) whose source is `artifact_path` of the
    active MLflow run `run_id`; returns the version number. The one place trained models and packages are
    registered."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=mlflow.get_artifact_uri(artifact_path), run_id=run_id, tags=tags)
    return str(version.version)
