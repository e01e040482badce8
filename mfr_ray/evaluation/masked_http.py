"""The masked-identification benchmark's probes sent to `/identify` of `mfr serve` (Ray Serve on loopback),
started on a copy of the package whose operating points are the benchmark's FPIR thresholds and on the
benchmark's gallery. The service's own decision at the first FPIR is compared with the benchmark's rule
applied to the score it returned (`service_agreement`)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mfr_ray.evaluation.masked_identification import Answer, BenchSettings, Probe, decide
from mfr_ray.serve.package import PACKAGE_JSON, OperatingPoint


def calibrated_copy(package, points: list[OperatingPoint], out: Path) -> Path:
    """The package with `calibration.operating_points` = the FPIR thresholds (same weights: same id)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(package.folder, out)
    spec = json.loads((out / PACKAGE_JSON).read_text())
    spec["calibration"] = {"operating_points": [dataclasses.asdict(p) for p in points],
                           "score": "per-search FPIR on never-enrolled probes (masked_identification)"}
    (out / PACKAGE_JSON).write_text(json.dumps(spec, indent=2))
    return out


def start_service(package_folder: Path, gallery_uri: str, far: float, replicas: int) -> str:
    """`mfr serve` in this process's Ray (loopback, no key); returns its URL."""
    import socket

    from mfr_ray.serve.app import LimitsConfig, ServeConfig, start

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = ServeConfig(package=str(package_folder), gallery=gallery_uri, port=port, far=far,
                      num_replicas=replicas, embedder_num_cpus=0, audit_log=None, disclose_candidates=True,
                      limits=LimitsConfig(rate_per_s=1e6, burst=10**6))
    start(cfg)
    return f"http://127.0.0.1:{cfg.port}"


def post_identify(url: str, path: str, far: float, retries: int = 5) -> dict:
    """One `/identify` (raw JPEG body); a 4xx answers its error (e.g. no_face) as `status`."""
    import time

    import requests

    data = Path(path).read_bytes()
    for attempt in range(retries):
        got = requests.post(f"{url}/identify?far={far}&k=1", data=data, headers={"Content-Type": "image/jpeg"},
                            timeout=300)
        if got.status_code != 503:
            break
        time.sleep(1 + attempt)
    body = got.json()
    return body | {"status": "ok"} if got.status_code == 200 else {"status": body.get("error", str(got.status_code))}


def _answer(probe: Probe, body: dict) -> Answer:
    if body["status"] != "ok" or not body.get("candidates"):
        return Answer(probe, body["status"] if body["status"] != "ok" else "ok")
    top = body["candidates"][0]
    return Answer(probe, "ok", top["identity"], float(top["score"]), top["identity"] == probe.identity)


def http_answers(package, gallery, points: list[OperatingPoint], probes: list[Probe], cache: Path,
                 settings: BenchSettings, workers: int) -> tuple[list[Answer], dict]:
    """Answers of every probe from the service, and how often its decision equals the benchmark's rule."""
    from ray import serve

    from mfr_ray.evaluation.masked_bench import probe_file

    folder = calibrated_copy(package, points, cache / "served" / f"{package.package_id}-{settings.key()}")
    far = points[0].far_target
    url = start_service(folder, gallery.uri, far, workers)
    files = [probe_file(cache, settings, p) for p in probes]
    try:
        with ThreadPoolExecutor(max(4, 2 * workers)) as pool:
            bodies = list(pool.map(lambda f: post_identify(url, f, far) if f else {"status": "mask_failed"}, files))
    finally:
        serve.shutdown()
    answers = [_answer(p, b) for p, b in zip(probes, bodies, strict=True)]
    same = [decide(a, points[0].threshold) == _service_outcome(a, b) for a, b in zip(answers, bodies, strict=True)]
    return answers, {"far": far, "probes": len(same), "agree": int(np.sum(same))}


def _service_outcome(answer: Answer, body: dict) -> str:
    if body["status"] != "ok":
        return "no_face"
    if body["decision"] == "match":
        return "match_right" if body["identity"] == answer.probe.identity else "match_wrong"
    return "unknown"
