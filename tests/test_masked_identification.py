"""The masked-identification benchmark (issue 24): hand-worked counts and thresholds on made-up answers, then a
tiny real run (a few LFW people, real faces, held-out masks drawn on the full photo, in process) whose
counts add up, whose never-enrolled probes can only be false matches or unknown, and whose thresholds are
the quantile of the calibration probes' best scores computed by hand; the same run over HTTP through
`mfr serve` gives the same decisions (slow)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mfr_ray.evaluation.masked_identification import (
    CALIBRATION,
    ENROLLED,
    NEVER_ENROLLED,
    OUTCOMES,
    UNMASKED,
    Answer,
    BenchSettings,
    Probe,
    decide,
    one_threshold,
    plan_benchmark,
    tally,
)
from mfr_ray.serve.package import OperatingPoint
from mfr_ray.serve.search_calibration import search_point

ENROLLED_PEOPLE = ("Aaron_Peirsol", "Abdullah_Gul", "Adam_Sandler")  # 3+ photos each
SINGLE_PEOPLE = ("Aaron_Eckhart", "Aaron_Guiel")  # one photo each
CELEBA_IDS = 6


def answer(group: str, identity: str, top: str | None, score: float | None, status: str = "ok",
           mask_probability: float | None = 0.0) -> Answer:
    return Answer(Probe(group, identity, f"{identity}_0002.jpg", UNMASKED), status, top, score, top == identity,
                  mask_probability)


def at(threshold: float) -> OperatingPoint:
    return OperatingPoint(0.01, threshold, 0.0, float("nan"), 0, 100, 0, True, "hand")


def test_hand_worked_outcomes_and_fpir_threshold():
    answers = [answer(ENROLLED, "a", "a", 0.9), answer(ENROLLED, "a", "b", 0.8), answer(ENROLLED, "b", "b", 0.2),
               answer(ENROLLED, "b", None, None, "no_face"), answer(NEVER_ENROLLED, "z", "a", 0.7),
               answer(NEVER_ENROLLED, "y", "b", 0.1)]
    assert [decide(a, one_threshold(at(0.5))) for a in answers] == ["match_right", "match_wrong", "unknown",
                                                                    "no_face", "match_wrong", "unknown"]
    counts = tally(answers[:4], one_threshold(at(0.5)))
    assert counts == {"match_right": 1, "match_wrong": 1, "unknown": 1, "no_face": 1, "probes": 4}
    # 200 never-enrolled best scores 0.000 .. 0.199: FPIR 1% lets 2 through, 0.1% none
    scores = np.arange(200) / 1000.0
    at_1, at_01 = (search_point(scores, fpir, "hand") for fpir in (0.01, 0.001))
    assert at_1.threshold == np.nextafter(0.197, np.inf) and at_1.false_accepts == 2 and at_1.resolvable
    assert at_01.threshold == np.nextafter(0.199, np.inf) and at_01.false_accepts == 0 and not at_01.resolvable


def test_each_probe_is_judged_by_its_mask_state():
    """Per mask state: bare probes at 0.5, masked at 0.7; a probe the classifier is unsure of (0.3 < p < 0.7,
    or no probability) takes the stricter."""
    points = {False: at(0.5), True: at(0.7)}
    bare, masked, unsure = (answer(ENROLLED, "a", "a", 0.6, mask_probability=p) for p in (0.1, 0.9, 0.5))
    assert [decide(a, points) for a in (bare, masked, unsure)] == ["match_right", "unknown", "unknown"]
    assert decide(answer(ENROLLED, "a", "a", 0.75, mask_probability=None), points) == "match_right"


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory, lfw_dir, celeba_dir) -> tuple[Path, Path]:
    """A handful of LFW people (3 enrolled with 3+ photos, 2 with one photo) and 6 CelebA identities."""
    root = tmp_path_factory.mktemp("mib")
    for name in ENROLLED_PEOPLE + SINGLE_PEOPLE:
        shutil.copytree(lfw_dir / name, root / "lfw" / name)
    for folder in sorted(p for p in celeba_dir.iterdir() if p.is_dir())[:CELEBA_IDS]:
        (root / "celeba" / folder.name).mkdir(parents=True)
        first = min(folder.iterdir())
        shutil.copyfile(first, root / "celeba" / folder.name / first.name)
    return root / "lfw", root / "celeba"


SETTINGS = BenchSettings(probes_per_person=2, calibration_per_identity=1)


def test_plan_keeps_every_group_apart(tiny_sets):
    plan = plan_benchmark(*tiny_sets, SETTINGS)
    assert sorted(plan.gallery) == sorted(ENROLLED_PEOPLE)
    assert all(Path(plan.gallery[n]).name == f"{n}_0001.jpg" for n in ENROLLED_PEOPLE)
    assert len(plan.of(ENROLLED)) == 2 * 2 * len(ENROLLED_PEOPLE)  # 2 photos, each unmasked and masked
    assert {p.identity for p in plan.of(NEVER_ENROLLED)} == set(SINGLE_PEOPLE)
    assert len(plan.of(CALIBRATION)) == 2 * CELEBA_IDS
    assert not {p.source for p in plan.probes} & set(plan.gallery.values())


@pytest.fixture(scope="module")
def in_process(ray_local, tiny_sets, shared, tmp_path_factory):
    from mfr_ray.evaluation.masked_bench import run_benchmark

    cache = tmp_path_factory.mktemp("mib-cache")
    ckpt = str(shared / "weights" / "mobilefacenet_casia.ckpt")
    (summary,) = run_benchmark([ckpt], *map(str, tiny_sets), cache, SETTINGS, workers=1)
    return summary, cache, ckpt


def test_tiny_run_counts_add_up(in_process):
    summary, _, _ = in_process
    assert summary["n_gallery"] == len(ENROLLED_PEOPLE)
    for fpir, rows in summary["counts"].items():
        assert rows["enrolled masked"]["probes"] == rows["enrolled unmasked"]["probes"] == 2 * len(ENROLLED_PEOPLE)
        for name, counts in rows.items():
            assert sum(counts[k] for k in OUTCOMES) == counts["probes"], (fpir, name)
        for name in ("never enrolled masked", "never enrolled unmasked"):
            assert rows[name]["match_right"] == 0  # nobody to be right about
        assert rows["enrolled unmasked"]["no_face"] == 0
    assert summary["rank1"]["enrolled unmasked"] == 1.0  # real faces, 3 people: the control is easy
    for fpir in SETTINGS.fpirs:  # a margin of 0 passes every probe: the margin study's counts are the service rule's
        study, rule = summary["margin_study"][f"{fpir:g} margin 0"], summary["counts"][f"{fpir:g} per mask state"]
        assert study["enrolled masked"] == rule["enrolled masked"] and study["enrolled unmasked"] == rule["enrolled unmasked"]


def test_thresholds_are_the_calibration_quantile_by_hand(in_process):
    """Redo the calibration from the cached embeddings: the best cosine of each CelebA probe against the
    enrolled embeddings, the floor(FPIR * n)-th highest, just above it - over every probe for one threshold,
    over the probes each mask state admits for the service's rule."""
    from mfr_ray.evaluation.masked_bench import embed_files, package_for, probe_file
    from mfr_ray.masking.presence import masked_states
    from mfr_ray.serve.package import load_package

    summary, cache, ckpt = in_process
    package = load_package(package_for(ckpt, cache))
    gallery_files = sorted(str(p) for p in (cache / f"gallery-photos-{SETTINGS.key()}").rglob("*.jpg"))
    gallery = np.stack([r.embedding for r in embed_files(package, gallery_files, cache, 1)])
    calib = [Probe(CALIBRATION, i, s, k) for i, s, k in summary["calibration_probes"]]
    files = [probe_file(cache, SETTINGS, p) for p in calib]
    faces = [r for r in embed_files(package, [f for f in files if f], cache, 1) if r.ok]
    best = [(float((gallery @ r.embedding).max()), masked_states(r.mask_probability)) for r in faces]
    for column, points in summary["thresholds"].items():
        fpir, rule = float(column.split()[0]), column.split(" ", 1)[1]
        for state, point in points.items():
            scores = [b for b, states in best if rule == "one threshold" or (state == "masked") in states]
            ranked = sorted(scores, reverse=True)
            allowed = int(np.floor(fpir * len(ranked) + 1e-9))
            expected = -np.inf if allowed >= len(ranked) else np.nextafter(ranked[allowed], np.inf)
            assert point["threshold"] == pytest.approx(expected, abs=1e-5), (column, state)
            assert point["n_impostor"] == len(ranked)
    assert any(states == {True} for _, states in best) and any(states == {False} for _, states in best)


@pytest.mark.slow
def test_http_gives_the_same_decisions(in_process, tiny_sets):
    """The LFW probes sent to /identify of `mfr serve` deciding at FPIR 1% with the calibration probes as the
    package's search calibration: the service computes its own per-mask-state thresholds, and its decisions
    equal the benchmark's rule on the score and mask probability it returns; the counts are the in-process
    run's (within one probe on the threshold)."""
    from mfr_ray.evaluation.masked_bench import run_benchmark

    summary, cache, ckpt = in_process
    (over_http,) = run_benchmark([ckpt], *map(str, tiny_sets), cache, SETTINGS, workers=1, http=True)
    agreement = over_http["service_agreement"]
    assert agreement["agree"] == agreement["probes"] > 0
    assert over_http["rank1"] == summary["rank1"]
    for fpir, rows in summary["counts"].items():  # a score on the threshold may move by batching noise
        for name, counts in rows.items():
            assert all(abs(over_http["counts"][fpir][name][k] - counts[k]) <= 1 for k in counts), (fpir, name)
