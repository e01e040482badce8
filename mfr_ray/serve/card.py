"""A package's MODEL_CARD.md: what it is, how it sees a face, where its thresholds hold."""

from __future__ import annotations

import json

from mfr_ray.models.backbone_config import Normalisation
from mfr_ray.serve.package import CENTRE_FALLBACK

SEARCH_CARD_HEADING = "## Per-search rates (identification)"


def _kinds_card(kinds: dict) -> list[str]:
    """The model card's thresholds per kind of comparison, each with the set it was measured on."""
    if len(kinds) <= 1:
        return ["", ("Only bare pairs were calibrated: a masked face is judged by the strictest threshold above "
                     "and answers say `kind_calibrated: false`. Export from an evaluation with masked variants "
                     "aligned as deployed to calibrate masked-unmasked and masked-masked comparisons.")]
    lines = ["", "### Per kind of comparison", "",
             ("The service judges each face masked or bare (the packaged mask-presence classifier: masked at "
              "p >= 0.7, bare at p <= 0.3, else unsure) and uses the threshold of the comparison's kind; "
              "unsure, the stricter of the kinds it could be."), "",
             "| kind | FAR target | threshold | FAR measured | TPR measured | impostor pairs | resolvable | set |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, entry in kinds.items():
        for p in entry["operating_points"]:
            lines.append(f"| {kind} | {p['far_target']:g} | {p['threshold']:.4f} | {p['far']:.5f} | {p['tpr']:.4f} "
                         f"| {p['n_impostor']} | {'yes' if p['resolvable'] else '**no**'} | {p['calibration_set']} |")
    return lines


def model_card(spec: dict) -> str:
    """The package's MODEL_CARD.md: what it is, how it sees a face, where its thresholds hold."""
    pre = spec["preprocessing"]
    pixels = Normalisation.from_package(pre)
    lines = [f"# Model card: {spec['model']}", "",
             f"- backbone: `{spec['backbone']}` {json.dumps(spec['kwargs'])}; embedding size {spec['embedding_size']}",
             f"- package id: `{spec['package_id']}` (weights, their ONNX export + preprocessing)",
             (f"- inference runtime: `{spec.get('runtime', 'default')}` (`mfr serve|enrol|verify|identify "
              "--runtime` choose another)"),
             (f"- preprocessing: alignment `{pre['align']['crop']}` crop (MTCNN 5 points, fallbacks "
             f"{[f for f in pre['align']['fallbacks'] if f != CENTRE_FALLBACK] or 'none'}, landmark fit "
             f"`{pre['align']['landmark_fit']}`), pixels (x - {pixels.pixel_mean}) / {pixels.pixel_scale}, RGB; flip "
             f"{'on' if pre['flip'] else 'off'}, feature `{pre['feature']}`"),
             f"- no face: {pre['no_face']}", ""]
    calibration = spec.get("calibration")
    if not calibration:
        lines += ["## Thresholds", "", "None: exported without an evaluation run (`mfr export ... --eval-run RUN`)."]
        return "\n".join(lines + search_card(spec)) + "\n"
    lines += ["## Thresholds", "",
              (f"Calibrated on evaluation run `{calibration['eval_run']}` ({calibration['evaluation']}): "
              f"`{calibration['pairs_file']}`, variant `{calibration['variant']}`, protocol "
              f"`{calibration['protocol']}`, {calibration['n_pairs']} pairs. {calibration['score']}."), "",
              "| FAR target | threshold | FAR measured | TPR measured | false accepts | impostor pairs | resolvable |",
              "|---|---|---|---|---|---|---|"]
    for p in calibration["operating_points"]:
        lines.append(f"| {p['far_target']:g} | {p['threshold']:.4f} | {p['far']:.5f} | {p['tpr']:.4f} | "
                     f"{p['false_accepts']} | {p['n_impostor']} | {'yes' if p['resolvable'] else '**no**'} |")
    lines += _kinds_card(calibration.get("kinds", {}))
    lines += ["", ("Thresholds and rates are measured on the same pairs (in-sample); the evaluation report has "
              "the held-out k-fold figures. A FAR marked **no** is below 1 / impostor pairs: the set cannot "
              "show that FAR, only that no impostor got through; calibrate on a larger set before relying on it."),
              "", "## Intended use", "",
              ("1:1 verification and open-set 1:N identification of cooperative, frontal faces, masked or not, "
              "at the FARs above. Not for surveillance of people who have not enrolled. Check the evaluation's "
              "mask-pair table for the masks your users wear.")]
    return "\n".join(lines + search_card(spec)) + "\n"


def search_card(spec: dict) -> list[str]:
    """The model card's per-search operating points: what they are calibrated on and how."""
    search = spec.get("search_calibration")
    if not search:
        return ["", SEARCH_CARD_HEADING, "",
                ("None: `/identify?fpir=` is refused. Add never-enrolled calibration faces with `mfr export ... "
                 "--search-calibration FOLDER` to decide searches at a false-positive identification rate.")]
    return ["", SEARCH_CARD_HEADING, "",
            (f"`/identify?fpir=F` (or `mfr serve --fpir F`) decides a search at a per-search false-positive "
             f"identification rate F: the share of people never enrolled who are answered `match`. Calibrated on "
             f"{search['faces']} never-enrolled faces ({search['calibration_set']}; {search['masked']} judged masked "
             f"or unsure, {search['bare']} bare or unsure; by mask: {json.dumps(search['faces_by_mask'])}). "
             f"Rule: {search['rule']}. A rate below 1 / faces of a state is not resolvable: answers say so.")]
