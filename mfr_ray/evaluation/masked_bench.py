"""Running the masked-identification benchmark (`masked_identification` holds the protocol and the counts):
masked probe photos drawn once and cached, the gallery enrolled with `mfr enrol`'s `enrol`, probes
embedded in process (`ModelPackage.embed_images` on a pool of processes) or sent to `/identify` of the
service, and one summary per package (several packages = a training curve in one pass).

Cache layout (under `cache`): `photos-seed<seed>-v<version>/<kind>/<identity>/<file>` masked probes (+ `manifest.json`,
the kind each got), `gallery-photos-<settings>/` the enrolled photos, `galleries/<package>-<settings>/`,
`embeddings/<package id>.npz` (per file), `packages/` checkpoints exported as packages."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mfr_ray.evaluation.masked_identification import (
    MASKED_KINDS,
    N95_HELD_OUT,
    OCCLUDER,
    SETTINGS_VERSION,
    BenchSettings,
    Plan,
    Probe,
    calibrate,
    plan_benchmark,
    search_answers,
    summarise,
)
from mfr_ray.serve.package import EmbedResult

MASK_FAILED = "mask_failed"
_STATE: dict = {}


def _log(message: str) -> None:
    import sys

    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def held_out_masking(seed: int):
    """The N95 with the held-out styles only (chin left out, valve): never drawn in training."""
    from mfr_ray.masking.config import MaskingConfig, MaskStyleConfig

    style = MaskStyleConfig(coverage={"chin_exposed": 1.0}, valve={"valve": 1.0}, print={"camouflage": 1.0})
    return MaskingConfig(mask_type="N95", style=style, seed=seed)


# -- masked photos (pool workers) ------------------------------------------------------------------------
def _tools(seed: int):
    if "engine" not in _STATE:
        import cv2

        from mfr_ray.faces.aligner import FaceAligner
        from mfr_ray.faces.config import AlignConfig
        from mfr_ray.masking import MaskEngine

        cv2.setNumThreads(1)
        _STATE["engine"] = MaskEngine(held_out_masking(seed))
        _STATE["aligner"] = FaceAligner(AlignConfig(fallbacks=["dlib"], num_threads=1))
    return _STATE["engine"], _STATE["aligner"]


def occlude_frame(frame: np.ndarray, matrix: np.ndarray, crop_hw: tuple[int, int], rng: np.random.Generator,
                  cfg=None) -> np.ndarray:
    """A `data.occluders` occluder drawn in the crop template's layout and mapped back onto the full frame
    through the inverse of the frame -> crop similarity (`matrix`, from the face's 5 landmarks)."""
    import cv2

    from mfr_ray.train.augment import OccluderConfig, occluder_alpha, occluder_fill, shade

    cfg = cfg or OccluderConfig(prob=1.0)
    height, width = crop_hw
    crop = cv2.warpAffine(frame, matrix, (width, height), flags=cv2.INTER_LINEAR)
    alpha = occluder_alpha(crop_hw, cfg, rng)
    fill = shade(occluder_fill(crop_hw, cfg.fills[rng.integers(len(cfg.fills))], rng, crop), crop, alpha, rng)
    back = cv2.invertAffineTransform(matrix)
    size = (frame.shape[1], frame.shape[0])
    alpha = cv2.warpAffine(alpha, back, size, flags=cv2.INTER_LINEAR)[..., None]
    fill = cv2.warpAffine(fill.astype(np.float32), back, size, flags=cv2.INTER_LINEAR)
    out = frame.astype(np.float32) * (1 - alpha) + fill * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def mask_photo(source: str, kind: str, out: str, seed: int) -> str:
    """Write the masked copy of `source` to `out` (JPEG q95); returns the kind drawn: the planned one, an
    occluder when no N95 could be fitted (dlib found no face), or MASK_FAILED when neither could."""
    from mfr_ray.faces.geometry import CROP_TEMPLATES
    from mfr_ray.imageio import decode_image, encode_image

    engine, aligner = _tools(seed)
    rgb = decode_image(Path(source).read_bytes()).image
    image = None
    if kind == N95_HELD_OUT:
        result = engine.mask(rgb, Path(source).name)
        image, kind = (result.image, kind) if result.image is not None else (None, OCCLUDER)
    if image is None:
        found = aligner.align(rgb)
        if found.matrix is None:
            return MASK_FAILED
        rng = np.random.default_rng([seed, int(hashlib.sha1(Path(source).name.encode()).hexdigest()[:8], 16)])
        image = occlude_frame(rgb, found.matrix, tuple(CROP_TEMPLATES[aligner.config.crop][0]), rng)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(encode_image(image, "jpg", quality=95))
    return kind


def _photo_chunk(items: list[tuple[str, str, str]], seed: int) -> list[str]:
    return [mask_photo(source, kind, out, seed) for source, kind, out in items]


def _embed_chunk(paths: list[str], package_folder: str) -> list[tuple[str, str, np.ndarray | None]]:
    from mfr_ray.serve.package import load_package

    if _STATE.get("package_folder") != package_folder:
        import torch

        torch.set_num_threads(1)
        _STATE["package"], _STATE["package_folder"] = load_package(package_folder, num_threads=1), package_folder
    results = _STATE["package"].embed_images([Path(p).read_bytes() for p in paths])
    return [(r.status, r.reason, r.embedding) for r in results]


def map_chunks(fn: Callable, items: list, workers: int, chunk: int = 16, **kwargs) -> list:
    """`fn(chunk_of_items, **kwargs)` over chunks, on the pool `worker_pool` opened (spawned processes that
    keep their models between calls), else in this process."""
    from functools import partial

    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    pool = _STATE.get("pool")
    if pool is None or workers <= 1:
        return [out for c in chunks for out in fn(c, **kwargs)]
    return [out for part in pool.map(partial(fn, **kwargs), chunks) for out in part]


@contextmanager
def worker_pool(workers: int):
    """A pool of `workers` spawned processes for `map_chunks` (none for 1: everything runs here)."""
    if workers <= 1:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        _STATE["pool"] = pool
        try:
            yield pool
        finally:
            _STATE.pop("pool", None)


# -- the probe files -------------------------------------------------------------------------------------
def photos_dir(cache: Path, settings: BenchSettings) -> Path:
    """Masked copies depend on the photo, the seed and the masking code only (not on the sample)."""
    return cache / f"photos-seed{settings.seed}-v{SETTINGS_VERSION}"


def make_masked_photos(plan: Plan, cache: Path, settings: BenchSettings, workers: int) -> Plan:
    """Draw every masked probe not drawn yet (cached per settings); returns the plan with each masked probe's
    kind as drawn and its file (`Probe.source` stays the original; see `probe_file`)."""
    folder = photos_dir(cache, settings)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    todo = [(p.source, p.kind, str(_masked_path(folder, p))) for p in plan.probes
            if p.masked and p.source not in manifest]
    _log(f"{len(plan.probes)} probes; drawing {len(todo)} masked photos not in the cache")
    for (source, _, _), drawn in zip(todo, map_chunks(_photo_chunk, todo, workers, seed=settings.seed), strict=True):
        manifest[source] = drawn
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=0, sort_keys=True))
    probes = [dataclasses.replace(p, kind=manifest[p.source]) if p.masked else p for p in plan.probes]
    return Plan(plan.gallery, probes)


