"""1:1 verification and open-set 1:N identification at a calibrated false accept rate.

A decision is only made on faces: an image without one answers `no_face` (or why it could not be read),
never a score against a guessed box. Identification rejects (`unknown`) when the best gallery score is
below the threshold of the chosen FAR. The threshold is the one calibrated for the kind of comparison -
both faces bare, one masked, both masked - that the mask-presence classifier sees; when it is unsure, the
stricter of the kinds it could be. Results are plain dataclasses (`dataclasses.asdict` gives the JSON
the CLI prints and the service returns).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mfr_ray.serve.gallery import Gallery
from mfr_ray.serve.package import EmbedResult, ModelPackage

SAME, DIFFERENT = "same", "different"
MASKED_FROM, BARE_UNTIL = 0.7, 0.3  # mask probability: masked at or above, bare at or below, else unsure
MATCH, UNKNOWN = "match", "unknown"
NO_DECISION = "no_decision"


@dataclass
class ImageReport:
    """How one input image went: `ok`, or its status (no_face, decode_error, too_large, unsupported)."""

    status: str
    reason: str
    align_method: str
    mask_probability: float | None = None

    @classmethod
    def of(cls, result: EmbedResult) -> ImageReport:
        return cls(result.status, result.reason, result.align_method, result.mask_probability)


def masked_states(result: EmbedResult) -> set[bool]:
    """Whether the face is masked: {True}, {False}, or both when the classifier is unsure."""
    p = result.mask_probability
    if p is None:
        return {False, True}
    return {True} if p >= MASKED_FROM else {False} if p <= BARE_UNTIL else {False, True}


def comparison_kinds(*faces: EmbedResult | None) -> set[str]:
    """The kinds a comparison of these faces may be (None: a gallery photo template, bare)."""
    from itertools import product

    from mfr_ray.evaluation.comparison_kinds import kind_of

    states = [masked_states(f) if f is not None else {False} for f in faces]
    return {kind_of(list(combo)) for combo in product(*states)}


@dataclass
class VerifyResult:
    """`decision` is same / different, or no_decision when an image has no usable face (see `images`)."""

    decision: str
    score: float | None
    threshold: float
    far: float
    far_resolvable: bool
    images: list[ImageReport]
    reason: str = ""
    comparison_kind: str = ""  # whose calibrated threshold decided: unmasked-unmasked, masked-unmasked, ...
    kind_calibrated: bool = True  # False: that kind has no calibration; the strictest calibrated one was used

    @property
    def same(self) -> bool:
        return self.decision == SAME


@dataclass
class Candidate:
    identity: str
    score: float
    template_id: str
    source_key: str
    template_kind: str = "photo"  # or synthetic:<mask type>: a masked copy of an enrolment photo


@dataclass
class IdentifyResult:
    """`decision` is match (identity set), unknown (best score below the threshold: open-set rejection) or
    no_decision (no usable face in the probe); `candidates` are the top k identities, best first."""

    decision: str
    identity: str | None
    score: float | None
    threshold: float
    far: float
    far_resolvable: bool
    image: ImageReport
    candidates: list[Candidate] = field(default_factory=list)
    reason: str = ""
    comparison_kind: str = ""
    kind_calibrated: bool = True
    promise: str = ""  # the rate the threshold was calibrated to keep, in words


def _failure(results: list[EmbedResult], labels: tuple[str, ...]) -> str:
    return "; ".join(f"image {label}: {r.status} ({r.reason})" for label, r in zip(labels, results, strict=True)
                     if not r.ok)


def verify_decision(package: ModelPackage, far: float, a: EmbedResult, b: EmbedResult) -> VerifyResult:
    """The one verification rule (CLI and service): same person when the score reaches the threshold of
    the comparison's kind."""
    images = [ImageReport.of(a), ImageReport.of(b)]
    if not (a.ok and b.ok):
        point = package.operating_point(far)
        return VerifyResult(NO_DECISION, None, point.threshold, far, point.resolvable, images,
                            _failure([a, b], ("A", "B")))
    point, kind, calibrated = package.decision_point(far, comparison_kinds(a, b))
    score = package.score(a, b)
    decision = SAME if score >= point.threshold else DIFFERENT
    return VerifyResult(decision, score, point.threshold, far, point.resolvable, images, "", kind, calibrated)


def _promise(far: float, kind: str, calibrated: bool) -> str:
    """What the threshold promises, said plainly: a per-comparison rate, not a per-search one."""
    measured = f"measured on {kind} pairs" if calibrated else f"{kind} pairs not calibrated: the strictest threshold"
    return (f"false accept rate {far:g} per comparison ({measured}); a search compares the probe with every "
            "enrolled identity, so a wrong match per search is more likely than that")


def _template_face(candidate: Candidate) -> EmbedResult | None:
    """The best template as a face for `comparison_kinds`: a synthetic one is masked, a photo bare (None)."""
    from mfr_ray.serve.synthetic import is_masked_kind

    return EmbedResult("ok", "", None, "", 1.0) if is_masked_kind(candidate.template_kind) else None


def identify_decision(package: ModelPackage, far: float, probe: EmbedResult,
                      candidates: list[Candidate]) -> IdentifyResult:
    """The one open-set rule (CLI and service): the best candidate if it reaches the threshold of the
    comparison's kind (the probe against photo templates), else unknown."""
    image = ImageReport.of(probe)
    if not probe.ok:
        point = package.operating_point(far)
        return IdentifyResult(NO_DECISION, None, None, point.threshold, far, point.resolvable, image,
                              reason=_failure([probe], ("probe",)))
    template = _template_face(candidates[0]) if candidates else None
    point, kind, calibrated = package.decision_point(far, comparison_kinds(probe, template))
    result = IdentifyResult(UNKNOWN, None, None, point.threshold, far, point.resolvable, image, candidates,
                            "the gallery has no templates", kind, calibrated, _promise(far, kind, calibrated))
    if candidates:
        best = candidates[0]
        result.score = best.score
        if best.score >= point.threshold:
            result.decision, result.identity, result.reason = MATCH, best.identity, ""
        else:
            result.reason = f"best score {best.score:.4f} < threshold {point.threshold:.4f}: not enrolled"
    return result


def verify(package: ModelPackage, a_bytes: bytes, b_bytes: bytes, far: float) -> VerifyResult:
    """Are A and B the same person at false accept rate `far` (one of the package's calibrated FARs)?"""
    package.operating_point(far)  # an uncalibrated FAR is refused before any image is embedded
    a, b = package.embed_images([a_bytes, b_bytes])
    return verify_decision(package, far, a, b)


def identify(package: ModelPackage, gallery: Gallery, image_bytes: bytes, far: float, k: int = 5) -> IdentifyResult:
    """Who is this, among the gallery's enrolled identities, at false accept rate `far`? The top `k`
    identities come back as candidates either way."""
    gallery.check_package(package)
    package.operating_point(far)
    (probe,) = package.embed_images([image_bytes])
    matches = gallery.search_identities(probe.embedding, k) if probe.ok else []
    candidates = [Candidate(m.identity, m.score, m.template_id, m.source_key, m.template_kind) for m in matches]
    return identify_decision(package, far, probe, candidates)
