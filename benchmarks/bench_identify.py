"""Identification search latency for galleries of 1k, 10k and 100k templates, exact vs HNSW, with recall@1.

    python benchmarks/bench_identify.py [--sizes 1000 10000 100000] [--queries 200] [--dim 128] [--threads 1]

Synthetic templates shaped like a gallery's (4 noisy views of each identity's direction, L2-normalised;
probes are new views of enrolled identities), searched one probe at a time as `/identify` does. Prints the
build time, p50/p99 latency per query (k=5) for the exact scan and the HNSW graph, and the graph's recall@1
against the exact scan. The service switches to the graph above `exact_max` (50,000 by default).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PER_IDENTITY = 4


def gallery(size: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_ids = max(1, size // PER_IDENTITY)
    centres = rng.normal(size=(n_ids, dim)).astype(np.float32)
    templates = np.repeat(centres, PER_IDENTITY, axis=0)[:size] + 0.6 * rng.normal(size=(size, dim)).astype(
        np.float32
    )
    picks = rng.integers(0, n_ids, queries)
    probes = centres[picks] + 0.6 * rng.normal(size=(queries, dim)).astype(np.float32)
    return templates, probes


def latencies(index, probes: np.ndarray, k: int, exact: bool) -> np.ndarray:
    out = []
    for q in probes:
        start = time.perf_counter()
        index.search(q[None], k, exact=exact)
        out.append(time.perf_counter() - start)
    return np.array(out) * 1000


def main() -> None:
    from mfr_ray.serve.index import EXACT, HNSW, HnswParams, make_index

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: faiss's)")
    parser.add_argument("--ef-search", type=int, default=HnswParams.ef_search)
    args = parser.parse_args()

    params = HnswParams(threads=args.threads, ef_search=args.ef_search)
    rows = []
    for size in tqdm(args.sizes, desc="galleries", unit="gallery"):
        templates, probes = gallery(size, args.dim, args.queries)
        exact = make_index(templates, kind=EXACT)
        start = time.perf_counter()
        graph = make_index(templates, kind=HNSW, hnsw=params)
        graph_build = time.perf_counter() - start
        exact_ms = latencies(exact, probes, args.k, exact=True)
        graph_ms = latencies(graph, probes, args.k, exact=False)
        recall = graph.recall_at_1(probes)
        rows.append((size, graph_build, exact_ms, graph_ms, recall))

    print(
        f"\n{args.queries} queries one at a time, k={args.k}, dim={args.dim}, ef_search={args.ef_search}, "
        f"faiss threads={args.threads or 'default'}; latency in ms"
    )
    print(
        f"{'templates':>10} {'exact p50':>10} {'exact p99':>10} {'hnsw p50':>9} {'hnsw p99':>9} "
        f"{'recall@1':>9} {'hnsw build s':>13}"
    )
    for size, graph_build, exact_ms, graph_ms, recall in rows:
        print(
            f"{size:>10,} {np.percentile(exact_ms, 50):>10.3f} {np.percentile(exact_ms, 99):>10.3f} "
            f"{np.percentile(graph_ms, 50):>9.3f} {np.percentile(graph_ms, 99):>9.3f} {recall:>9.3f} "
            f"{graph_build:>13.1f}"
        )


if __name__ == "__main__":
    main()
