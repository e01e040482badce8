"""The service's configuration without starting it: the API key (where it comes from, that only its digest
travels, constant-time checks, refusal to bind beyond loopback without one), the rate limiter, and the
KubeRay RayService manifest, whose Serve config must build the application `mfr serve` runs."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import yaml

from mfr_ray.config.base import ConfigError
from mfr_ray.serve.auth import (
    API_KEY_ENV,
    API_KEY_FILE_ENV,
    RateLimiter,
    is_loopback,
    load_key_digest,
    presented_key,
    resolve_auth,
)

ROOT = Path(__file__).resolve().parent.parent
KEY = "k3y-for-tests-0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(API_KEY_FILE_ENV, raising=False)


def test_loopback_needs_no_key_but_any_other_bind_does():
    assert (
        resolve_auth("127.0.0.1") is None
        and resolve_auth("localhost") is None
        and resolve_auth("::1") is None
    )
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        assert not is_loopback(host)
        with pytest.raises(ConfigError, match="needs an API key"):
            resolve_auth(host)


def test_key_from_file_or_env_only_its_digest_is_kept(tmp_path, monkeypatch):
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    digest = resolve_auth("0.0.0.0", key_file)
    assert digest.matches(KEY) and not digest.matches(KEY[:-1]) and not digest.matches(None)
    assert KEY not in repr(digest) and KEY.encode() not in pickle.dumps(digest)  # what goes to the replicas
    monkeypatch.setenv(API_KEY_FILE_ENV, str(key_file))
    assert load_key_digest().matches(KEY)
    monkeypatch.delenv(API_KEY_FILE_ENV)
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert resolve_auth("127.0.0.1").matches(KEY)  # a configured key is enforced on loopback too


def test_key_errors_name_the_source_never_the_key(tmp_path, monkeypatch):
    short = tmp_path / "short"
    short.write_text("abc123")
    with pytest.raises(ConfigError, match="shorter than") as err:
        load_key_digest(short)
    assert "abc123" not in str(err.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_key_digest(tmp_path / "missing")
    monkeypatch.setenv(API_KEY_ENV, "tiny-secret")
    with pytest.raises(ConfigError) as err:
        load_key_digest()
    assert "tiny-secret" not in str(err.value)


def test_presented_key_from_bearer_or_header():
    assert presented_key({"authorization": f"Bearer {KEY}"}) == KEY
    assert presented_key({"authorization": f"bearer  {KEY} "}) == KEY
    assert presented_key({"x-api-key": KEY}) == KEY
    assert presented_key({"authorization": f"Basic {KEY}"}) is None and presented_key({}) is None


def test_rate_limiter_allows_the_burst_then_the_rate():
    limiter = RateLimiter(rate=20, burst=3)
    assert [limiter.allow("a")[0] for _ in range(4)] == [True, True, True, False]
    allowed, wait = limiter.allow("a")
    assert not allowed and 0 < wait <= 0.05
    assert limiter.allow("b")[0]  # per client
    time.sleep(0.06)
    assert limiter.allow("a")[0]


def test_serve_config_names_the_bad_key():
    from mfr_ray.serve.app import ServeConfig

    with pytest.raises(ValueError, match="max_batch_sise"):
        ServeConfig.model_validate({"package": "p", "gallery": "g", "batching": {"max_batch_sise": 4}})
    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig.model_validate(
            {"package": "p", "gallery": "g", "autoscaling": {"min_replicas": 5, "max_replicas": 2}}
        )


def test_rayservice_manifest_builds_the_application(monkeypatch, shared, tmp_path):
    from ray.serve.deployment import Application

    from mfr_ray.config.common import TrackingConfig
    from mfr_ray.serve.app import app_builder
    from mfr_ray.serve.export import export_package

    service = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["rayVersion"] == "2.60.0"
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        assert pod["serviceAccountName"] == "mfr-ray"
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env[API_KEY_FILE_ENV].startswith("/etc/mfr-serve/")
        assert any(v["secret"]["secretName"] == "mfr-serve-api-key" for v in pod["volumes"])
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, _, name = app["import_path"].partition(":")
    assert f"{module}:{name}" == "mfr_ray.serve.app:app_builder"
    assert app["args"]["host"] == serve_config["http_options"]["host"] == "0.0.0.0"
    assert app["args"]["behind_tls_proxy"] is True  # TLS ends at the load balancer, said explicitly
    with pytest.raises(ConfigError, match="needs an API key"):  # the pods' secret is what lets it start
        app_builder(app["args"])
    monkeypatch.setenv(API_KEY_ENV, KEY)
    # the package is resolved once, here (the manifest's bucket is a placeholder: a local package stands in)
    package = export_package(str(shared / "weights" / "mobilefacenet_casia.ckpt"), tmp_path / "pkg",
                             tracking=TrackingConfig(enabled=False))
    assert isinstance(app_builder(app["args"] | {"package": package.path}), Application)
