"""The one redaction (mfr_ray.config.secrets): configured and environment credentials, URI credentials,
and secret keys of an override, hidden wherever text is shown or logged."""

from __future__ import annotations

from mfr_ray.config.common import StorageConfig
from mfr_ray.config.secrets import REDACTED, redact, safe_override, secret_fields
from mfr_ray.train.config import TrainConfig

URI = "https://user:hunter22@mlflow.example/x?token=abc123&run=1"


def test_uri_credentials_are_hidden_with_or_without_a_storage_config():
    for text in (redact(URI), redact(URI, StorageConfig())):
        assert "hunter22" not in text and "abc123" not in text and "run=1" in text and REDACTED in text


def test_configured_and_environment_credentials_are_hidden_only_where_storage_is_given(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-9")
    storage = StorageConfig(access_key_id="AKIDCONFIGURED", secret_access_key="cfg-secret-7")
    text = "failed with AKIDCONFIGURED / cfg-secret-7 / env-secret-9"
    assert redact(text) == text  # no storage section: URI credentials only
    assert redact(text, storage) == f"failed with {REDACTED} / {REDACTED} / env-secret-9"
    assert redact(text, None) == f"failed with AKIDCONFIGURED / cfg-secret-7 / {REDACTED}"  # the environment's
    assert redact(text, storage, None).count(REDACTED) == 3


def test_an_override_at_a_secret_key_is_shown_hidden():
    keys = secret_fields(TrainConfig)
    assert "storage.secret_access_key" in keys
    assert safe_override("storage.secret_access_key=s3cr3t", keys) == f"storage.secret_access_key={REDACTED}"
    shown = safe_override("storage={secret_access_key: s3cr3t, region: eu}", keys)
    assert "s3cr3t" not in shown and "eu" in shown
    assert safe_override("optim.lr=0.1", keys) == "optim.lr=0.1"
