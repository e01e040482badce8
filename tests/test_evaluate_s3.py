"""Evaluation reads its checkpoint from object storage: the shared MobileFaceNet uploaded to the real
SeaweedFS S3 server scores real LFW pairs exactly as the local file does, reached with the credentials of
the config's `storage` section (none in the environment); its cache key follows the object's version; a
pickle planted in an s3 checkpoint is refused, never run."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from mfr_ray.config.common import StorageConfig
from mfr_ray.evaluation.config import EvaluateConfig
from mfr_ray.evaluation.runner import evaluate
from mfr_ray.models.spec import ModelSpec
from mfr_ray.storage import StorageError, write_bytes

NO_EXTRAS = {"identification": False, "open_set": False, "clustering": False, "classifiers": False}
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
           "AWS_ENDPOINT_URL_S3")


@pytest.fixture
def no_aws_env(monkeypatch):
    """Only the config's storage section can reach the server."""
    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)


def _evaluation(tmp_path: Path, name: str, checkpoint: str, storage: StorageConfig) -> EvaluateConfig:
    """16 LFW pairs of folds 1-2 (deep-funneled crops, no detection), one protocol, no extras."""
    return EvaluateConfig(
        name=name, model={"checkpoint": checkpoint}, pairs={"limit_folds": 2, "max_pairs_per_fold": 8},
        flip=False, sources={"unmasked": {"align": {"skip_detection": True}}},
        protocols=[{"name": "single", "feature": "single"}], analyses=NO_EXTRAS,
        cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"), storage=storage,
    )


def test_evaluation_scores_an_s3_checkpoint_as_the_local_file(tmp_path, tmp_tracking_uri, s3_server, shared,
                                                               no_aws_env):
    local = shared / "weights" / "mobilefacenet_casia.ckpt"
    uri = f"s3://{s3_server.bucket}/checkpoints/casia/model.ckpt"
    write_bytes(uri, local.read_bytes(), s3_server.storage)

    from_file = evaluate(_evaluation(tmp_path, "from-file", str(local), s3_server.storage))
    from_s3 = evaluate(_evaluation(tmp_path, "from-s3", uri, s3_server.storage))
    assert from_s3["model"] == "mobilefacenet:model.ckpt"
    assert from_file["verification"][0]["accuracy_mean"] > 0.8  # the CASIA weights, not a fresh network
    assert from_s3["verification"] == from_file["verification"]
    embeddings = [np.load(tmp_path / "out" / name / "embeddings.npz") for name in ("from-file", "from-s3")]
    np.testing.assert_array_equal(embeddings[0]["embedding"], embeddings[1]["embedding"])

    # the cache key follows the object: the same bytes again keep it, other weights change it
    spec = ModelSpec(checkpoint=uri)
    before = spec.fingerprint(s3_server.storage)
    assert spec.fingerprint(s3_server.storage) == before
    buffer = io.BytesIO()
    torch.save(spec.model_copy(update={"checkpoint": None}).load().state_dict(), buffer)
    write_bytes(uri, buffer.getvalue(), s3_server.storage)
    assert spec.fingerprint(s3_server.storage) != before

    # without the configured credentials the bucket is closed, and the error shows no secret
    anonymous = StorageConfig(endpoint_url=s3_server.endpoint_url, access_key_id="nobody",
                              secret_access_key="not-the-secret-5521", max_attempts=1)
    with pytest.raises(StorageError) as refused:
        spec.load(anonymous)
    assert "not-the-secret-5521" not in str(refused.value) and s3_server.secret_key not in str(refused.value)


class _Planted:
    """What a malicious checkpoint would carry: unpickling it runs code (here: writes a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_in_an_s3_checkpoint_is_refused_not_run(tmp_path, tmp_tracking_uri, s3_server, no_aws_env):
    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"net_state_dict": _Planted(marker)}, buffer)
    uri = f"s3://{s3_server.bucket}/checkpoints/evil/model.ckpt"
    write_bytes(uri, buffer.getvalue(), s3_server.storage)
    with pytest.raises(ValueError, match="refused, not unpickled"):
        ModelSpec(checkpoint=uri).load(s3_server.storage)
    with pytest.raises(ValueError, match="refused, not unpickled"):
        evaluate(_evaluation(tmp_path, "evil", uri, s3_server.storage))
    assert not marker.exists(), "the planted pickle ran"
