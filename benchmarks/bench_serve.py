"""`/verify` throughput and latency of the Ray Serve application at 1, 2 and 4 concurrent clients, with and
without request batching, on loopback.

    python benchmarks/bench_serve.py [--package PKG] [--requests 32] [--clients 1 2 4] [--replicas 1]
        [--max-batch-size 8] [--wait-ms 10]

Starts a local Ray through `init_ray` (loopback only), the application with the Embedder batching off, then
on, and sends a bounded number of `/verify` requests (two LFW images each, a fixed list of pair images)
from each number of client threads; prints requests/s and p50/p99 latency per setting. Without --package it
exports the shared CASIA checkpoint and calibrates it on 8 + 8 LFW pairs (as tests/test_serve.py does).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FAR = 0.125


def lfw_pairs(n: int) -> list[tuple[Path, Path, bool]]:
    from mfr_ray.paths import shared_dir

    lfw = shared_dir() / "datasets" / "lfw"
    lines = (lfw / "pairs.txt").read_text().splitlines()
    fold = int(lines[0].split()[1])

    def path(name: str, number: str) -> Path:
        return lfw / "lfw-deepfunneled" / name / f"{name}_{int(number):04d}.jpg"

    pairs = [(path(a, i), path(a, j), True) for a, i, j in (line.split() for line in lines[1 : 1 + n])]
    return pairs + [
        (path(a, i), path(b, j), False)
        for a, i, b, j in (line.split() for line in lines[1 + fold : 1 + fold + n])
    ]


def demo_package(out: Path) -> Path:
    """The shared CASIA checkpoint as a package, thresholds calibrated on 8 + 8 LFW pairs."""
    from mfr_ray.config.common import TrackingConfig
    from mfr_ray.paths import shared_dir
    from mfr_ray.serve.package import PACKAGE_JSON, calibrate, export_package, load_package

    export_package(
        str(shared_dir() / "weights" / "mobilefacenet_casia.ckpt"),
        out,
        tracking=TrackingConfig(enabled=False),
    )
    package = load_package(out)
    pairs = lfw_pairs(8)
    results = package.embed_images([p.read_bytes() for a, b, _ in pairs for p in (a, b)])
    scores = np.array([package.score(results[2 * i], results[2 * i + 1]) for i in range(len(pairs))])
    points = calibrate(scores, np.array([s for *_, s in pairs]), (FAR,), "LFW fold 1, 8 + 8 pairs")
    spec = json.loads((out / PACKAGE_JSON).read_text())
    spec["calibration"] = {"operating_points": [dataclasses.asdict(p) for p in points], "n_pairs": len(pairs)}
    (out / PACKAGE_JSON).write_text(json.dumps(spec))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(url: str, bodies: list[bytes], clients: int, total: int) -> tuple[float, np.ndarray, int]:
    """`total` POSTs split over `clients` threads; (wall seconds, latencies in ms, non-200 answers)."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            answer = session.post(
                url, data=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}, timeout=300
            )
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed * 1000)
                failures[0] += answer.status_code != 200

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, np.array(latencies), failures[0]


def main() -> None:
    from ray import serve

    from mfr_ray.config.common import RayConfig
    from mfr_ray.serve.app import APP_NAME, BatchingConfig, LimitsConfig, ServeConfig, start

    parser = argparse.ArgumentParser()
    parser.add_argument("--package", default=None)
    parser.add_argument("--requests", type=int, default=32, help="requests per (batching, clients) setting")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--wait-ms", type=float, default=10.0)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    package = args.package or str(demo_package(work / "package"))
    bodies = [
        json.dumps(
            {
                "a": base64.b64encode(a.read_bytes()).decode(),
                "b": base64.b64encode(b.read_bytes()).decode(),
                "far": FAR,
            }
        ).encode()
        for a, b, _ in lfw_pairs(8)
    ]
    port = free_port()
    rows = []
    settings = [(batching, clients) for batching in (False, True) for clients in args.clients]
    with tqdm(total=len(settings) * args.requests, desc="verify requests", unit="req") as bar:
        for batching in (False, True):
            cfg = ServeConfig(
                package=package,
                gallery=str(work / "gallery"),
                port=port,
                embedder_num_cpus=0,
                num_replicas=args.replicas,
                torch_threads=args.torch_threads,
                batching=BatchingConfig(
                    enabled=batching, max_batch_size=args.max_batch_size, wait_timeout_s=args.wait_ms / 1000
                ),
                limits=LimitsConfig(rate_per_s=1e4, burst=10_000),
                ray=RayConfig(num_cpus=args.num_cpus, include_dashboard=False),
            )
            started = time.perf_counter()
            start(cfg)
            url = f"http://127.0.0.1:{port}/verify"
            load(url, bodies, 1, 4)  # warm-up: first requests pay lazy initialisation
            startup = time.perf_counter() - started
            for clients in args.clients:
                wall, ms, failed = load(url, bodies, clients, args.requests)
                rows.append(
                    (
                        batching,
                        clients,
                        args.requests / wall,
                        np.percentile(ms, 50),
                        np.percentile(ms, 99),
                        failed,
                        startup,
                    )
                )
                bar.update(args.requests)
            serve.delete(APP_NAME)
    serve.shutdown()

    print(
        f"\n/verify (2 images per request), {args.requests} requests per row, Embedder replicas={args.replicas}, "
        f"torch threads={args.torch_threads}, max_batch_size={args.max_batch_size}, wait={args.wait_ms:g} ms"
    )
    print(
        f"{'batching':>8} {'clients':>7} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'non-200':>7} {'start s':>8}"
    )
    for batching, clients, rps, p50, p99, failed, startup in rows:
        print(
            f"{'on' if batching else 'off':>8} {clients:>7} {rps:>7.2f} {p50:>8.0f} {p99:>8.0f} {failed:>7} "
            f"{startup:>8.0f}"
        )


if __name__ == "__main__":
    main()
