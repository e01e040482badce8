"""The README's main command in its `--quick` form, run as a user runs it (its own process, local Ray,
local folders, SQLite MLflow): every stage for real on a few CelebA-299 identities and two LFW folds, then
the comparison table, the headline figures and the quickstart's MLflow run."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mfr_ray.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow

MODELS = ["CASIA checkpoint (untouched)", "no-mask network", "mask network", "frozen-teacher network"]
VARIANTS = ["unmasked", "surgical_green", "surgical_blue", "N95", "cloth", "mixed"]


def test_quick_quickstart_runs_every_stage(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable, "jobs/quickstart.py", "--config", "configs/quickstart.yaml", "--quick",
        f"output_root={tmp_path / 'out'}", f"tracking.tracking_uri={tracking_uri}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1500,
                         check=False, start_new_session=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "headline: tpr_at_far0.1pct_gain_mixed=" in run.stdout

    root = tmp_path / "out" / "quick"
    table = (root / "comparison.md").read_text()
    for model in MODELS:
        assert f"| {model} |" in table

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("mfr-ray-quickstart")
    (summary_run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'quickstart'")
    run_id = summary_run.info.run_id
    artifact = Path(client.download_artifacts(run_id, "comparison.csv", str(tmp_path)))
    rows = list(csv.DictReader(io.StringIO(artifact.read_text())))
    assert {(r["model"], r["variant"]) for r in rows} == {(m, v) for m in MODELS for v in VARIANTS}
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and 0.0 <= float(row["tpr_at_far0.1pct"]) <= 1.0
    cell = {(r["model"], r["variant"]): r for r in rows}

    def points(model: str, reference: str, variant: str, metric: str) -> float:
        return 100 * (float(cell[model, variant][metric]) - float(cell[reference, variant][metric]))

    headline = summary_run.data.metrics
    for model, reference, suffix in [
        ("mask network", "no-mask network", ""),
        ("mask network", "CASIA checkpoint (untouched)", "_vs_checkpoint"),
        ("frozen-teacher network", "CASIA checkpoint (untouched)", "_frozen_teacher_vs_checkpoint"),
    ]:
        gain = points(model, reference, "mixed", "tpr_at_far0.1pct")
        assert headline[f"tpr_at_far0.1pct_gain_mixed{suffix}"] == pytest.approx(gain, abs=1e-6)
        change = points(model, reference, "unmasked", "accuracy")
        assert headline[f"unmasked_accuracy_change{suffix}"] == pytest.approx(change, abs=1e-6)
        assert f"tpr_at_far0.1pct_gain_mixed{suffix}={gain:+.2f} points" in run.stdout

    # the served network is packaged with thresholds per kind of comparison, and the commands are printed
    package = json.loads((root / "package" / "package.json").read_text())
    assert set(package["calibration"]["kinds"]) == {"unmasked-unmasked", "masked-unmasked", "masked-masked"}
    assert f"mfr serve {root / 'package'} --gallery" in run.stdout and "served network: " in run.stdout

    timings = json.loads(Path(client.download_artifacts(run_id, "timings.json", str(tmp_path))).read_text())
    assert {"prepare_train", "prepare_eval", "train_nomask", "train_mask", "train_teacher", "package"} <= set(timings)
    assert sum(k.startswith("evaluate ") for k in timings) == len(MODELS)

    # The stages logged into the same experiment: the two datasets, the three trainings (with their
    # per-epoch validation) and the four evaluations; the frozen-teacher run is the frozen-teacher config.
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"prepare-celeba299-112x96", "prepare-lfw-sm-seed000"} <= set(runs)
    assert {"quickstart-eval-casia", "quickstart-eval-no-mask", "quickstart-eval-mask",
            "quickstart-eval-frozen-teacher"} <= set(runs)
    for stage in ("train_nomask", "train_mask", "train_teacher"):
        assert client.get_metric_history(runs[f"quickstart-{stage}"].info.run_id, "val_tpr_at_far")
    assert runs["quickstart-train_teacher"].data.params["loss.teacher"] == "frozen"
