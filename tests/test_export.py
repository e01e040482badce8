"""`mfr export` on the shared CASIA checkpoint, calibrated on a real evaluation of 20 LFW pairs (MTCNN
alignment, flip + sum feature) logged to a real MLflow store: the package's thresholds are the
evaluation's, its scores on the same LFW images are the evaluation's within 1e-4, verify's decisions follow
the exported threshold, a FAR the set cannot resolve is flagged, and the package loads without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from mfr_ray.evaluation.verification import far_threshold
from mfr_ray.serve.export import export_package
from mfr_ray.serve.package import MODEL_CARD, PACKAGE_JSON, PackageError, load_package
from mfr_ray.serve.recognise import DIFFERENT, NO_DECISION, SAME, verify
from tests.serve_inputs import FARS


def test_thresholds_are_the_evaluations_and_an_unresolvable_far_is_flagged(calibrated):
    points = {p.far_target: p for p in calibrated["export"].operating_points}
    scores, same = calibrated["scores"], calibrated["pairs"].same
    assert int((~same).sum()) == 10
    for far in FARS:
        point = points[far]
        assert point.threshold == pytest.approx(far_threshold(scores[~same], far), abs=1e-6)
        accepted = scores >= point.threshold
        assert point.false_accepts == int((accepted & ~same).sum()) <= far * 10 + 1e-9
        assert point.tpr == pytest.approx((accepted & same).sum() / same.sum())
        assert point.n_impostor == 10 and "evaluation run" in point.calibration_set
    assert points[0.1].resolvable and not points[1e-3].resolvable
    assert points[1e-3].threshold > scores[~same].max()  # "no impostor accepted" is all it can say

    package = load_package(calibrated["package"])
    assert package.threshold(0.1) == points[0.1].threshold
    with pytest.raises(PackageError, match="FAR=0.05.*0.1, 0.001"):
        package.threshold(0.05)
    card = (Path(calibrated["package"]) / MODEL_CARD).read_text()
    assert "| 0.001 |" in card and "**no**" in card and calibrated["summary"]["run_id"] in card


def test_package_records_the_evaluations_preprocessing_and_loads_without_pickle(calibrated):
    folder = Path(calibrated["package"])
    spec = json.loads((folder / PACKAGE_JSON).read_text())
    pre = spec["preprocessing"]
    assert pre["flip"] is True and pre["feature"] == "sum" and pre["crop"] == "112x96"
    assert pre["align"] == calibrated["cfg"].sources["unmasked"].align.model_dump(mode="json")
    assert pre["normalisation"]["pixel_mean"] == 127.5 and pre["normalisation"]["pixel_scale"] == 128.0
    assert spec["backbone"] == "mobilefacenet" and spec["embedding_size"] == 128
    state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # the weights are the evaluated checkpoint's
    evaluated = calibrated["cfg"].model.load().state_dict()
    assert all(torch.equal(state[k], evaluated[k]) for k in evaluated)
    # a package whose weights hide a pickled object is refused, not run
    torch.save({"w": torch.zeros(1), "payload": PackageError("x")}, folder.parent / "evil.pt")
    with pytest.raises(ValueError, match="not a plain state dict"):
        from mfr_ray.models.weights import read_weights

        read_weights(str(folder.parent / "evil.pt"))


def test_package_is_logged_and_registered_in_mlflow(calibrated):
    client = mlflow.MlflowClient(calibrated["tracking"].tracking_uri)
    run = client.get_run(calibrated["export"].run_id)
    assert run.data.tags["mfr.stage"] == "export"
    assert run.data.tags["mfr.eval_run"] == calibrated["summary"]["run_id"]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "package")}
    assert {"package/package.json", "package/MODEL_CARD.md", "package/weights.pt"} <= names
    version = calibrated["export"].model_version
    package = load_package(f"models:/lfw-serve-package/{version}",
                           tracking_uri=calibrated["tracking"].tracking_uri)
    assert package.package_id == load_package(calibrated["package"]).package_id


def test_a_service_pins_its_package_and_replicas_refuse_another(calibrated):
    """`models:/NAME@ALIAS` is resolved once to the version it names at start; a replica that finds another
    package behind the URI (an alias moved, an S3 package overwritten) refuses to start."""
    from mfr_ray.serve.package import pin_package_uri

    tracking_uri = calibrated["tracking"].tracking_uri
    client = mlflow.MlflowClient(tracking_uri)
    version = calibrated["export"].model_version
    client.set_registered_model_alias("lfw-serve-package", "prod", version)
    pinned = pin_package_uri("models:/lfw-serve-package@prod", tracking_uri)
    assert pinned == f"models:/lfw-serve-package/{version}"
    assert pin_package_uri(calibrated["package"]) == calibrated["package"]
    expected = load_package(calibrated["package"]).package_id
    assert load_package(pinned, tracking_uri=tracking_uri, expect_id=expected).package_id == expected
    with pytest.raises(PackageError, match="redeploy"):
        load_package(calibrated["package"], expect_id="0" * 16)
    import shutil

    tampered = Path(calibrated["package"]).parent / "tampered"
    shutil.copytree(calibrated["package"], tampered)
    state = torch.load(tampered / "weights.pt", weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1e-3  # other weights under the same package.json
    torch.save(state, tampered / "weights.pt")
    with pytest.raises(PackageError, match="redeploy"):
        load_package(tampered, expect_id=expected)
    with pytest.raises(PackageError, match="cannot resolve the alias"):
        pin_package_uri("models:/lfw-serve-package@nowhere", tracking_uri)


def test_verify_on_lfw_pairs_matches_the_evaluation(calibrated):
    """The same LFW pairs through the package: scores within 1e-4 of the evaluation's, and each decision is
    the one the exported threshold predicts from the evaluation's score."""
    package = load_package(calibrated["package"])
    pairs, scores = calibrated["pairs"], calibrated["scores"]
    root = Path(calibrated["cfg"].sources["unmasked"].uri)
    threshold = package.threshold(0.1)
    decisions = []
    for left, right, expected in zip(pairs.left, pairs.right, scores, strict=True):
        result = verify(package, (root / left).read_bytes(), (root / right).read_bytes(), far=0.1)
        assert result.decision != NO_DECISION, result.reason
        assert result.score == pytest.approx(expected, abs=1e-4)
        assert result.threshold == threshold and result.far_resolvable
        assert result.decision == (SAME if expected >= threshold else DIFFERENT)
        assert [i.align_method for i in result.images] == ["mtcnn", "mtcnn"]
        decisions.append(result.decision)
    assert {SAME, DIFFERENT} <= set(decisions)
    assert np.mean([d == SAME for d in decisions]) < 1.0


