"""Masked 1:N identification through the service's own code path (issue 24, point 1).

LFW people with at least two photos enrol one unmasked photo each (`mfr enrol`'s `enrol`); up to
`probes_per_person` of their other photos are probes, each once unmasked (the control) and once masked
with settings training never used: half an N95 with the held-out styles (chin left out, valve; the
project's held-out type, `data.exclude_mask_types: [N95]`), half a random lower-face occluder of
`data.occluders` placed on the full frame. People with a single photo are probes of people never
enrolled (each once, unmasked or masked, half each). Every probe is detected and aligned on the (masked) photo by `ModelPackage.embed_images` (or
the `/identify` route of a running service), searched with `Gallery.search_identities` and decided by the
service's rule (`recognise.identify_decision`).

Thresholds come from people the benchmark does not score: CelebA-299 photos, masked the same way, searched
against the same gallery; the threshold at a per-search FPIR is the (1 - FPIR) quantile of their best
scores (`fpir_operating_points`, reusable by later mask-aware work). Masked photos and embeddings are cached
under the cache folder, keyed by the settings and the package id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mfr_ray.evaluation.analyses.open_set import fpir_threshold
from mfr_ray.serve.package import EmbedResult, OperatingPoint

ENROLLED, NEVER_ENROLLED, CALIBRATION = "enrolled", "never_enrolled", "calibration"
UNMASKED, N95_HELD_OUT, OCCLUDER = "unmasked", "n95_held_out", "occluder"
MASKED_KINDS = (N95_HELD_OUT, OCCLUDER)
OUTCOMES = ("match_right", "match_wrong", "unknown", "no_face")
SETTINGS_VERSION = 1  # bump when the masking of probes changes: new cache folders


@dataclass(frozen=True)
class BenchSettings:
    """What decides the probes (and so the cache keys)."""

    people: int | None = None  # enrolled LFW people (None: all with >= 2 photos)
    probes_per_person: int = 3
    calibration_per_identity: int = 2  # CelebA-299 photos per identity (x2: unmasked and masked)
    seed: int = 0
    fpirs: tuple[float, ...] = (0.01, 0.001)

    def key(self) -> str:
        data = asdict(self) | {"version": SETTINGS_VERSION}
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Probe:
    """One probe photo: `source` is the original file, `kind` unmasked or how its copy is masked."""

    group: str
    identity: str
    source: str
    kind: str

    @property
    def masked(self) -> bool:
        return self.kind != UNMASKED


@dataclass
class Plan:
    gallery: dict[str, str]  # identity -> the photo enrolled
    probes: list[Probe] = field(default_factory=list)

    def of(self, group: str) -> list[Probe]:
        return [p for p in self.probes if p.group == group]


def masked_kind(source: str) -> str:
    """Half the masked probes get the held-out N95, half an occluder: a stable choice per photo."""
    return MASKED_KINDS[int(hashlib.sha1(Path(source).name.encode()).hexdigest(), 16) % len(MASKED_KINDS)]


def _photos(root: Path) -> dict[str, list[str]]:
    return {d.name: sorted(str(f) for f in d.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
            for d in sorted(root.iterdir()) if d.is_dir()}


def _either(group: str, identity: str, source: str) -> Probe:
    """A never-enrolled person's one probe, unmasked or masked (half each, a stable choice per photo)."""
    masked = int(hashlib.sha1(Path(source).name.encode()).hexdigest(), 16) // 2 % 2
    return Probe(group, identity, source, masked_kind(source) if masked else UNMASKED)


def _both(group: str, identity: str, sources: Iterable[str]) -> list[Probe]:
    return [Probe(group, identity, s, kind) for s in sources for kind in (UNMASKED, masked_kind(s))]


def plan_benchmark(lfw_root: str | Path, celeba_root: str | Path, settings: BenchSettings) -> Plan:
    """The gallery (first photo of each LFW person with >= 2) and the probes: enrolled people's and CelebA's
    each unmasked and masked, single-photo people's unmasked or masked.
    With `settings.people`, that many enrolled people (a seeded sample) and the same share of the
    single-photo people."""
    people = _photos(Path(lfw_root))
    multi = [n for n, files in people.items() if len(files) >= 2]
    single = [n for n, files in people.items() if len(files) == 1]
    if settings.people is not None and settings.people < len(multi):
        rng = np.random.default_rng(settings.seed)
        share = settings.people / len(multi)
        multi = sorted(rng.choice(multi, settings.people, replace=False).tolist())
        single = sorted(rng.choice(single, max(1, round(share * len(single))), replace=False).tolist())
    plan = Plan({n: people[n][0] for n in multi})
    for name in multi:
        plan.probes += _both(ENROLLED, name, people[name][1 : 1 + settings.probes_per_person])
    for name in single:
        plan.probes.append(_either(NEVER_ENROLLED, name, people[name][0]))
    for name, files in _photos(Path(celeba_root)).items():
        plan.probes += _both(CALIBRATION, name, files[: settings.calibration_per_identity])
    return plan


# -- scoring ---------------------------------------------------------------------------------------------
@dataclass
class Answer:
    """What the service says of one probe: its image status and the best gallery candidate."""

    probe: Probe
    status: str
    top_identity: str | None = None
    top_score: float | None = None
    rank1: bool = False  # the probe's own identity is the best candidate


def fpir_operating_points(best_scores: np.ndarray, fpirs: Iterable[float], calibration_set: str,
                          n_mated: int = 0) -> list[OperatingPoint]:
    """Thresholds at per-search FPIRs from never-enrolled probes' best gallery scores (probes with a face):
    the package's `calibration.operating_points` (far_target = the FPIR) a service decides with."""
    scores = np.asarray(best_scores, dtype=np.float64)
    points = []
    for target in fpirs:
        threshold = fpir_threshold(scores, target)
        accepted = int((scores >= threshold).sum())
        points.append(OperatingPoint(
            far_target=float(target), threshold=float(threshold), far=accepted / max(len(scores), 1), tpr=float("nan"),
            false_accepts=accepted, n_impostor=len(scores), n_genuine=n_mated,
            resolvable=bool(len(scores) and 1.0 / len(scores) <= target), calibration_set=calibration_set))
    return points