def _masked_path(folder: Path, probe: Probe) -> Path:
    kind = probe.kind if probe.kind in MASKED_KINDS else "any"
    return folder / kind / probe.identity / Path(probe.source).name


def probe_file(cache: Path, settings: BenchSettings, probe: Probe) -> str | None:
    """The photo sent for a probe: the original, or its cached masked copy (None: no mask could be drawn)."""
    if not probe.masked:
        return probe.source
    if probe.kind == MASK_FAILED:
        return None
    for kind in (probe.kind, *MASKED_KINDS):  # drawn as another kind than planned: an N95 that fell back
        path = photos_dir(cache, settings) / kind / probe.identity / Path(probe.source).name
        if path.is_file():
            return str(path)
    return None


def embed_files(package, files: list[str], cache: Path, workers: int) -> list[EmbedResult]:
    """`package.embed_images` of every file, cached per package id and file (later runs embed only the
    files not seen before)."""
    path = cache / "embeddings" / f"{package.package_id}.npz"
    known: dict[str, tuple[str, np.ndarray]] = {}
    if path.is_file():
        saved = np.load(path)
        known = {str(f): (str(s), e) for f, s, e in zip(saved["files"], saved["status"], saved["embedding"], strict=True)}
    todo = sorted({f for f in files if f not in known})
    _log(f"embedding {len(todo)} of {len(files)} photos (the rest cached)")
    rows = map_chunks(_embed_chunk, todo, workers, package_folder=str(package.folder))
    for file, (status, _, emb) in zip(todo, rows, strict=True):
        known[file] = (status, emb if status == "ok" else np.zeros(package.embedding_size, np.float32))
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        names = sorted(known)
        np.savez(path.with_suffix(".tmp.npz"), files=np.array(names), status=np.array([known[f][0] for f in names]),
                 embedding=np.stack([known[f][1] for f in names]).astype(np.float32))
        path.with_suffix(".tmp.npz").replace(path)
    return [EmbedResult(known[f][0], "", known[f][1] if known[f][0] == "ok" else None, "") for f in files]