def test_export_refuses_an_evaluation_of_other_weights(calibrated, tmp_path):
    other = calibrated["cfg"].model.load()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    checkpoint = tmp_path / "other.pt"
    torch.save(other.state_dict(), checkpoint)
    with pytest.raises(PackageError, match="would not hold for these weights"):
        export_package(str(checkpoint), tmp_path / "pkg", eval_run=calibrated["summary"]["run_id"],
                       tracking=calibrated["tracking"])


def test_masked_comparisons_get_thresholds_of_their_own(calibrated):
    """The evaluation's masked variant (masked on the photo, aligned by detection) calibrates the
    masked-unmasked and masked-masked thresholds: each is the FAR quantile of that kind's impostor scores,
    and the model card lists them with their set."""
    from mfr_ray.evaluation.comparison_kinds import KINDS, MASKED_MASKED, KindScores

    package = load_package(calibrated["package"])
    scores = KindScores.load(calibrated["kind_scores"])
    assert set(calibrated["export"].kinds) == set(KINDS)
    for kind in KINDS:
        pooled, same = scores.pooled(kind)
        point = package.operating_point(0.1, kind)
        assert point.threshold == pytest.approx(far_threshold(pooled[~same], 0.1), abs=1e-6), kind
        assert point.n_impostor == int((~same).sum()) and kind.split("-")[0] in point.calibration_set
    np.testing.assert_allclose(scores.pooled("unmasked-unmasked")[0], calibrated["scores"], atol=1e-5)
    assert "| masked-masked | 0.1 |" in (Path(calibrated["package"]) / MODEL_CARD).read_text()
    assert package.operating_point(0.1, MASKED_MASKED).calibration_set.startswith("masked-masked pairs of N95")


def test_export_reads_the_config_the_evaluation_logged(calibrated, tmp_path):
    """The evaluation logs its resolved config (`evaluate_config.json`); export rebuilds the config from it
    (params are the fallback of older runs), and a file that no longer loads is refused naming it."""
    from mfr_ray.evaluation.runner import CONFIG_FILE
    from mfr_ray.serve.calibration import _evaluation_config

    run_id = calibrated["summary"]["run_id"]
    mlflow.set_tracking_uri(calibrated["tracking"].tracking_uri)
    logged = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CONFIG_FILE, dst_path=str(tmp_path)))
    rebuilt = _evaluation_config(logged, {})  # no params at all: the file alone rebuilds it
    ignored = {"storage", "tracking", "ray"}
    assert rebuilt.model_dump(exclude=ignored) == calibrated["cfg"].model_dump(exclude=ignored)
    bad = tmp_path / "bad" / CONFIG_FILE
    bad.parent.mkdir()
    bad.write_text(json.dumps(json.loads(logged.read_text()) | {"not_a_key": 1}))
    with pytest.raises(PackageError, match=CONFIG_FILE):
        _evaluation_config(bad, {})
