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


def resolved(path: Path) -> dict:
    text = json.dumps(dump_config(load_config(path)), sort_keys=True)
    return json.loads(text.replace(str(shared_dir()), "${shared}"))


def test_every_shipped_config_has_a_snapshot():
    assert sorted(json.loads(SNAPSHOTS.read_text())) == sorted(p.name for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_resolves_as_before(path):
    assert resolved(path) == json.loads(SNAPSHOTS.read_text())[path.name]


if __name__ == "__main__":  # regenerate
    snapshots = {p.name: resolved(p) for p in sorted(CONFIGS.glob("*.yaml"))}
    SNAPSHOTS.write_text(json.dumps(snapshots, indent=1, sort_keys=True) + "\n")
    sys.exit(0)
