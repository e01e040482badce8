"""Every shipped config (`configs/*.yaml`) resolves to exactly what it resolved to before the configs were
rewritten as a base plus what differs (issue 27): `tests/data/config_snapshots.json` holds the merged,
validated result of each file (secrets redacted, the shared folder written `${shared}`), taken with the
loader before `base:` existed. Dropping a line equal to a code default, or moving one into a base, must
move no recipe. After an intended change of a shipped config, regenerate with
`python tests/test_config_snapshots.py` and review the diff."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mfr_ray.config import dump_config, load_config
from mfr_ray.paths import PROJECT_ROOT, shared_dir

CONFIGS = PROJECT_ROOT / "configs"
SNAPSHOTS = Path(__file__).parent / "data" / "config_snapshots.json"
DERIVED = Path(__file__).parent / "data" / "derived_config_snapshots.json"


def plain(config) -> dict:
    text = json.dumps(dump_config(config), sort_keys=True)
    return json.loads(text.replace(str(shared_dir()), "${shared}"))


def resolved(path: Path) -> dict:
    return plain(load_config(path))


def derived_configs() -> dict[str, dict]:
    """The configs shipped configs expand to: every stage config the quickstart runs (plain and `--quick`)
    and the training config every trial of a shipped search starts from."""
    from mfr_ray.quickstart import STAGES
    from mfr_ray.train import TrainConfig
    from mfr_ray.tune.search import base_train_dict

    quickstart = load_config(CONFIGS / "quickstart.yaml")
    derived = {
        f"quickstart.yaml#{stage}{'+quick' if quick else ''}": plain(
            quickstart.model_copy(update={"quick": quick}).stage(stage)
        )
        for stage in STAGES
        for quick in (False, True)
    }
    for path in sorted(CONFIGS.glob("tune_*.yaml")):
        base = base_train_dict(load_config(path))
        derived[f"{path.name}#base"] = plain(TrainConfig.model_validate({k: v for k, v in base.items() if k != "kind"}))
    return derived


def test_every_shipped_config_has_a_snapshot():
    assert sorted(json.loads(SNAPSHOTS.read_text())) == sorted(p.name for p in CONFIGS.glob("*.yaml"))


# Keys whose spelling moved to a file with `base:` (the quickstart's per-stage overrides, Tune's
# base_overrides): not compared here; what they expand to is (test_derived_configs_resolve_as_before).
RESPELLED = {
    "quickstart.yaml": {"train_nomask", "train_mask", "train_teacher"},
    "tune_beta_margin.yaml": {"base_config", "base_overrides"},
    "tune_beta_margin_small.yaml": {"base_config", "base_overrides"},
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_resolves_as_before(path):
    moved = RESPELLED.get(path.name, set())
    before = {k: v for k, v in json.loads(SNAPSHOTS.read_text())[path.name].items() if k not in moved}
    assert {k: v for k, v in resolved(path).items() if k not in moved} == before


def test_derived_configs_resolve_as_before():
    """The stage configs the quickstart runs (its files plus per-stage settings, plain and --quick) and the
    training config each shipped search's trials start from."""
    assert derived_configs() == json.loads(DERIVED.read_text())


if __name__ == "__main__":  # regenerate
    snapshots = {p.name: resolved(p) for p in sorted(CONFIGS.glob("*.yaml"))}
    SNAPSHOTS.write_text(json.dumps(snapshots, indent=1, sort_keys=True) + "\n")
    DERIVED.write_text(json.dumps(derived_configs(), indent=1, sort_keys=True) + "\n")
    sys.exit(0)