def embed_probes(package, probes: list[Probe], cache: Path, settings: BenchSettings, workers: int) -> list[EmbedResult]:
    files = [probe_file(cache, settings, p) for p in probes]
    found = embed_files(package, [f for f in files if f], cache, workers)
    it = iter(found)
    return [next(it) if f else EmbedResult(MASK_FAILED, "no mask could be drawn", None, "none") for f in files]


# -- gallery ---------------------------------------------------------------------------------------------
def enrol_gallery(package, plan: Plan, cache: Path, settings: BenchSettings, workers: int, synthetic: int = 0):
    """The gallery of the plan's enrolled photos, made by `enrol` (`mfr enrol`, with `synthetic` masked copies
    of each photo as extra templates) from an `<identity>/<photo>` folder of copies; an existing gallery is
    reused (enrol skips enrolled files)."""
    from mfr_ray.config.common import RayConfig
    from mfr_ray.serve.enrolment import enrol
    from mfr_ray.serve.gallery import Gallery
    from mfr_ray.serve.synthetic import SyntheticMasks

    root = cache / f"gallery-photos-{settings.key()}"
    for identity, source in plan.gallery.items():
        target = root / identity / Path(source).name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    out = cache / "galleries" / f"{package.package_id}-{settings.key()}{f'-synthetic{synthetic}' if synthetic else ''}"
    _log(f"enrolling {len(plan.gallery)} people into {out}")
    enrol(str(package.folder), str(root), str(out), num_actors=workers, ray=RayConfig(), progress=False,
          synthetic=SyntheticMasks(count=synthetic))
    return Gallery(str(out))


def package_for(source: str, cache: Path) -> str:
    """A package folder as it is; a checkpoint exported (no thresholds) into the cache once."""
    from mfr_ray.config.common import TrackingConfig
    from mfr_ray.serve.package import PACKAGE_JSON, export_package

    path = Path(source).expanduser().resolve()
    if (path / PACKAGE_JSON).is_file():
        return str(path)
    stat = path.stat()
    out = cache / "packages" / hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    if not (out / PACKAGE_JSON).is_file():
        export_package(str(path), out, tracking=TrackingConfig(enabled=False))
    return str(out)


# -- one package -----------------------------------------------------------------------------------------
def run_package(source: str, plan: Plan, cache: Path, settings: BenchSettings, workers: int,
                http: bool = False, synthetic: int = 0) -> dict:
    """Enrol, calibrate on the calibration probes, answer every LFW probe (in process, or over HTTP from a
    service started on the calibrated package) and summarise."""
    from mfr_ray.serve.package import load_package

    started = time.perf_counter()
    package = load_package(package_for(source, cache))
    gallery = enrol_gallery(package, plan, cache, settings, workers, synthetic)
    enrolled_s = time.perf_counter() - started
    calib = [p for p in plan.probes if p.group == "calibration"]
    scored = [p for p in plan.probes if p.group != "calibration"]
    answers = search_answers(calib, embed_probes(package, calib, cache, settings, workers), gallery.search_identities)
    points = calibrate(answers, settings.fpirs)
    if http:
        from mfr_ray.evaluation.masked_http import http_answers

        scored_answers, agreement = http_answers(package, gallery, points, scored, cache, settings, workers)
    else:
        results = embed_probes(package, scored, cache, settings, workers)
        scored_answers, agreement = search_answers(scored, results, gallery.search_identities), None
    summary = summarise(answers + scored_answers, points, len(gallery.identities()))
    elapsed = time.perf_counter() - started
    return summary | {"source": source, "package_id": package.package_id, "http": http, "elapsed_s": elapsed,
                      "enrol_s": enrolled_s, "images": len(plan.gallery) + len(plan.probes),
                      "service_agreement": agreement, "calibration_probes": [(p.identity, p.source, p.kind) for p in calib]}


def run_benchmark(sources: list[str], lfw_root: str, celeba_root: str, cache: str | Path, settings: BenchSettings,
                  workers: int = 2, http: bool = False, synthetic: int = 0) -> list[dict]:
    """Every package or checkpoint of `sources` on the same probes (masked photos drawn once)."""
    cache = Path(cache)
    started = time.perf_counter()
    with worker_pool(workers):
        plan = make_masked_photos(plan_benchmark(lfw_root, celeba_root, settings), cache, settings, workers)
        photos_s = time.perf_counter() - started
        return [run_package(s, plan, cache, settings, workers, http, synthetic) | {"photos_s": photos_s} for s in sources]


