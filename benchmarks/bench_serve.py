"""`/identify` of `mfr serve` per inference runtime on real masked photos, over HTTP on loopback: latency
p50/p95 for one client on an otherwise idle service, throughput (and latency) for concurrent clients.

    python benchmarks/bench_serve.py [--runtimes openvino onnxruntime torch] [--rounds 2] [--requests 40]
        [--concurrent 4] [--people 40] [--torch-threads 1] [--max-batch-size 8] [--wait-ms 0] [--package PKG]

The probes are LFW photos of people with two or more photos: the first photo of each person is enrolled
unmasked (`mfr enrol`), the second is masked by the project's masking engine on the full photo (the default
surgical mask, seeded), cut to the central 160x160 pixels (the face and a margin, a typical face photo) and
sent as a PNG. Every round starts `mfr serve` once per runtime (its own process and local Ray, loopback,
the default continuous batching: up to 8 images, no wait), in turn, the order reversed every other round, so a
neighbour's load falls on all runtimes alike; prints per runtime the medians over the rounds and their
ratio to torch, and how the service answered (match right / wrong, unknown, no face).

    python benchmarks/bench_serve.py --verify-batching [--requests 32] [--clients 1 2 4] [--replicas 1]
        [--max-batch-size 8] [--wait-ms 0]

`/verify` throughput and latency at 1, 2 and 4 concurrent clients, with and without request batching (the
application started in this process's Ray, two LFW images per request). Without --package both export the
shared CASIA checkpoint and calibrate it on 8 + 8 LFW pairs (as tests/test_serve.py does).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    from mfr_ray.serve.calibration import calibrate
    from mfr_ray.serve.export import export_package
    from mfr_ray.serve.package import PACKAGE_JSON, load_package

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


def load(url: str, bodies: list[bytes], clients: int, total: int,
         content_type: str = "application/json") -> tuple[float, np.ndarray, list]:
    """`total` POSTs split over `clients` threads; (wall seconds, latencies in ms, the answers: JSON bodies,
    or the HTTP status of a non-200)."""
    latencies: list[float] = []
    answers: list = [None] * total
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
            answer = session.post(url, data=bodies[i % len(bodies)], headers={"Content-Type": content_type},
                                  timeout=300)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed * 1000)
                answers[i] = answer.json() if answer.status_code == 200 else answer.status_code

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, np.array(latencies), answers


# -- /identify per runtime, `mfr serve` in its own process ---------------------------------------------------
def lfw_people(n: int) -> list[tuple[str, Path, Path]]:
    """The first `n` LFW people (alphabetically) with two or more photos: (name, first, second photo)."""
    from mfr_ray.paths import shared_dir

    root = shared_dir() / "datasets" / "lfw" / "lfw-deepfunneled"
    people = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        photos = sorted(folder.glob("*.jpg"))
        if len(photos) >= 2:
            people.append((folder.name, photos[0], photos[1]))
        if len(people) == n:
            break
    return people


def masked_probes(people: list[tuple[str, Path, Path]], size: int = 160, seed: int = 0) -> list[tuple[str, bytes]]:
    """(name, PNG) per person whose second photo the masking engine could mask: the mask drawn on the full
    photo (a mix of types, seeded), then its central `size` x `size` pixels."""
    from mfr_ray.imageio import decode_image, encode_image
    from mfr_ray.masking import MaskEngine, MaskingConfig

    engine = MaskEngine(MaskingConfig(mix={"surgical_blue": 1, "surgical_green": 1, "N95": 1, "cloth": 1}, seed=seed))
    probes = []
    for name, _, photo in tqdm(people, desc="mask probes", unit="photo", file=sys.stderr):
        masked = engine.mask(decode_image(photo.read_bytes()).image, photo.name, aligned=True).image
        if masked is None:
            continue
        top, left = (masked.shape[0] - size) // 2, (masked.shape[1] - size) // 2
        probes.append((name, encode_image(masked[top : top + size, left : left + size], "png")))
    return probes


def mfr_command(*args: str) -> list[str]:
    """The `mfr` console script of this interpreter's environment (PYTHONPATH decides which mfr_ray)."""
    return [sys.executable, str(Path(sys.executable).with_name("mfr")), *args]


