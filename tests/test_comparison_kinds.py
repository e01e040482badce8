"""Thresholds per kind of comparison: scores split by kind as worked by hand, the decision takes the kind the
mask classifier sees (the stricter one when unsure, the strictest calibrated one for a kind without
calibration), and the shipped mask-presence classifier tells real LFW faces from the same faces masked
with a type it was not trained on."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from mfr_ray.evaluation.comparison_kinds import (
    MASKED_MASKED,
    MASKED_UNMASKED,
    UNMASKED_UNMASKED,
    KindScores,
    kind_of,
    kind_scores,
)
from mfr_ray.evaluation.verification import PairList
from mfr_ray.serve.package import EmbedResult, ModelPackage, OperatingPoint


def test_scores_by_kind_worked_by_hand(tmp_path):
    # two people; bare features point along x (A) and y (B); the masked copies lean toward z
    keys = ["A/1", "A/2", "B/1"]
    bare = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    masked = np.array([[1, 0, 1], [1, 0, 1], [0, 1, 1]], np.float32) / np.sqrt(2)
    pairs = PairList(left=["A/1", "A/1"], right=["A/2", "B/1"], same=np.array([True, False]), fold=np.array([0, 0]))
    got = kind_scores({"unmasked": bare, "N95": masked}, keys, pairs, "unmasked")
    np.testing.assert_allclose(got.scores[UNMASKED_UNMASKED], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(got.scores[f"{MASKED_UNMASKED}/N95"], [1 / np.sqrt(2), 0.0], atol=1e-6)
    np.testing.assert_allclose(got.scores[f"{MASKED_MASKED}/N95"], [1.0, 0.5], atol=1e-6)  # impostors closer
    got.save(tmp_path / "s.npz")
    loaded = KindScores.load(tmp_path / "s.npz")
    assert loaded.variants(MASKED_MASKED) == ["N95"] and loaded.pooled(MASKED_MASKED)[1].tolist() == [True, False]
    assert kind_of([False, False]) == UNMASKED_UNMASKED and kind_of([True, False]) == MASKED_UNMASKED
    assert kind_of([True, True]) == MASKED_MASKED


def _point(threshold: float, far: float = 1e-3) -> dict:
    return asdict(OperatingPoint(far, threshold, far, 0.9, 0, 1000, 100, True, "test"))


def _package(kinds: dict[str, float]) -> ModelPackage:
    spec = {"calibration": {"operating_points": [_point(kinds[UNMASKED_UNMASKED])],
                            "kinds": {k: {"variants": [], "operating_points": [_point(t)]} for k, t in kinds.items()}}}
    return ModelPackage("unused", spec)


def _face(p: float | None) -> EmbedResult:
    return EmbedResult("ok", "", np.ones(2, np.float32) / np.sqrt(2), "mtcnn", p)


def test_the_decision_takes_the_kind_it_sees_and_the_stricter_when_unsure():
    from mfr_ray.serve.recognise import comparison_kinds, identify_decision, verify_decision

    package = _package({UNMASKED_UNMASKED: 0.40, MASKED_UNMASKED: 0.35, MASKED_MASKED: 0.55})
    assert comparison_kinds(_face(0.1), _face(0.9)) == {MASKED_UNMASKED}
    assert comparison_kinds(_face(0.5), _face(0.9)) == {MASKED_UNMASKED, MASKED_MASKED}
    cases = {(0.1, 0.05): (UNMASKED_UNMASKED, 0.40), (0.9, 0.1): (MASKED_UNMASKED, 0.35),
             (0.9, 0.95): (MASKED_MASKED, 0.55), (0.5, 0.1): (UNMASKED_UNMASKED, 0.40),  # unsure: stricter
             (0.5, 0.9): (MASKED_MASKED, 0.55)}
    for (pa, pb), (kind, threshold) in cases.items():
        result = verify_decision(package, 1e-3, _face(pa), _face(pb))
        assert (result.comparison_kind, result.threshold, result.kind_calibrated) == (kind, threshold, True)
        assert [i.mask_probability for i in result.images] == [pa, pb]
    probe = identify_decision(package, 1e-3, _face(0.95), [])
    assert (probe.comparison_kind, probe.threshold) == (MASKED_UNMASKED, 0.35)


def test_an_uncalibrated_kind_takes_the_strictest_calibrated_threshold():
    from mfr_ray.serve.recognise import verify_decision

    old = ModelPackage("unused", {"calibration": {"operating_points": [_point(0.40)]}})  # bare pairs only
    result = verify_decision(old, 1e-3, _face(0.9), _face(0.95))
    assert result.threshold == 0.40 and not result.kind_calibrated
    partial = _package({UNMASKED_UNMASKED: 0.40, MASKED_UNMASKED: 0.45})
    result = verify_decision(partial, 1e-3, _face(0.9), _face(0.95))
    assert (result.threshold, result.comparison_kind, result.kind_calibrated) == (0.45, MASKED_UNMASKED, False)
    with pytest.raises(ValueError, match="FAR=0.01"):
        verify_decision(partial, 1e-2, _face(0.9), _face(0.95))


@pytest.fixture(scope="module")
def lfw_crops(lfw_dir):
    """Bare and N95-masked (held out of the classifier's training) crops of 24 LFW people, each aligned by
    detection on its own photo, as the service aligns a probe."""
    from mfr_ray.masking.presence_training import CropMaker

    paths = [min(p.glob("*.jpg")) for p in sorted(lfw_dir.iterdir())[200:224]]
    maker = CropMaker(["N95"], seed=3)
    return maker.crops(paths, False), maker.crops(paths, True)


def test_the_shipped_classifier_tells_masked_from_bare_faces(lfw_crops):
    from mfr_ray.masking.presence import MaskPresence

    bare, masked = lfw_crops
    model = MaskPresence.load()
    p_bare, p_masked = model.probability(bare), model.probability(masked)
    assert len(bare) >= 20 and len(masked) >= 18
    assert np.mean(p_bare < 0.5) >= 0.9 and np.mean(p_masked >= 0.5) >= 0.9, (p_bare, p_masked)
    assert np.median(p_masked) > 0.9 and np.median(p_bare) < 0.1
