"""Nearest-template search for identification: exact cosine search (one float32 matmul, top-k by
argpartition) up to `exact_max` templates, a faiss HNSW graph beyond, where a full scan per query costs
more than a door or attendance system can wait. The exact matrix is always kept: it answers small galleries,
rebuilds the graph after removals, and measures the graph's recall@1 (`recall_at_1`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EXACT = "exact"
HNSW = "hnsw"


@dataclass(frozen=True)
class HnswParams:
    """faiss IndexHNSWFlat settings: `m` links per node, `ef_construction` / `ef_search` candidate lists
    (larger: higher recall, slower); `threads` sets faiss's OpenMP threads for the process (None: faiss's
    default, all cores; 1 is faster on a loaded machine, where spinning OpenMP threads fight for cores)."""

    m: int = 32
    ef_construction: int = 100
    ef_search: int = 128
    threads: int | None = None


def normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), so inner product is cosine similarity."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, d), got shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("embeddings contain a zero or non-finite row")
    return emb / norms


class TemplateIndex:
    """Cosine top-k over enrolled templates, each with an id (any hashable; default: the row number). Rows are
    append-only with an alive mask, so the HNSW graph's labels (row numbers) stay valid after a removal;
    removed rows are filtered out of graph searches and compacted away once they are a quarter of the rows."""

    def __init__(self, embeddings: np.ndarray, ids: Sequence | None = None, exact_max: int = 50_000,
                 hnsw: HnswParams = HnswParams(), kind: str | None = None):
        if kind not in (None, EXACT, HNSW):
            raise ValueError(f"kind must be {EXACT!r}, {HNSW!r} or None (by size), got {kind!r}")
        self.exact_max = exact_max
        self.hnsw_params = hnsw
        self._forced = kind
        self._dim: int | None = None
        self._matrix = np.zeros((0, 0), dtype=np.float32)
        self._ids: list = []
        self._alive = np.zeros(0, dtype=bool)
        self._graph = None
        self.add(embeddings, range(len(embeddings)) if ids is None else ids)

    # ---------------------------------------------------------------- state
    def __len__(self) -> int:
        return int(self._alive.sum())

    @property
    def kind(self) -> str:
        return HNSW if self._graph is not None else EXACT

    @property
    def dim(self) -> int | None:
        return self._dim

    def ids(self) -> list:
        return [i for i, alive in zip(self._ids, self._alive, strict=True) if alive]

    def _wants_graph(self) -> bool:
        if self._forced is not None:
            return self._forced == HNSW and len(self) > 0
        return len(self) > self.exact_max

    # ---------------------------------------------------------------- changes
    def add(self, embeddings: np.ndarray, ids: Sequence) -> None:
        ids = list(ids)
        if len(ids) == 0:
            return
        emb = normalise(embeddings)
        if emb.shape[0] != len(ids):
            raise ValueError(f"{emb.shape[0]} embeddings but {len(ids)} ids")
        if self._dim is None:
            self._dim, self._matrix = emb.shape[1], np.zeros((0, emb.shape[1]), dtype=np.float32)
        if emb.shape[1] != self._dim:
            raise ValueError(f"embedding size {emb.shape[1]} != the index's {self._dim}")
        self._matrix = np.concatenate([self._matrix, emb])
        self._ids.extend(ids)
        self._alive = np.concatenate([self._alive, np.ones(len(ids), dtype=bool)])
        if self._graph is not None:
            self._graph.add(emb)
        elif self._wants_graph():
            self._build_graph()

    def remove(self, ids: Sequence) -> int:
        """Remove every template whose id is in `ids`; returns how many were removed."""
        gone = set(ids)
        hit = np.fromiter((i in gone for i in self._ids), dtype=bool, count=len(self._ids)) & self._alive
        self._alive &= ~hit
        dead = int((~self._alive).sum())
        if dead and dead * 4 >= self._matrix.shape[0]:
            self._compact()
        return int(hit.sum())

    def _compact(self) -> None:
        keep = self._alive
        self._matrix = np.ascontiguousarray(self._matrix[keep])
        self._ids = [i for i, alive in zip(self._ids, keep, strict=True) if alive]
        self._alive = np.ones(len(self._ids), dtype=bool)
        self._graph = None
        if self._wants_graph():
            self._build_graph()

    def _build_graph(self) -> None:
        import faiss

        p = self.hnsw_params
        _set_threads(p.threads)
        graph = faiss.IndexHNSWFlat(self._dim, p.m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = p.ef_construction
        graph.add(self._matrix)
        self._graph = graph

    # ---------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, list[list]]:
        """Top-k cosine scores (q, k') float32, best first, and the matching ids, k' = min(k, len(self)).
        `exact=True` scans every template even when the graph is built (recall measurement)."""
        q = normalise(queries)
        if self._dim is not None and q.shape[1] != self._dim:
            raise ValueError(f"query size {q.shape[1]} != the index's {self._dim}")
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((q.shape[0], 0), dtype=np.float32), [[] for _ in range(q.shape[0])]
        if self._graph is not None and not exact:
            rows, scores = self._search_graph(q, k)
        else:
            rows, scores = self._search_exact(q, k)
        return scores, [[self._ids[r] for r in row] for row in rows]

    def _search_exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = q @ self._matrix.T
        if not self._alive.all():
            scores[:, ~self._alive] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)

    def _search_graph(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        _set_threads(self.hnsw_params.threads)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.hnsw_params.ef_search, k)
        if not self._alive.all():
            selector = faiss.IDSelectorBatch(np.flatnonzero(self._alive).astype(np.int64))
            params.sel = selector  # faiss keeps a raw pointer: `selector` must outlive the search call
        scores, rows = self._graph.search(q, k, params=params)
        found = rows >= 0  # fewer than k reachable: pad from the exact scan
        if not found.all():
            return self._search_exact(q, k)
        return rows, scores.astype(np.float32)

    def recall_at_1(self, queries: np.ndarray) -> float:
        """Fraction of queries whose best template from the graph is the exact scan's best (1.0 if exact)."""
        if self._graph is None or len(queries) == 0:
            return 1.0
        _, approx = self.search(queries, 1)
        _, exact = self.search(queries, 1, exact=True)
        return float(np.mean([a[:1] == e[:1] for a, e in zip(approx, exact, strict=True)]))


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import faiss

        faiss.omp_set_num_threads(threads)


def make_index(embeddings: np.ndarray, ids: Sequence | None = None, exact_max: int = 50_000,
               kind: str | None = None, hnsw: HnswParams = HnswParams()) -> TemplateIndex:
    """An index over `embeddings` (n, d) with `ids` (default: row numbers 0..n-1): exact up to `exact_max`
    templates, HNSW beyond (growing past `exact_max` with `add` builds the graph then); `kind` forces one."""
    return TemplateIndex(embeddings, ids, exact_max=exact_max, hnsw=hnsw, kind=kind)