def enrol_gallery(package: str, people: list[tuple[str, Path, Path]], work: Path) -> str:
    """`mfr enrol` of each person's first photo (unmasked) into a new gallery; returns its folder."""
    root, gallery = work / "enrol", work / "gallery"
    for name, photo, _ in people:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / photo.name).symlink_to(photo)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run(mfr_command("enrol", package, str(root), "--out", str(gallery)), check=True, env=env)
    return str(gallery)


@contextmanager
def serving(package: str, gallery: str, runtime: str, threads: int, log: Path,
            batching: tuple[str, ...] = ()) -> Iterator[str]:
    """`mfr serve` on a free loopback port with `runtime`, as a user starts it, until /healthz answers;
    yields its URL and stops it with Ctrl-C (SIGINT to its pid), as a user does."""
    port = free_port()
    command = mfr_command("serve", package, "--gallery", gallery, "--port", str(port), "--runtime", runtime,
                          "--torch-threads", str(threads), *batching)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this benchmark started
            proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mfr serve exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/healthz", timeout=30).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or the app still deploying
            pass
        time.sleep(1)
    raise TimeoutError(f"mfr serve did not answer /healthz within {timeout:.0f} s; log {log}")


def outcomes(answers: list, names: list[str]) -> dict[str, int]:
    """How the service answered each probe: match right / match wrong / unknown / no face / HTTP error."""
    counts = dict.fromkeys(("right", "wrong", "unknown", "no face", "error"), 0)
    for answer, name in zip(answers, names, strict=True):
        if not isinstance(answer, dict):
            counts["no face" if answer == 422 else "error"] += 1
        elif answer.get("decision") == "match":
            counts["right" if answer.get("identity") == name else "wrong"] += 1
        else:
            counts["unknown" if answer.get("decision") == "unknown" else "no face"] += 1
    return counts


def measure_identify(url: str, probes: list[tuple[str, bytes]], args) -> dict:
    """One service's round: a warm-up, then `requests` probes from one client (each alone on the service),
    then `requests` probes from `concurrent` clients."""
    target = f"{url}/identify?far={FAR}&k=1"
    bodies = [png for _, png in probes]
    load(target, bodies, 1, min(8, len(bodies)), "image/png")  # first requests pay lazy initialisation
    _, alone, answers = load(target, bodies, 1, args.requests, "image/png")
    wall, together, _ = load(target, bodies, args.concurrent, args.requests, "image/png")
    names = [probes[i % len(probes)][0] for i in range(args.requests)]
    return {"p50": np.percentile(alone, 50), "p95": np.percentile(alone, 95), "rps": args.requests / wall,
            "p50_n": np.percentile(together, 50), "p95_n": np.percentile(together, 95),
            "outcomes": outcomes(answers, names)}


