"""`base: other.yaml`: a config inherits from another file (relative to itself, chains allowed, cycles
refused with the chain named); sections merge key by key, any other value is replaced whole; errors name the
file that set the bad key; `mfr config show --origin` names, per key, where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mfr_ray.cli import app
from mfr_ray.config import ConfigError, load_config, read_config_with_origins


def put(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def chain(tmp_path):
    """root (configs/base/train.yaml) <- middle (configs/base/distill.yaml) <- leaf (configs/run.yaml)."""
    put(tmp_path / "configs/base/train.yaml", {
        "kind": "train", "name": "base",
        "data": {"uri": "outputs/a", "val_identities": 7, "masking": {"mix": {"N95": 1, "cloth": 1}}},
        "loss": {"kind": "margin_distill", "beta": 2.0, "use_masked": True},
        "schedule": {"epochs": 4, "batch_size": 16},
    })
    put(tmp_path / "configs/base/distill.yaml", {"base": "train.yaml", "loss": {"distillation": "mse"}})
    return put(tmp_path / "configs/run.yaml", {
        "base": "base/distill.yaml", "name": "run",
        "data": {"uri": "outputs/b", "masking": {"mix": {"cloth": 1}}},
        "schedule": {"epochs": 2},
    })


def test_chain_merges_sections_and_replaces_other_values(chain):
    cfg = load_config(chain)
    assert cfg.name == "run" and cfg.data.uri == "outputs/b" and cfg.data.val_identities == 7
    assert dict(cfg.data.masking.mix) == {"cloth": 1}  # a mapping-valued field is replaced, not merged
    assert (cfg.loss.beta, cfg.loss.use_masked, cfg.loss.distillation) == (2.0, True, "mse")
    assert (cfg.schedule.epochs, cfg.schedule.batch_size) == (2, 16)
    assert load_config(chain, ["schedule.batch_size=8"]).schedule.batch_size == 8


def test_origins_name_the_file_per_key(chain, tmp_path):
    _, origins = read_config_with_origins(chain, ["schedule.batch_size=8"])
    base = str(tmp_path / "configs/base/train.yaml")
    assert origins["data.uri"] == str(chain) and origins["data.val_identities"] == base
    assert origins["loss.distillation"] == str(tmp_path / "configs/base/distill.yaml")
    assert origins["schedule.batch_size"] == "command line" and origins["schedule.epochs"] == str(chain)
    assert "optim.lr" not in origins  # a code default


def test_tagged_section_of_another_kind_is_replaced(tmp_path, chain):
    leaf = put(tmp_path / "configs/triplet.yaml", {"base": "run.yaml", "loss": {"kind": "triplet"}})
    cfg = load_config(leaf)
    assert cfg.loss.kind == "triplet"  # beta/use_masked of margin_distill are not carried over (unknown keys)


def test_cycle_is_refused_with_the_chain_named(tmp_path):
    put(tmp_path / "a.yaml", {"kind": "doctor", "base": "b.yaml"})
    put(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_missing_base_and_mixed_kinds_name_the_file(tmp_path):
    put(tmp_path / "a.yaml", {"kind": "doctor", "base": "nope.yaml"})
    with pytest.raises(ConfigError, match=r"a\.yaml: base 'nope\.yaml' not found"):
        load_config(tmp_path / "a.yaml")
    put(tmp_path / "t.yaml", {"kind": "train", "name": "x"})
    put(tmp_path / "d.yaml", {"kind": "doctor", "base": "t.yaml"})
    with pytest.raises(ConfigError, match="mixes kinds"):
        load_config(tmp_path / "d.yaml")


def test_error_names_the_base_file_that_set_the_bad_value(tmp_path, chain):
    put(tmp_path / "configs/base/train.yaml", {"kind": "train", "name": "b", "schedule": {"batch_size": "many"}})
    with pytest.raises(ConfigError) as err:
        load_config(chain)
    text = str(err.value)
    assert f"invalid config {chain}:" in text
    assert "schedule.batch_size: " in text and "'many'" in text and "[set in " in text
    assert text.rstrip().endswith("base/train.yaml]")
    put(tmp_path / "configs/base/train.yaml", {"kind": "train", "name": "b", "schedule": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"schedule\.bogus: unknown key \[set in .*base/train\.yaml\]"):
        load_config(chain)
    with pytest.raises(ConfigError, match=r"schedule\.epochs: .*'lots'.*\[set in command line\]"):
        load_config(tmp_path / "configs/base/distill.yaml", ["schedule.bogus={}", "schedule.epochs=lots"])


def test_config_show_origin(chain, tmp_path):
    result = CliRunner().invoke(app, ["config", "show", "--origin", str(chain), "schedule.batch_size=8"])
    assert result.exit_code == 0, result.output
    lines = {line.split(":")[0]: line.rsplit("# ", 1)[1] for line in result.output.splitlines()}
    assert lines["data.uri"] == str(chain)
    assert lines["data.val_identities"] == str(tmp_path / "configs/base/train.yaml")
    assert lines["schedule.batch_size"] == "command line" and lines["optim.lr"] == "(code default)"
    plain = CliRunner().invoke(app, ["config", "show", str(chain)])
    assert yaml.safe_load(plain.output)["data"]["val_identities"] == 7


def test_quickstart_stage_overrides_still_work_with_a_one_line_notice(tmp_path, capsys):
    """The quickstart's per-stage `overrides:` (earlier spelling) still apply, with one deprecation line;
    the shipped quickstart points at files that say the same with `base:` (configs/quickstart/)."""
    from mfr_ray.config.base import _NOTICES
    from mfr_ray.quickstart import QuickstartConfig

    _NOTICES.clear()
    old = put(tmp_path / "q.yaml", {"kind": "quickstart", "train_nomask": {
        "config": "configs/train_nomask.yaml", "overrides": ["schedule.epochs=1", "registered_model_name=null"]}})
    cfg = load_config(old, expected=QuickstartConfig)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deprecated: a quickstart stage's `overrides:`")
    shipped = load_config("configs/quickstart.yaml", expected=QuickstartConfig)
    assert not capsys.readouterr().err
    assert cfg.stage("train_nomask") == shipped.stage("train_nomask")


def test_tune_base_config_with_base_replaces_base_overrides(tmp_path, capsys):
    """Tune's `base_overrides:` (earlier spelling) still works, with one deprecation line; a base_config file
    that starts from the training config with `base:` expands to the same trials' config, and a search
    started with one spelling resumes with the other (the digest of the expanded base decides)."""
    from mfr_ray.config.base import _NOTICES
    from mfr_ray.paths import PROJECT_ROOT
    from mfr_ray.tune import TuneConfig
    from mfr_ray.tune.search import base_train_dict, changed_search_keys, search_params, trial_train_config

    _NOTICES.clear()
    space = {"loss.beta": {"type": "loguniform", "low": 0.1, "high": 10.0}}
    old = TuneConfig(base_config=str(PROJECT_ROOT / "configs/train_mobilefacenet_distill.yaml"),
                     base_overrides=["schedule.epochs=4", "registered_model_name=null"], search_space=space)
    assert capsys.readouterr().err.startswith("deprecated: tune `base_overrides:`")
    trial = put(tmp_path / "trial.yaml", {"base": str(PROJECT_ROOT / "configs/train_mobilefacenet_distill.yaml"),
                                          "schedule": {"epochs": 4}, "registered_model_name": None})
    new = TuneConfig(base_config=str(trial), search_space=space)
    assert not capsys.readouterr().err
    assert base_train_dict(old) == base_train_dict(new) | {"kind": "train"}
    old_params = search_params(old, trial_train_config(base_train_dict(old), {}))
    new_params = search_params(new, trial_train_config(base_train_dict(new), {}))
    assert changed_search_keys(old_params, new_params) == []
    longer = TuneConfig(base_config=str(trial), base_overrides=["schedule.epochs=5"], search_space=space)
    assert [c.split(":")[0] for c in changed_search_keys(
        old_params, search_params(longer, trial_train_config(base_train_dict(longer), {})))] == ["base_config.sha256"]


def test_tune_base_error_names_the_file_of_the_chain(tmp_path):
    """A bad value in a tune base_config's chain is reported with the file that set it."""
    from mfr_ray.tune import TuneConfig
    from mfr_ray.tune.search import base_train_dict

    put(tmp_path / "train.yaml", {"kind": "train", "name": "t", "schedule": {"epochs": "many"}})
    trial = put(tmp_path / "trial.yaml", {"base": "train.yaml", "schedule": {"batch_size": 8}})
    cfg = TuneConfig(base_config=str(trial), search_space={"loss.beta": {"type": "choice", "values": [1.0]}})
    with pytest.raises(ConfigError, match=r"schedule\.epochs: .*'many'.*\[set in .*train\.yaml\]"):
        base_train_dict(cfg)
