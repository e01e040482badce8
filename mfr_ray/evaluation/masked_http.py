"""The masked-identification benchmark's probes sent to `/identify` of `mfr serve` (Ray Serve on loopback),
started on a copy of the package whose search calibration is the benchmark's calibration probes, on the
benchmark's gallery, deciding at the first FPIR. The service computes its per-search thresholds itself;
its decisions are compared with the benchmark's `per mask state` rule applied to the score and mask
probability it returned (`service_agreement`)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mfr_ray.evaluation.masked_identification import Answer, BenchSettings, Probe, decide
from mfr_ray.serve.search_calibration import SearchCalibration


def calibrated_copy(package, calibration: SearchCalibration, out: Path) -> Path:
    """The package with the calibration probes as its search calibration (same weights: same id)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(package.folder, out)
    calibration.save(out)
    return out


def search_calibration_of(probes: list[Probe], results: list) -> SearchCalibration:
    kept = [(p, r) for p, r in zip(probes, results, strict=True) if r.ok]
    return SearchCalibration(np.stack([r.embedding for _, r in kept]).astype(np.float32),
                             np.array([r.mask_probability for _, r in kept], dtype=np.float64),
                             np.array([p.kind for p, _ in kept]), "CelebA-299")


def start_service(package_folder: Path, gallery_uri: str, fpir: float, replicas: int) -> str:
    """`mfr serve` in this process's Ray (loopback, no key); returns its URL."""
    import socket

    from mfr_ray.serve.app import LimitsConfig, ServeConfig, start

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = ServeConfig(package=str(package_folder), gallery=gallery_uri, port=port, fpir=fpir,
                      num_replicas=replicas, embedder_num_cpus=0, audit_log=None, disclose_candidates=True,
                      limits=LimitsConfig(rate_per_s=1e6, burst=10**6))
    start(cfg)
    return f"http://127.0.0.1:{cfg.port}"


def post_identify(url: str, path: str, retries: int = 5) -> dict:
    """One `/identify` (raw JPEG body); a 4xx answers its error (e.g. no_face) as `status`."""
    import time

    import requests

    data = Path(path).read_bytes()
    for attempt in range(retries):
        got = requests.post(f"{url}/identify?k=1", data=data, headers={"Content-Type": "image/jpeg"},
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
    return Answer(probe, "ok", top["identity"], float(top["score"]), top["identity"] == probe.identity,
                  body["image"]["mask_probability"])


def http_answers(package, gallery, calibration: tuple[list[Probe], list], rules: dict, probes: list[Probe],
                 files: list[str | None], cache: Path, settings: BenchSettings,
                 workers: int) -> tuple[list[Answer], dict]:
    """Answers of every probe (the photo in `files`; None: no mask could be drawn) from the service, and how
    often its decision equals the benchmark's rule."""
    from ray import serve

    folder = calibrated_copy(package, search_calibration_of(*calibration),
                             cache / "served" / f"{package.package_id}-{settings.key()}")
    fpir = settings.fpirs[0]
    url = start_service(folder, gallery.uri, fpir, workers)
    try:
        with ThreadPoolExecutor(max(4, 2 * workers)) as pool:
            bodies = list(pool.map(lambda f: post_identify(url, f) if f else {"status": "mask_failed"}, files))
    finally:
        serve.shutdown()
    answers = [_answer(p, b) for p, b in zip(probes, bodies, strict=True)]
    points = rules[f"{fpir:g}"]["per mask state"]
    same = [decide(a, points) == _service_outcome(a, b) for a, b in zip(answers, bodies, strict=True)]
    answered = sum(b["status"] == "ok" for b in bodies)  # a 4xx other than no_face would agree without a decision
    return answers, {"fpir": fpir, "probes": len(same), "agree": int(np.sum(same)), "answered": answered}


def _service_outcome(answer: Answer, body: dict) -> str:
    if body["status"] != "ok":
        return "no_face"
    if body["decision"] == "match":
        return "match_right" if body["identity"] == answer.probe.identity else "match_wrong"
    return "unknown"
