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
scores (`search_calibration.search_point`, the service's own rule), either one threshold for every probe or
one per mask state as the service decides (`search_calibration.state_points`). Masked photos and embeddings are cached
under the cache folder, keyed by the settings and the package id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mfr_ray.masking.held_out import MASKED_KINDS, UNMASKED, masked_kind
from mfr_ray.serve.package import EmbedResult, OperatingPoint
from mfr_ray.serve.search_calibration import points_as_dict, search_point, state_points

ENROLLED, NEVER_ENROLLED, CALIBRATION = "enrolled", "never_enrolled", "calibration"
OUTCOMES = ("match_right", "match_wrong", "unknown", "no_face")
MARGINS = (0.0, 0.03, 0.06, 0.1)  # best minus second-best identity score, for the margin rule's study
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
    """What the service says of one probe: its image status, the best gallery candidate and the probe's mask
    probability (which per-search threshold the service takes)."""

    probe: Probe
    status: str
    top_identity: str | None = None
    top_score: float | None = None
    rank1: bool = False  # the probe's own identity is the best candidate
    mask_probability: float | None = None
    second_score: float | None = None  # the second-best identity's score (the margin rule's study)


def one_threshold(point: OperatingPoint) -> dict[bool, OperatingPoint]:
    """The same point for masked and bare probes: a service with one threshold."""
    return {False: point, True: point}


def decide(answer: Answer, points: dict[bool, OperatingPoint]) -> str:
    """The service's per-search rule (`recognise.search_decision`: the probe's mask state picks the point,
    unsure the stricter) as an outcome: match_right, match_wrong, unknown, or no_face (no decision)."""
    from mfr_ray.serve.recognise import MATCH, Candidate, search_decision

    ok = answer.status == "ok"
    probe = EmbedResult(answer.status, "", np.zeros(1, np.float32) if ok else None, "", answer.mask_probability)
    candidates = [Candidate(answer.top_identity, answer.top_score, "", "")] if ok and answer.top_identity else []
    result = search_decision(points, points[False].far_target, probe, candidates, 0)
    if result.decision == MATCH:
        return "match_right" if result.identity == answer.probe.identity else "match_wrong"
    return "unknown" if ok else "no_face"


def tally(answers: list[Answer], points: dict[bool, OperatingPoint]) -> dict[str, int]:
    """Outcome counts (they add up to the probes)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for answer in answers:
        counts[decide(answer, points)] += 1
    return counts | {"probes": len(answers)}


def _select(answers: list[Answer], group: str, masked: bool | None = None, kind: str | None = None) -> list[Answer]:
    return [a for a in answers if a.probe.group == group and (masked is None or a.probe.masked == masked)
            and (kind is None or a.probe.kind == kind)]


def _calibration_faces(answers: list[Answer]) -> tuple[list[Answer], np.ndarray]:
    """The calibration probes with a face, and their mask probabilities (NaN: none)."""
    calib = [a for a in _select(answers, CALIBRATION) if a.status == "ok"]
    return calib, np.array([np.nan if a.mask_probability is None else a.mask_probability for a in calib])


def calibrate(answers: list[Answer], fpirs: Iterable[float], n_gallery: int) -> dict[str, dict]:
    """Per FPIR, the two rules from the calibration probes' best scores: `one threshold` (masked and bare
    pooled) and `per mask state` (the service's: `search_calibration.state_points`)."""
    calib, probabilities = _calibration_faces(answers)
    scores = np.array([a.top_score for a in calib], dtype=np.float64)
    label = f"CelebA-299, {len(calib)} never-enrolled probes (masked and not)"
    return {f"{fpir:g}": {"one threshold": one_threshold(search_point(scores, fpir, label)),
                          "per mask state": state_points(scores, probabilities, fpir, "CelebA-299", n_gallery)}
            for fpir in fpirs}


def _margin(answer: Answer) -> float:
    return np.inf if answer.second_score is None else answer.top_score - answer.second_score


def margin_study(answers: list[Answer], fpirs: Iterable[float], margins: Iterable[float], n_gallery: int) -> dict:
    """Would a margin rule (match only when the best identity leads the second by >= m) help? Per FPIR and m,
    the per-mask-state thresholds recalibrated for the combined rule (a calibration probe counts as accepted
    only when it passes both) and the outcome counts of enrolled masked and unmasked probes."""
    calib, probabilities = _calibration_faces(answers)
    rows = {"enrolled masked": _select(answers, ENROLLED, True), "enrolled unmasked": _select(answers, ENROLLED, False),
            "never enrolled": _select(answers, NEVER_ENROLLED)}
    out = {}
    for fpir in fpirs:
        for m in margins:
            scores = np.array([a.top_score if _margin(a) >= m else -np.inf for a in calib], dtype=np.float64)
            points = state_points(scores, probabilities, fpir, "CelebA-299 (margin rule)", n_gallery)
            out[f"{fpir:g} margin {m:g}"] = {name: tally([a if a.status != "ok" or _margin(a) >= m else
                                                          Answer(a.probe, "ok", mask_probability=a.mask_probability)
                                                          for a in group], points) for name, group in rows.items()}
    return out


def summarise(answers: list[Answer], rules: dict[str, dict], n_gallery: int) -> dict:
    """Rank-1 and, per FPIR and rule, outcome counts of each probe row (enrolled / never enrolled x unmasked /
    masked / each masked kind); the never-enrolled LFW probes' `match_wrong` measures the FPIR reached."""
    rows = {"enrolled masked": _select(answers, ENROLLED, True),
            "enrolled unmasked": _select(answers, ENROLLED, False),
            **{f"enrolled {k}": _select(answers, ENROLLED, kind=k) for k in MASKED_KINDS},
            "never enrolled masked": _select(answers, NEVER_ENROLLED, True),
            "never enrolled unmasked": _select(answers, NEVER_ENROLLED, False)}
    out = {"n_gallery": n_gallery, "rank1": {name: _rank1(rows[name]) for name in rows if name.startswith("enrolled")},
           "thresholds": {}, "counts": {}}
    for fpir, by_rule in rules.items():
        for rule, points in by_rule.items():
            out["thresholds"][f"{fpir} {rule}"] = points_as_dict(points)
            out["counts"][f"{fpir} {rule}"] = {name: tally(rows[name], points) for name in rows}
    out["margin_study"] = margin_study(answers, [float(f) for f in rules], MARGINS, n_gallery)
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
        best = search(result.embedding, 2)
        top = best[0] if best else None
        answers.append(Answer(probe, "ok", top and top.identity, top and top.score,
                              bool(top and top.identity == probe.identity), result.mask_probability,
                              best[1].score if len(best) > 1 else None))
    return answers


def format_table(summary: dict, label: str) -> str:
    """The README's table: rows of probes, per FPIR and rule match-right / match-wrong / unknown (+ no face)."""
    columns = list(summary["counts"])
    head = " | ".join(f"FPIR {float(c.split()[0]) * 100:g}%, {c.split(' ', 1)[1]}: right / wrong / unknown / no face"
                      for c in columns)
    lines = [f"{label}: gallery N = {summary['n_gallery']}",
             "| probes | n | rank-1 | " + head + " |", "|---" * (3 + len(columns)) + "|"]
    for name in summary["counts"][columns[0]]:
        n = summary["counts"][columns[0]][name]["probes"]
        rank1 = summary["rank1"].get(name)
        cells = []
        for column in columns:
            c = summary["counts"][column][name]
            cells.append(" / ".join(f"{c[k]} ({100 * c[k] / max(n, 1):.1f}%)" if k != "no_face" else str(c[k])
                                    for k in OUTCOMES))
        lines.append(f"| {name} | {n} | {'-' if rank1 is None else f'{100 * rank1:.1f}%'} | " + " | ".join(cells) + " |")
    thresholds = "; ".join(f"{column}: " + ", ".join(f"{state} {p['threshold']:.4f} (accepts {p['false_accepts']}/"
                                                      f"{p['n_impostor']})" for state, p in points.items())
                           for column, points in summary["thresholds"].items())
    return "\n".join(lines + [f"thresholds: {thresholds}"])


def format_margin_study(summary: dict) -> str:
    """One line per FPIR and margin: masked and unmasked enrolled probes right / wrong, strangers matched."""
    lines = ["| FPIR, margin | enrolled masked: right / wrong | enrolled unmasked: right / wrong | never enrolled: matched |",
             "|---|---|---|---|"]
    for key, rows in summary["margin_study"].items():
        cells = [" / ".join(f"{rows[r][k]} ({100 * rows[r][k] / max(rows[r]['probes'], 1):.1f}%)"
                            for k in ("match_right", "match_wrong")) for r in ("enrolled masked", "enrolled unmasked")]
        never = rows["never enrolled"]
        cells.append(f"{never['match_wrong']} ({100 * never['match_wrong'] / max(never['probes'], 1):.1f}%)")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
