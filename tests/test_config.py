"""Configs: YAML + overrides into typed models; errors name the key and the file; secrets never leak."""

from pathlib import Path

import pytest
import yaml

from mfr_ray.config import CONFIG_KINDS, ConfigError, flatten_config, load_config
from mfr_ray.config.common import DoctorConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_are_typed_and_nested(tmp_path):
    path = write(tmp_path, {"kind": "doctor", "storage": {"region": "eu-west-1"}})
    cfg = load_config(path, ["storage.max_attempts=3", "tracking.experiment=exp-a", "s3_uri=s3://b/p"])
    assert isinstance(cfg, DoctorConfig)
    assert cfg.storage.max_attempts == 3 and isinstance(cfg.storage.max_attempts, int)
    assert cfg.storage.region == "eu-west-1"
    assert cfg.tracking.experiment == "exp-a"
    assert cfg.s3_uri == "s3://b/p"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, {"kind": "doctor", "storage": {"regoin": "x"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "storage.regoin" in str(err.value) and str(path) in str(err.value)
    assert "unknown key" in str(err.value)


def test_bad_value_names_key_and_value(tmp_path):
    path = write(tmp_path, {"kind": "doctor"})
    with pytest.raises(ConfigError) as err:
        load_config(path, ["storage.max_attempts=lots"])
    message = str(err.value)
    assert "storage.max_attempts" in message and "lots" in message and str(path) in message


def test_missing_kind_and_unknown_kind(tmp_path):
    with pytest.raises(ConfigError, match="missing `kind`"):
        load_config(write(tmp_path, {"storage": {}}))
    with pytest.raises(ConfigError, match="unknown config kind 'nope'"):
        load_config(write(tmp_path, {"kind": "nope"}))


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, {"kind": "doctor"}), ["storage.region"])


def test_secrets_redacted_in_flat_params(tmp_path):
    path = write(tmp_path, {"kind": "doctor", "storage": {"secret_access_key": "hunter2-very-secret"}})
    cfg = load_config(path)
    flat = flatten_config(cfg)
    assert flat["storage.secret_access_key"] == "***"
    assert "hunter2-very-secret" not in repr(cfg) and "hunter2-very-secret" not in str(flat)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    data = yaml.safe_load(path.read_text())
    assert data.get("kind") in CONFIG_KINDS, f"{path.name}: kind {data.get('kind')!r} is not registered"
    load_config(path)
