"""Verification metrics against cases worked by hand, and the real LFW pairs file."""

from __future__ import annotations

import numpy as np
import pytest

from mfr_ray.evaluation.metric_names import (
    check_metric_name,
    metric_key,
    parse_verification_key,
    verification_metrics,
)
from mfr_ray.evaluation.verification import (
    MeanStd,
    auc,
    best_accuracy_threshold,
    equal_error_rate,
    far_threshold,
    kfold_verification,
    mean_subtracted_scores,
    parse_pairs,
    rates,
    read_pairs,
    roc_curve,
)

# Genuine 0.9 0.8 0.7 0.4, impostor 0.6 0.5 0.3 0.2 0.1 (sorted: G G G I I G I I I).
GENUINE = [0.9, 0.8, 0.7, 0.4]
IMPOSTOR = [0.6, 0.5, 0.3, 0.2, 0.1]
SCORES = np.array(GENUINE + IMPOSTOR)
SAME = np.array([True] * 4 + [False] * 5)


def test_best_accuracy_threshold_by_hand():
    # Accepting the top 3 gets 3 genuine + 5 rejected impostors right = 8/9; the threshold sits
    # midway between 0.7 (last accepted) and 0.6 (first rejected).
    threshold, accuracy = best_accuracy_threshold(SCORES, SAME)
    assert threshold == pytest.approx(0.65)
    assert accuracy == pytest.approx(8 / 9)


def test_far_threshold_and_rates_by_hand():
    # 5 impostors, FAR <= 20% allows one false accept: threshold just above the 2nd impostor (0.5),
    # so 0.6 is accepted: TPR 3/4, FAR 1/5, accuracy (3 + 4)/9.
    t = far_threshold(SCORES[~SAME], 0.2)
    assert 0.5 < t < 0.5 + 1e-12
    r = rates(SCORES, SAME, t)
    assert (r["tpr"], r["far"], r["accuracy"], r["false_accepts"]) == (0.75, 0.2, pytest.approx(7 / 9), 1)
    # FAR <= 10% of 5 impostors allows none: threshold just above 0.6.
    r = rates(SCORES, SAME, far_threshold(SCORES[~SAME], 0.1))
    assert (r["tpr"], r["far"], r["accuracy"]) == (0.75, 0.0, pytest.approx(8 / 9))


def test_far_threshold_never_splits_tied_impostors():
    # Two impostors tied at 0.5 with one false accept allowed: accepting either accepts both, so none is.
    t = far_threshold(np.array([0.5, 0.5]), 0.5)
    assert rates(np.array([0.5, 0.5]), np.array([False, False]), t)["far"] == 0.0


def test_kfold_thresholds_come_from_the_other_folds():
    # fold 0: genuine 0.9 0.65, impostor 0.5 0.2;  fold 1: genuine 0.8 0.3, impostor 0.4 0.35.
    scores = np.array([0.9, 0.65, 0.5, 0.2, 0.8, 0.3, 0.4, 0.35])
    same = np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
    fold = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    result = kfold_verification(scores, same, fold, far_targets=[0.5])
    f0, f1 = result.folds
    # Fold 1 alone is best cut after 0.8 -> threshold 0.6; on fold 0 that accepts 0.9 and 0.65 only: 4/4.
    assert f0.best_threshold == pytest.approx(0.6) and f0.accuracy == 1.0
    # Fold 0 alone is best cut after 0.65 -> 0.575; on fold 1: 0.8 yes, 0.3 no, both impostors no: 3/4.
    assert f1.best_threshold == pytest.approx(0.575) and f1.accuracy == 0.75
    summary = result.summary()
    assert summary["accuracy_mean"] == pytest.approx(0.875) and summary["accuracy_std"] == pytest.approx(0.125)
    # FAR 50% on fold 1's impostors (0.4, 0.35) allows one: threshold just above 0.35 -> on fold 0
    # accepts 0.9, 0.65, 0.5: TPR 1, FAR 1/2.
    assert f0.at_far[0.5]["tpr"] == 1.0 and f0.at_far[0.5]["far"] == 0.5
    table = result.fold_table()
    assert [row["fold"] for row in table] == [0, 1] and "tpr_at_far50pct" in table[0]


def test_summary_is_typed_and_keeps_the_flat_metric_names():
    # The folds of the test above at FAR 50%: fold 0 accepts 0.9, 0.65, 0.5 (TPR 1, FAR 1/2, accuracy 3/4);
    # fold 1's threshold sits just above fold 0's impostor 0.2, so it accepts all four (TPR 1, FAR 1, 2/4).
    scores = np.array([0.9, 0.65, 0.5, 0.2, 0.8, 0.3, 0.4, 0.35])
    same = np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
    fold = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    summary = kfold_verification(scores, same, fold, far_targets=[0.5]).summary()
    point = summary.at_far[0.5]
    assert summary.accuracy == MeanStd(0.875, 0.125) and point.tpr == MeanStd(1.0, 0.0)
    assert point.far == MeanStd(0.75, 0.25) and point.accuracy == MeanStd(0.625, 0.125)
    assert list(summary.as_dict()) == [
        "accuracy_mean", "accuracy_std", "tpr_at_far50pct_mean", "tpr_at_far50pct_std",
        "accuracy_at_far50pct_mean", "accuracy_at_far50pct_std",
        "far_at_far50pct_mean", "far_at_far50pct_std",
    ]
    assert summary[metric_key("far", 0.5)] == summary.value("far", 0.5) == 0.75
    assert summary.value("accuracy", stat="std") == summary["accuracy_std"] == 0.125


