"""Identification, open-set, clustering and mask-matrix helpers against cases worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mfr_ray.evaluation.analyses.classifiers import knn_predict, per_identity_split
from mfr_ray.evaluation.analyses.clustering import agglomerative_clusters, clustering_scores
from mfr_ray.evaluation.analyses.identification import closed_set_identification
from mfr_ray.evaluation.analyses.mask_matrix import mask_pair_matrix, masking_group_means
from mfr_ray.evaluation.analyses.open_set import open_set_identification


def _unit(deg):
    rad = np.radians(deg)
    return np.array([np.cos(rad), np.sin(rad)])


def test_closed_set_ranks_by_hand():
    # Gallery (first image per identity): A at 0deg, B at 90deg, C at 180deg.
    # Probes: A' at 10deg (rank 1), B' at 30deg (A closer -> rank 2), C' at 260deg (C 80deg away, B 170 -> rank 1).
    x = np.stack([_unit(0), _unit(90), _unit(180), _unit(10), _unit(30), _unit(260)])
    labels = np.array(["A", "B", "C", "A", "B", "C"])
    result = closed_set_identification(x, labels, ranks=(1, 2))
    assert result["rank1"] == pytest.approx(2 / 3) and result["rank2"] == 1.0
    assert result["n_probes"] == 3 and result["n_gallery"] == 3
    # Probes taken from another variant (e.g. masked): B' moved to 85deg becomes rank 1.
    moved = x.copy()
    moved[4] = _unit(85)
    assert closed_set_identification(x, labels, (1,), probe_embeddings=moved)["rank1"] == 1.0


def test_open_set_by_hand():
    # Identities sorted A, B, C, D all have 2 images; with unknown_fraction 0.5 every 2nd (B, D) is unknown.
    # Enrolled: A at 0deg, C at 90deg. Mated probes: A' at 20deg (sim .94 -> A), C' at 60deg (sim .87 -> C).
    # Non-mated: B, B' at 45 and 50deg (top sims .71, .77), D, D' at 180, 200deg (top sims 0, -.34).
    x = np.stack([_unit(0), _unit(45), _unit(90), _unit(180), _unit(20), _unit(50), _unit(60), _unit(200)])
    labels = np.array(["A", "B", "C", "D", "A", "B", "C", "D"])
    out = open_set_identification(x, labels, fpir_targets=(0.25, 0.0), unknown_fraction=0.5)
    assert out["n_mated"] == 2 and out["n_non_mated"] == 4 and out["n_enrolled"] == 2
    # FPIR <= 25% of 4 allows one false alarm: threshold just above the 2nd highest non-mated (cos 45).
    assert out["threshold_at_fpir25pct"] == pytest.approx(np.cos(np.radians(45)))
    assert out["fpir_at_fpir25pct"] == 0.25 and out["fnir_at_fpir25pct"] == 0.0
    # FPIR 0: threshold just above cos 40 (.766): C' at .866 still accepted, A' .94 accepted.
    assert out["fpir_at_fpir0pct"] == 0.0 and out["fnir_at_fpir0pct"] == 0.0


def test_clustering_scores_by_hand():
    # clusters {0,1,2} {3,4}; labels a a b | b b
    scores = clustering_scores(np.array([0, 0, 0, 1, 1]), np.array(["a", "a", "b", "b", "b"]))
    assert scores["purity"] == pytest.approx(4 / 5)
    # same-cluster pairs: 3 + 1 = 4, of which same label: (0,1) and (3,4) = 2 -> precision 1/2.
    # same-label pairs: a 1 + b 3 = 4, of which together: 2 -> recall 1/2.
    assert scores["pairwise_precision"] == 0.5 and scores["pairwise_recall"] == 0.5
    assert scores["pairwise_f1"] == 0.5


def test_agglomerative_cut():
    x = np.stack([_unit(0), _unit(5), _unit(90), _unit(95)])
    clusters = agglomerative_clusters(x, distance_threshold=0.1)
    assert clusters[0] == clusters[1] != clusters[2] == clusters[3]


def test_knn_and_split():
    labels = np.array(["a"] * 4 + ["b"] * 4 + ["c"] * 2)
    train, test = per_identity_split(labels, min_images=4)
    assert train.tolist() == [0, 1, 4, 5] and test.tolist() == [2, 3, 6, 7]
    train_x = np.stack([_unit(0), _unit(10), _unit(90), _unit(100)])
    pred = knn_predict(train_x, np.array(["a", "a", "b", "b"]), np.stack([_unit(40), _unit(60)]), k=1)
    assert pred.tolist() == ["a", "b"]


def test_mask_matrix_and_group_means():
    # Two pairs per fold, 2 folds; the masked variant flips one genuine pair's score below the impostor.
    same = np.array([True, False, True, False])
    fold = np.array([0, 0, 1, 1])
    left = np.stack([_unit(0), _unit(0), _unit(0), _unit(0)])
    right_clean = np.stack([_unit(10), _unit(90), _unit(10), _unit(90)])
    right_masked = np.stack([_unit(100), _unit(90), _unit(10), _unit(90)])
    features = {"unmasked": (left, right_clean), "N95": (left, right_masked)}
    variants, tables = mask_pair_matrix(features, same, fold, far_targets=[0.5])
    assert variants == ["unmasked", "N95"]
    acc = tables["accuracy"]
    assert acc[0, 0] == 1.0 and acc[1, 1] == acc[0, 1] == 0.75  # fold 0 misses its genuine pair
    groups = masking_group_means(variants, np.array([[1.0, 0.8], [0.6, 0.4]]))
    assert groups == {"both_unmasked": 1.0, "one_masked": pytest.approx(0.7), "both_masked": 0.4}
