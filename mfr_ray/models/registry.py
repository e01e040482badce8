"""Backbones by name over the one registry (`mfr_ray.registry.BACKBONES`): `create_backbone(name, **kw)`,
`load_backbone(name, checkpoint_path)`, and the single input preprocessing every backbone shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mfr_ray.registry import BACKBONES

PIXEL_MEAN = 127.5
PIXEL_SCALE = 128.0


def register_backbone(name: str):
    """Class/function decorator adding a backbone factory under `name` (`BACKBONES.register`)."""
    return BACKBONES.register(name)


def list_backbones() -> list[str]:
    return BACKBONES.names()


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build a backbone by name; it exposes `input_size` (H, W) and `embedding_size`."""
    return BACKBONES.create(name, **kwargs)


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


def load_backbone(
    name: str, checkpoint_path: str | Path | None = None, strict: bool = True, **kwargs
) -> nn.Module:
    """Create `name` and, if given, load weights from a local checkpoint file (CPU, weights only)."""
    model = create_backbone(name, **kwargs)
    if checkpoint_path is not None:
        checkpoint = torch.load(str(checkpoint_path), map_location="cpu", weights_only=True)
        model.load_state_dict(extract_state_dict(checkpoint), strict=strict)
    return model


def preprocess(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC RGB crops -> float NCHW tensor scaled as (x - 127.5) / 128."""
    if isinstance(crops, np.ndarray):
        crops = np.ascontiguousarray(crops)
        tensor = torch.from_numpy(crops if crops.flags.writeable else crops.copy())
    else:
        tensor = crops
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    return (tensor.permute(0, 3, 1, 2).float() - PIXEL_MEAN) / PIXEL_SCALE


# A trained model as registry files that load without unpickling: the state dict (tensors only, read back
# with weights_only=True) and a JSON spec naming the factory, backbone and arguments that rebuild the module.
MODEL_SPEC_FILE = "mfr_model.json"
WEIGHTS_FILE = "weights.pt"
MODEL_FORMAT = "mfr-ray/backbone-state-dict/1"
FACTORY = "mfr_ray.models:create_backbone"
REGISTRY_SCHEME = "models:/"


def save_model_files(model: nn.Module, backbone: str, kwargs: dict, folder: str | Path) -> Path:
    """Write `model`'s weights and spec into `folder` (what `_finish_mlflow` registers)."""
    import json

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


def load_model_files(folder: str | Path) -> nn.Module:
    """Rebuild a model (in eval mode) from `save_model_files` output: the spec picks our factory (nothing
    else is called) and the weights load with weights_only=True, so a pickled object in the registry raises,
    never runs."""
    import json

    from mfr_ray.models.spec import read_weights

    folder = Path(folder)
    spec_path = folder / MODEL_SPEC_FILE
    if not spec_path.is_file():
        raise ValueError(f"{folder} has no {MODEL_SPEC_FILE}: not a model registered by mfr-ray")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != MODEL_FORMAT or spec.get("factory") != FACTORY:
        raise ValueError(f"{spec_path}: format {spec.get('format')!r} / factory {spec.get('factory')!r} "
                         f"is not {MODEL_FORMAT!r} / {FACTORY!r}")
    model = create_backbone(spec["backbone"], **spec.get("kwargs", {}))
    model.load_state_dict(read_weights(str(folder / WEIGHTS_FILE)), strict=True)
    if list(model.input_size) != spec["input_size"] or model.embedding_size != spec["embedding_size"]:
        raise ValueError(f"{spec_path}: sizes {spec['input_size']}/{spec['embedding_size']} do not match "
                         f"the rebuilt {spec['backbone']}")
    return model.eval()


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


def load_registered_model(uri: str, tracking_uri: str) -> nn.Module:
    """Download a `models:/` version's files from the MLflow registry and rebuild it (no pickle)."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="mfr-model-") as folder:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri, dst_path=folder)
        return load_model_files(local)