def decide(answer: Answer, threshold: float) -> str:
    """The service's open-set rule (`recognise.identify_decision`) as an outcome: match_right,
    match_wrong, unknown, or no_face (no usable face in the probe: no decision)."""
    from dataclasses import asdict

    from mfr_ray.serve.package import ModelPackage
    from mfr_ray.serve.recognise import MATCH, Candidate, identify_decision

    point = OperatingPoint(0.5, threshold, 0.0, 0.0, 0, 0, 0, True, "")
    package = ModelPackage("unused", {"calibration": {"operating_points": [asdict(point)]}})  # one threshold
    ok = answer.status == "ok"
    probe = EmbedResult(answer.status, "", np.zeros(1, np.float32) if ok else None, "")
    candidates = [Candidate(answer.top_identity, answer.top_score, "", "")] if ok and answer.top_identity else []
    result = identify_decision(package, 0.5, probe, candidates)
    if result.decision == MATCH:
        return "match_right" if result.identity == answer.probe.identity else "match_wrong"
    return "unknown" if ok else "no_face"


def tally(answers: list[Answer], threshold: float) -> dict[str, int]:
    """Outcome counts (they add up to the probes)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for answer in answers:
        counts[decide(answer, threshold)] += 1
    return counts | {"probes": len(answers)}


def _select(answers: list[Answer], group: str, masked: bool | None = None, kind: str | None = None) -> list[Answer]:
    return [a for a in answers if a.probe.group == group and (masked is None or a.probe.masked == masked)
            and (kind is None or a.probe.kind == kind)]


def calibrate(answers: list[Answer], fpirs: Iterable[float]) -> list[OperatingPoint]:
    """Thresholds from the calibration probes (masked and unmasked pooled: a service has one threshold)."""
    calib = [a for a in _select(answers, CALIBRATION) if a.status == "ok"]
    scores = np.array([a.top_score for a in calib], dtype=np.float64)
    return fpir_operating_points(scores, fpirs, f"CelebA-299, {len(calib)} never-enrolled probes (masked and not)")


def summarise(answers: list[Answer], points: list[OperatingPoint], n_gallery: int) -> dict:
    """Rank-1 and, per FPIR, outcome counts of each probe row (enrolled / never enrolled x unmasked / masked /
    each masked kind), with the FPIR measured on the never-enrolled LFW probes."""
    rows = {"enrolled masked": _select(answers, ENROLLED, True),
            "enrolled unmasked": _select(answers, ENROLLED, False),
            **{f"enrolled {k}": _select(answers, ENROLLED, kind=k) for k in MASKED_KINDS},
            "never enrolled masked": _select(answers, NEVER_ENROLLED, True),
            "never enrolled unmasked": _select(answers, NEVER_ENROLLED, False)}
    out = {"n_gallery": n_gallery, "rank1": {name: _rank1(rows[name]) for name in rows if name.startswith("enrolled")},
           "operating_points": [asdict(p) for p in points], "counts": {}}
    for point in points:
        out["counts"][f"{point.far_target:g}"] = {name: tally(rows[name], point.threshold) for name in rows}
    return out


def _rank1(answers: list[Answer]) -> float:
    """Share of probes whose best candidate is their own identity (a probe without a face is a miss)."""
    return float(np.mean([a.rank1 for a in answers])) if answers else float("nan")


# -- answers from embeddings (in process) ----------------------------------------------------------------
def search_answers(probes: list[Probe], results: list[EmbedResult], search: Callable) -> list[Answer]:
    """Each probe's best candidate from `search(embedding, k) -> [Match]` (`Gallery.search_identities`)."""
    answers = []
    for probe, result in zip(probes, results, strict=True):
        if not result.ok:
            answers.append(Answer(probe, result.status))
            continue
        best = search(result.embedding, 1)
        top = best[0] if best else None
        answers.append(Answer(probe, "ok", top and top.identity, top and top.score,
                              bool(top and top.identity == probe.identity)))
    return answers


def format_table(summary: dict, label: str) -> str:
    """The README's table: rows of probes, per FPIR match-right / match-wrong / unknown (+ no face)."""
    fpirs = list(summary["counts"])
    head = " | ".join(f"FPIR {float(f) * 100:g}%: right / wrong / unknown / no face" for f in fpirs)
    lines = [f"{label}: gallery N = {summary['n_gallery']}",
             "| probes | n | rank-1 | " + head + " |", "|---" * (3 + len(fpirs)) + "|"]
    for name in summary["counts"][fpirs[0]]:
        n = summary["counts"][fpirs[0]][name]["probes"]
        rank1 = summary["rank1"].get(name)
        cells = []
        for f in fpirs:
            c = summary["counts"][f][name]
            cells.append(" / ".join(f"{c[k]} ({100 * c[k] / max(n, 1):.1f}%)" if k != "no_face" else str(c[k])
                                    for k in OUTCOMES))
        lines.append(f"| {name} | {n} | {'-' if rank1 is None else f'{100 * rank1:.1f}%'} | " + " | ".join(cells) + " |")
    thresholds = ", ".join(f"FPIR {p['far_target']:g}: {p['threshold']:.4f} (calibration accepts "
                           f"{p['false_accepts']}/{p['n_impostor']})" for p in summary["operating_points"])
    return "\n".join(lines + [f"thresholds: {thresholds}"])
