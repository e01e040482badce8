"""The identification index: exact top-k equals a full sort, the HNSW graph finds the exact best template
for nearly every query, removed templates never come back, and growing past `exact_max` builds the graph."""

from __future__ import annotations

import numpy as np
import pytest

from mfr_ray.serve.index import EXACT, HNSW, HnswParams, make_index, normalise

ONE_THREAD = HnswParams(threads=1)  # the 2-core test machine is shared: OpenMP spinning only slows it


def clustered(n_identities: int, per_identity: int, dim: int = 128, noise: float = 0.6, seed: int = 0):
    """Templates like a gallery's: a few noisy views of each identity's direction, plus probes (new views)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_identities, dim)).astype(np.float32)
    templates = np.repeat(centres, per_identity, axis=0) + noise * rng.normal(
        size=(n_identities * per_identity, dim)
    )
    probes = centres + noise * rng.normal(size=centres.shape)
    return templates.astype(np.float32), probes.astype(np.float32)


def test_exact_top_k_is_the_full_sort_by_cosine():
    templates, probes = clustered(200, 3)
    ids = [f"t{i}" for i in range(len(templates))]
    index = make_index(templates, ids)
    assert index.kind == EXACT
    scores, found = index.search(probes[:20], 5)
    cosine = normalise(probes[:20]) @ normalise(templates).T
    expected = np.argsort(-cosine, axis=1)[:, :5]
    assert found == [[ids[j] for j in row] for row in expected]
    np.testing.assert_allclose(scores, np.take_along_axis(cosine, expected, axis=1), atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_default_ids_are_row_numbers_and_k_is_capped():
    templates, probes = clustered(2, 2)
    scores, found = make_index(templates).search(probes, 10)
    assert scores.shape == (2, 4) and sorted(found[0]) == [0, 1, 2, 3]


def test_hnsw_recall_at_1_against_exact():
    templates, probes = clustered(500, 4, seed=1)
    graph = make_index(templates, kind=HNSW, hnsw=ONE_THREAD)
    assert graph.kind == HNSW
    recall = graph.recall_at_1(probes)
    assert recall >= 0.97, recall
    _, approx = graph.search(probes[:50], 1)
    assert all(a[0] // 4 == i for i, a in enumerate(approx[:50]) if a)  # the right identity's template


@pytest.mark.parametrize("kind", [EXACT, HNSW])
def test_removed_templates_never_come_back_and_add_is_searchable(kind):
    templates, probes = clustered(300, 2, seed=2)
    ids = [f"id{i // 2}/{i % 2}" for i in range(len(templates))]
    index = make_index(templates, ids, kind=kind, hnsw=ONE_THREAD)
    gone = [i for i in ids if i.startswith(("id7/", "id9/"))]
    assert index.remove(gone) == 4 and len(index) == len(ids) - 4
    _, found = index.search(probes[[7, 9]], 10)
    assert not set(gone) & {i for row in found for i in row}
    index.add(probes[[7]], ["id7/new"])
    _, found = index.search(probes[[7]], 1)
    assert found == [["id7/new"]]


def test_many_removals_compact_and_keep_the_graph():
    templates, probes = clustered(400, 2, seed=3)
    index = make_index(templates, list(range(len(templates))), kind=HNSW, hnsw=ONE_THREAD)
    index.remove(list(range(400)))  # half the rows: compaction rebuilds the graph without them
    assert len(index) == 400 and index.kind == HNSW
    _, found = index.search(probes[250:260], 1)
    assert [row[0] // 2 for row in found] == list(range(250, 260))


def test_growing_past_exact_max_builds_the_graph():
    templates, probes = clustered(100, 2, seed=4)
    index = make_index(templates[:150], list(range(150)), exact_max=160, hnsw=ONE_THREAD)
    assert index.kind == EXACT
    index.add(templates[150:], list(range(150, 200)))
    assert index.kind == HNSW and len(index) == 200
    assert index.recall_at_1(probes) >= 0.95


def test_bad_inputs_are_refused():
    templates, _ = clustered(3, 1)
    with pytest.raises(ValueError, match="zero"):
        make_index(np.zeros((2, 8), np.float32))
    index = make_index(templates)
    with pytest.raises(ValueError, match="query size"):
        index.search(np.ones((1, 7), np.float32), 1)
    with pytest.raises(ValueError, match="ids"):
        index.add(templates, ["only-one"])
