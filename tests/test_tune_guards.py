"""Tune's guards without a search: secrets kept out of the parent run's params and the best train YAML,
the resume check that names changed keys, and the placement-group releaser that only touches its own
job's groups on a shared cluster (a real second driver on the session's local Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from mfr_ray.config import load_config
from mfr_ray.paths import PROJECT_ROOT
from mfr_ray.train import TrainConfig
from mfr_ray.tune import TuneConfig
from mfr_ray.tune.search import (
    base_train_dict,
    changed_search_keys,
    search_params,
    shareable_train_yaml,
    trial_placement_group_releaser,
    trial_train_config,
)

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYtuneTEST"


def tune_config(tmp_path, **extra) -> TuneConfig:
    data = {
        "name": "guard",
        "base_config": str(PROJECT_ROOT / "configs" / "train_mobilefacenet_distill.yaml"),
        "base_overrides": [
            "data.uri=/data/prepared",
            "tracking.tracking_uri=https://mlflow-user:UriPassw0rd@mlflow.example:5000",
            f"storage={{session_token: {SECRET}-session, region: eu-west-1}}",
            "storage.access_key_id=AKIAGUARDTEST",
            f"storage.secret_access_key={SECRET}",
        ],
        "search_space": {"loss.beta": {"type": "loguniform", "low": 0.1, "high": 10.0}},
        "storage_path": str(tmp_path / "tune"),
        "best_config_out": str(tmp_path / "best.yaml"),
        **extra,
    }
    return TuneConfig.model_validate(data)


def test_search_params_hold_no_secret(tmp_path):
    """`storage.secret_access_key=...` in base_overrides becomes `***` (also a secret nested in a mapping
    override); the other overrides stay readable."""
    cfg = tune_config(tmp_path)
    base = base_train_dict(cfg)
    params = search_params(cfg, trial_train_config(base, {}))
    assert all(SECRET not in value for value in params.values()), params["base_overrides"]
    assert "UriPassw0rd" not in params["base_overrides"] and "mlflow.example" in params["base_overrides"]
    assert "storage.secret_access_key=***" in params["base_overrides"]
    assert "storage={region: eu-west-1, session_token: '***'}" in params["base_overrides"]
    assert "data.uri=/data/prepared" in params["base_overrides"]
    assert len(params["base_config.sha256"]) == 16
    # A secret override that a later mapping override replaces never reaches the config, still hidden.
    clobbered = tune_config(tmp_path, base_overrides=[f"storage.secret_access_key={SECRET}", "storage={}"])
    params = search_params(clobbered, trial_train_config(base_train_dict(clobbered), {}))
    assert SECRET not in params["base_overrides"]


def test_best_train_yaml_leaves_secrets_out_and_still_loads(tmp_path):
    cfg = tune_config(tmp_path)
    base = base_train_dict(cfg)
    assert base["storage"]["secret_access_key"] == SECRET  # the trials do get it
    text = shareable_train_yaml(base, cfg)
    assert SECRET not in text and "AKIAGUARDTEST" not in text and "UriPassw0rd" not in text
    assert "Secrets left out: storage.access_key_id, storage.secret_access_key, storage.session_token" in text
    assert "AWS_SECRET_ACCESS_KEY" in text
    path = tmp_path / "best.yaml"
    path.write_text(text)
    loaded = load_config(path, expected=TrainConfig)
    assert loaded.storage.secret_access_key is None and loaded.data.uri == "/data/prepared"
    assert yaml.safe_load(text)["kind"] == "train"


def test_metric_and_base_config_are_checked_when_the_search_loads(tmp_path):
    """A Tune objective training never reports fails at config load, naming what it does report; a base
    config whose keys do not fit fails by key and file before any trial starts."""
    from pydantic import ValidationError

    from mfr_ray.config import ConfigError

    with pytest.raises(ValidationError, match="unknown training metric 'val_tpr_at_far0.1pct'"):
        tune_config(tmp_path, metric="val_tpr_at_far0.1pct")
    assert tune_config(tmp_path, metric="val_accuracy", mode="max").metric == "val_accuracy"
    bad = tune_config(tmp_path, base_overrides=["data.uri=/data", "loss.betta=2"])
    with pytest.raises(ConfigError, match=r"train_mobilefacenet_distill.yaml:\n  loss\.betta: unknown key"):
        base_train_dict(bad)


def test_changed_search_keys_name_each_change(tmp_path):
    cfg = tune_config(tmp_path)
    base_cfg = trial_train_config(base_train_dict(cfg), {})
    started = search_params(cfg, base_cfg) | {"best.loss.beta": "0.5"}
    changed_space = tune_config(
        tmp_path, search_space={"loss.beta": {"type": "loguniform", "low": 0.1, "high": 30.0}}, num_samples=9
    )
    changes = changed_search_keys(started, search_params(changed_space, base_cfg))
    assert changes == ["num_samples: 8 -> 9", "search_space.loss.beta.high: 10.0 -> 30.0"]
    elsewhere = tune_config(tmp_path, ray={"num_cpus": 1})  # where it runs may change
    assert changed_search_keys(started, search_params(elsewhere, base_cfg)) == []
    other_base = trial_train_config(base_train_dict(cfg), {"schedule.epochs": 3})
    assert changed_search_keys(started, search_params(cfg, other_base)) == [
        f"base_config.sha256: {started['base_config.sha256']} -> {search_params(cfg, other_base)['base_config.sha256']}"
    ]


OTHER_JOB = """
import sys, time, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], log_to_driver=False)
sys.stdin.readline()  # created once the search has begun, like a trial's own group
pg = placement_group([{"CPU": 0.01}] * 2)
ray.get(pg.ready())
print(pg.id.hex(), flush=True)
time.sleep(300)
"""


def test_placement_group_releaser_leaves_other_jobs_groups(ray_local):
    """Another driver on the same cluster holds a placement group of exactly the trial workers' shape;
    the releaser removes this job's leftover group and leaves the other job's alone."""
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    bundle = {"CPU": 0.01}
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # join the loopback-only node as init_ray starts it
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_JOB, address], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=env,
    )
    try:
        releaser = trial_placement_group_releaser(2, bundle)  # the search begins
        other.stdin.write("go\n")
        other.stdin.flush()
        other_pg = other.stdout.readline().strip()
        assert other_pg, "the other job did not create its placement group"
        ours = placement_group([bundle] * 2)  # a trial's worker group left behind
        ray_local.get(ours.ready())
        releaser.on_trial_complete(0, [], None)
        deadline = time.monotonic() + 30
        while placement_group_table(ours)["state"] != "REMOVED" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert placement_group_table(ours)["state"] == "REMOVED"
        assert placement_group_table()[other_pg]["state"] == "CREATED"
    finally:
        other.kill()
        other.wait()
    if placement_group_table(ours)["state"] != "REMOVED":
        remove_placement_group(ours)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