def identify_rounds(args, package: str, gallery: str, probes, work: Path) -> dict[str, list[dict]]:
    """Alternated rounds: every runtime's service in turn, reversed every other round."""
    results: dict[str, list[dict]] = {r: [] for r in args.runtimes}
    batching = ("--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.wait_ms))
    with tqdm(total=args.rounds * len(args.runtimes), desc="services", unit="service", file=sys.stderr) as bar:
        for round_ in range(args.rounds):
            for runtime in args.runtimes if round_ % 2 == 0 else reversed(args.runtimes):
                started = time.perf_counter()
                with serving(package, gallery, runtime, args.torch_threads, work / f"serve-{runtime}.log",
                             batching) as url:
                    startup = time.perf_counter() - started
                    results[runtime].append(measure_identify(url, probes, args) | {"start": startup})
                bar.update(1)
    return results


def report_identify(args, results: dict[str, list[dict]], n_probes: int, n_gallery: int) -> None:
    med = {r: {k: statistics.median(x[k] for x in rows) for k in ("p50", "p95", "rps", "p50_n", "p95_n", "start")}
           for r, rows in results.items()}
    base = med.get("torch")
    print(f"\n/identify, {n_probes} masked LFW photos (160x160 PNG) against {n_gallery} enrolled people; "
          f"{args.requests} requests per setting, medians of {args.rounds} alternated rounds; one Embedder "
          f"replica of {args.torch_threads} thread(s), continuous batching up to {args.max_batch_size} images, "
          f"{args.wait_ms:g} ms wait")
    print(f"{'runtime':<12} {'1 client p50':>12} {'p95 ms':>7} {'x torch':>7} | {args.concurrent} clients req/s "
          f"{'x torch':>7} {'p50 ms':>7} {'p95 ms':>7} | {'start s':>7}  answers (first round, 1 client)")
    for runtime, m in med.items():
        lat_x = f"{base['p50'] / m['p50']:.2f}" if base else "-"
        rps_x = f"{m['rps'] / base['rps']:.2f}" if base else "-"
        counts = ", ".join(f"{k} {v}" for k, v in results[runtime][0]["outcomes"].items() if v)
        print(f"{runtime:<12} {m['p50']:>12.1f} {m['p95']:>7.1f} {lat_x:>7} | {m['rps']:>17.2f} {rps_x:>7} "
              f"{m['p50_n']:>7.1f} {m['p95_n']:>7.1f} | {m['start']:>7.0f}  {counts}")


def bench_identify(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    package = args.package or str(demo_package(work / "package"))
    people = lfw_people(args.people)
    probes = masked_probes(people)
    gallery = enrol_gallery(package, people, work)
    results = identify_rounds(args, package, gallery, probes, work)
    report_identify(args, results, len(probes), len(people))


# -- /verify with and without batching, in this process's Ray -------------------------------------------------
def _verify_config(args, package: str, work: Path, port: int, batching: bool):
    from mfr_ray.config.common import RayConfig
    from mfr_ray.serve.app import BatchingConfig, LimitsConfig, ServeConfig

    return ServeConfig(
        package=package, gallery=str(work / "gallery"), port=port, embedder_num_cpus=0,
        num_replicas=args.replicas, torch_threads=args.torch_threads,
        batching=BatchingConfig(enabled=batching, max_batch_size=args.max_batch_size,
                                wait_timeout_s=args.wait_ms / 1000),
        limits=LimitsConfig(rate_per_s=1e4, burst=10_000),
        ray=RayConfig(num_cpus=args.num_cpus, include_dashboard=False),
    )


def bench_verify_batching(args) -> None:
    from ray import serve

    from mfr_ray.serve.app import APP_NAME, start

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    package = args.package or str(demo_package(work / "package"))
    bodies = [json.dumps({"a": base64.b64encode(a.read_bytes()).decode(),
                          "b": base64.b64encode(b.read_bytes()).decode(), "far": FAR}).encode()
              for a, b, _ in lfw_pairs(8)]
    port, rows = free_port(), []
    with tqdm(total=2 * len(args.clients) * args.requests, desc="verify requests", unit="req") as bar:
        for batching in (False, True):
            started = time.perf_counter()
            start(_verify_config(args, package, work, port, batching))
            url = f"http://127.0.0.1:{port}/verify"
            load(url, bodies, 1, 4)  # warm-up: first requests pay lazy initialisation
            startup = time.perf_counter() - started
            for clients in args.clients:
                wall, ms, answers = load(url, bodies, clients, args.requests)
                failed = sum(not isinstance(a, dict) for a in answers)
                rows.append((batching, clients, args.requests / wall, np.percentile(ms, 50), np.percentile(ms, 99),
                             failed, startup))
                bar.update(args.requests)
            serve.delete(APP_NAME)
    serve.shutdown()
    print(f"\n/verify (2 images per request), {args.requests} requests per row, Embedder replicas={args.replicas}, "
          f"torch threads={args.torch_threads}, max_batch_size={args.max_batch_size}, wait={args.wait_ms:g} ms")
    print(f"{'batching':>8} {'clients':>7} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'non-200':>7} {'start s':>8}")
    for batching, clients, rps, p50, p99, failed, startup in rows:
        print(f"{'on' if batching else 'off':>8} {clients:>7} {rps:>7.2f} {p50:>8.0f} {p99:>8.0f} {failed:>7} "
              f"{startup:>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--package", default=None)
    parser.add_argument("--verify-batching", action="store_true", help="the /verify batching table instead")
    parser.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime", "torch"])
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds (one service start each)")
    parser.add_argument("--people", type=int, default=40, help="people enrolled, one masked probe each")
    parser.add_argument("--concurrent", type=int, default=4, help="clients of the throughput setting")
    parser.add_argument("--requests", type=int, default=40, help="requests per setting")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="--verify-batching clients")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--wait-ms", type=float, default=0.0)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (--verify-batching)")
    args = parser.parse_args()
    (bench_verify_batching if args.verify_batching else bench_identify)(args)


if __name__ == "__main__":
    main()
