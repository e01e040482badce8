"""Configs: YAML + overrides into typed models; errors name the key and the file; secrets never leak."""

from pathlib import Path

import pytest
import yaml

from mfr_ray.config import CONFIG_KINDS, ConfigError, flatten_config, load_config, read_config
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


@pytest.mark.parametrize(
    "path", sorted([*CONFIG_DIR.glob("*.yaml"), *CONFIG_DIR.glob("quickstart/*.yaml")]),
    ids=lambda p: str(p.relative_to(CONFIG_DIR)),
)
def test_every_shipped_config_validates(path):
    data = read_config(path)  # `kind` may come from the file's base (configs/base/)
    assert data.get("kind") in CONFIG_KINDS, f"{path.name}: kind {data.get('kind')!r} is not registered"
    load_config(path)


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "base").glob("*.yaml")), ids=lambda p: p.name)
def test_every_base_is_partial_and_inherited(path):
    """configs/base/ holds partial configs (no `name`: never run alone, out of the configs/*.yaml glob); each
    names its kind and is the base of some shipped config."""
    data = yaml.safe_load(path.read_text())
    assert "name" not in data
    assert read_config(path).get("kind") in CONFIG_KINDS
    users = [p for p in [*CONFIG_DIR.glob("*.yaml"), *CONFIG_DIR.glob("base/*.yaml")]
             if (p.parent / str(yaml.safe_load(p.read_text()).get("base"))).resolve() == path.resolve()]
    assert users, f"{path.name} is nobody's base"


def test_secret_of_the_wrong_type_is_never_echoed(tmp_path):
    """A secret that fails validation: the error names the key, never the value (nor in a raw
    ValidationError, which pydantic would print with its input)."""
    from pydantic import ValidationError

    from mfr_ray.config.common import StorageConfig

    path = write(tmp_path, {"kind": "doctor", "storage": {"secret_access_key": 918273645546372819}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "storage.secret_access_key" in str(err.value) and "918273645546372819" not in str(err.value)
    with pytest.raises(ValidationError) as raw:
        StorageConfig(secret_access_key=918273645546372819)
    assert "918273645546372819" not in str(raw.value)


def test_section_given_a_string_hides_it(tmp_path):
    """`storage: <a string>` (e.g. a pasted key) is a bad section; its value may be the secret itself."""
    path = write(tmp_path, {"kind": "doctor", "storage": "AKIAEXAMPLE:hunter2-pasted-secret"})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "storage" in str(err.value) and "hunter2-pasted-secret" not in str(err.value)
    with pytest.raises(ConfigError) as bad:  # a plain field still shows what it got
        load_config(path, ["storage={}", "storage.max_attempts=lots"])
    assert "lots" in str(bad.value)


def test_yaml_error_does_not_quote_the_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("kind: doctor\nstorage:\n  secret_access_key: hunter2-in-yaml: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "not valid YAML at line 3" in str(err.value) and "hunter2-in-yaml" not in str(err.value)


@pytest.mark.parametrize(
    ("uri", "secret"),
    [
        ("https://alice:s3cr3t-pw@mlflow.example.com", "s3cr3t-pw"),
        ("postgresql://mlflow:db-pa55word@db.internal:5432/mlflow", "db-pa55word"),
        ("https://ghp_tokenonly123@mlflow.example.com/", "ghp_tokenonly123"),
        ("https://mlflow.example.com/?token=tok-abc-123&x=1", "tok-abc-123"),
    ],
)
def test_credentials_in_tracking_uri_never_shown(tmp_path, uri, secret):
    """`dump_config` (config show, cards) and `flatten_config` (MLflow params) hide credentials inside
    URIs; a bad value in a URI field is shown redacted too."""
    cfg = load_config(write(tmp_path, {"kind": "doctor", "tracking": {"tracking_uri": uri}}))
    assert cfg.tracking.tracking_uri == uri  # the jobs still connect with it
    from mfr_ray.config import dump_config

    shown = dump_config(cfg)["tracking"]["tracking_uri"]
    assert secret not in shown and "***" in shown
    assert secret not in str(flatten_config(cfg))
    assert secret not in str(flatten_config({"tracking": {"tracking_uri": uri}}))  # plain dicts too
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {"kind": "doctor", "tracking": {"tracking_uri": uri, "enabled": uri}}))
    assert "tracking.enabled" in str(err.value) and secret not in str(err.value)
