"""The trained model in the MLflow registry: registered by the real `_finish_mlflow` as a state dict and a
JSON spec (no pickle), loaded by `mfr evaluate`'s ModelSpec from `models:/`, and a pickle planted in the
registry is refused, never run."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import cv2
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mfr_ray.evaluation.embed import BatchEmbedder
from mfr_ray.models.spec import ModelSpec
from mfr_ray.models.store import MODEL_SPEC_FILE, WEIGHTS_FILE, save_model_files
from mfr_ray.models.weights import MODEL_FILE
from mfr_ray.train.config import TrainConfig
from mfr_ray.train.trainer import _finish_mlflow

NAME = "mfr-registry-test"


def _faces(lfw_dir: Path, count: int = 4) -> np.ndarray:
    """Central 112x96 crops of real LFW faces (deep-funneled images are roughly centred)."""
    paths = sorted(lfw_dir.glob("A*/*_0001.jpg"))[:count]
    crops = []
    for path in paths:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)[70:182, 77:173]
        crops.append(np.ascontiguousarray(image))
    return np.stack(crops)


def _register(tmp_path: Path, weights: Path, tracking_uri: str) -> str:
    """Register through the real `_finish_mlflow` with a Ray Train checkpoint of our layout."""
    from ray.train import Checkpoint

    checkpoint_dir = tmp_path / f"checkpoint-{len(list(tmp_path.glob('checkpoint-*')))}"
    checkpoint_dir.mkdir()
    torch.save(ModelSpec(checkpoint=str(weights)).load().state_dict(), checkpoint_dir / MODEL_FILE)
    cfg = TrainConfig.model_validate({
        "data": {"uri": str(tmp_path / "unused")}, "registered_model_name": NAME,
        "tracking": {"tracking_uri": tracking_uri, "experiment": "registry"},
        "storage": {"secret_access_key": "sk-never-in-artifacts-77"},
    })
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name("registry") is None:
        mlflow.create_experiment("registry", artifact_location=(tmp_path / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("registry").experiment_id) as run:
        pass
    result = SimpleNamespace(checkpoint=Checkpoint.from_directory(str(checkpoint_dir)), path=str(tmp_path))
    return _finish_mlflow(cfg, run.info.run_id, result)


def test_registered_model_loads_from_models_uri_without_pickle(tmp_path, tmp_tracking_uri, shared, lfw_dir):
    weights = shared / "weights" / "mobilefacenet_casia.ckpt"
    version = _register(tmp_path, weights, tmp_tracking_uri)
    assert version == "1"
    client = MlflowClient(tmp_tracking_uri)
    files = {a.path for a in client.list_artifacts(client.get_model_version(NAME, version).run_id, "model")}
    assert files == {f"model/{MODEL_SPEC_FILE}", f"model/{WEIGHTS_FILE}"}  # no MLmodel, no pickled module
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}", tracking_uri=tmp_tracking_uri,
                                                     dst_path=str(tmp_path / "dl")))
    spec = json.loads((local / MODEL_SPEC_FILE).read_text())
    assert spec["factory"] == "mfr_ray.models:create_backbone" and spec["backbone"] == "mobilefacenet"
    assert spec["input_size"] == [112, 96] and spec["embedding_size"] == 128
    torch.load(local / WEIGHTS_FILE, weights_only=True)  # tensors only
    assert "sk-never-in-artifacts-77" not in json.dumps(mlflow.artifacts.load_dict(
        f"runs:/{client.get_model_version(NAME, version).run_id}/train_config.json"))

    # `mfr evaluate`'s path: the same embeddings of real faces from the file and from the registry
    client.set_registered_model_alias(NAME, "champion", version)
    crops = _faces(lfw_dir)
    reference = BatchEmbedder(ModelSpec(checkpoint=str(weights)))({"crop": crops})
    for uri in (f"models:/{NAME}/{version}", f"models:/{NAME}@champion"):
        got = BatchEmbedder(ModelSpec(checkpoint=uri))({"crop": crops})
        np.testing.assert_array_equal(got["embedding"], reference["embedding"])
        np.testing.assert_array_equal(got["embedding_flip"], reference["embedding_flip"])
    assert np.linalg.norm(reference["embedding"], axis=1).min() > 0

    # a second version: the alias still names version 1 until moved, and caches follow it
    assert _register(tmp_path, weights, tmp_tracking_uri) == "2"
    champion = ModelSpec(checkpoint=f"models:/{NAME}@champion")
    before = champion.fingerprint()
    assert before == ModelSpec(checkpoint=f"models:/{NAME}/1").fingerprint()
    client.set_registered_model_alias(NAME, "champion", "2")
    assert champion.fingerprint() != before


class _Planted:
    """What a malicious registry entry would carry: unpickling it runs code (here: writes a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_in_the_registry_is_refused_not_run(tmp_path, tmp_tracking_uri):
    marker = tmp_path / "code-ran"
    fresh = ModelSpec(checkpoint=None)
    folder = save_model_files(fresh.load(), "mobilefacenet", {}, tmp_path / "evil")
    torch.save({"weights": _Planted(marker)}, folder / WEIGHTS_FILE)
    with open(folder / "extra.pkl", "wb") as handle:  # stray pickles are never opened either
        pickle.dump(_Planted(marker), handle)
    mlflow.set_tracking_uri(tmp_tracking_uri)
    mlflow.set_experiment("registry-pickle")  # not the experiment an earlier test made active in its store
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
        source = mlflow.get_artifact_uri("model")
    client = MlflowClient(tmp_tracking_uri)
    client.create_registered_model("evil")
    version = client.create_model_version("evil", source=source, run_id=run.info.run_id).version
    with pytest.raises(ValueError, match="refused, not unpickled"):
        ModelSpec(checkpoint=f"models:/evil/{version}", tracking_uri=tmp_tracking_uri).load()
    assert not marker.exists(), "the planted pickle ran"

    spec = json.loads((folder / MODEL_SPEC_FILE).read_text())
    (folder / MODEL_SPEC_FILE).write_text(json.dumps({**spec, "factory": "os:system"}))
    torch.save(fresh.load().state_dict(), folder / WEIGHTS_FILE)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
        source = mlflow.get_artifact_uri("model")
    version = client.create_model_version("evil", source=source, run_id=run.info.run_id).version
    with pytest.raises(ValueError, match="factory 'os:system'"):
        ModelSpec(checkpoint=f"models:/evil/{version}", tracking_uri=tmp_tracking_uri).load()
    assert os.environ["MLFLOW_TRACKING_URI"] == tmp_tracking_uri