def test_metric_names_round_trip_and_typos_fail():
    assert metric_key("tpr", 1e-3) == "tpr_at_far0.1pct_mean"
    assert metric_key("accuracy", stat="std") == "accuracy_std"
    assert metric_key("false_accepts", 0.01, stat=None) == "false_accepts_at_far1pct"
    assert parse_verification_key("tpr_at_far0.1pct") == ("tpr", pytest.approx(1e-3), None)
    assert parse_verification_key("far_at_far1pct_std") == ("far", pytest.approx(0.01), "std")
    known = ["accuracy", "tpr_at_far0.1pct", "accuracy_at_far0.1pct", "far_at_far0.1pct"]
    assert verification_metrics([1e-3]) == known
    for typo in ("tpr_at_far0.10pct", "tpr_at_far0.1", "tpr@far0.1pct", "tpr_at_far0.1pct_median", "val_tpr"):
        with pytest.raises(ValueError, match="unknown verification metric"):
            check_metric_name(typo, "verification")
    with pytest.raises(ValueError, match="without _mean/_std"):
        check_metric_name("tpr_at_far0.1pct_mean", "verification")
    assert check_metric_name("val_tpr_at_far") == "val_tpr_at_far" and check_metric_name("loss_total")
    for typo in ("val_tpr", "tpr_at_far0.1pct", "loss_"):
        with pytest.raises(ValueError, match="unknown training metric"):
            check_metric_name(typo)


def test_roc_auc_and_eer_by_hand():
    far, tpr, thresholds = roc_curve(SCORES, SAME)
    assert far[0] == 0 and tpr[0] == 0 and far[-1] == 1 and tpr[-1] == 1
    # 18 of the 20 (genuine, impostor) pairs are ordered correctly.
    assert auc(far, tpr) == pytest.approx(18 / 20)
    # FRR stays 0.25 while FAR goes 0.2 -> 0.4; they meet at 0.25.
    assert equal_error_rate(far, tpr) == pytest.approx(0.25)
    assert np.all(np.diff(thresholds[1:]) < 0)


def test_mean_subtracted_scores_use_training_fold_mean():
    left = np.array([[1.0, 1.0], [3.0, 1.0]])
    right = np.array([[1.0, 3.0], [3.0, 3.0]])
    scores = mean_subtracted_scores(left, right, np.array([0, 1]))
    # test fold 0: mean of fold 1 = (3, 2): (-2,-1).(-2,1)/5 = 0.6; test fold 1: mean (1, 2): same 0.6.
    assert scores[0, 0] == pytest.approx(0.6) and scores[1, 1] == pytest.approx(0.6)


def test_lfw_pairs_file(shared):
    pairs = read_pairs(shared / "datasets" / "lfw" / "pairs.txt")
    assert len(pairs) == 6000 and pairs.n_folds == 10 and pairs.has_official_folds
    assert np.bincount(pairs.fold).tolist() == [600] * 10
    assert [int(pairs.same[pairs.fold == f].sum()) for f in range(10)] == [300] * 10
    assert pairs.left[0].count("/") == 1 and pairs.left[0].endswith(".jpg")
    assert len(pairs.keys()) == 7701
    assert all((shared / "datasets" / "lfw" / "lfw-deepfunneled" / k).is_file() for k in pairs.keys()[:50])


def test_headerless_pairs_get_balanced_deterministic_folds():
    same_lines = [f"Person{i} 1 2" for i in range(20)]
    diff_lines = [f"Person{i} 1 Other{i} 1" for i in range(20)]
    pairs = parse_pairs("\n".join(same_lines + diff_lines), key_format="{name}/{name}_{index:04d}.png")
    assert not pairs.has_official_folds and pairs.n_folds == 10
    assert [int(pairs.same[pairs.fold == f].sum()) for f in range(10)] == [2] * 10
    assert [int((~pairs.same[pairs.fold == f]).sum()) for f in range(10)] == [2] * 10
    assert pairs.left[20] == "Person0/Person0_0001.png" and pairs.right[20] == "Other0/Other0_0001.png"


def test_protocol_runs_on_lfw_sized_score_sets():
    rng = np.random.default_rng(0)
    same = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], 10)
    scores = np.where(same, rng.normal(0.6, 0.1, same.size), rng.normal(0.1, 0.1, same.size))
    result = kfold_verification(scores, same, np.repeat(np.arange(10), 600), far_targets=[1e-3, 1e-2])
    assert len(result.folds) == 10 and 0.9 < result.summary()["accuracy_mean"] <= 1.0
