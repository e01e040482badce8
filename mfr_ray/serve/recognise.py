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
from mfr_ray.serve.package import EmbedResult, ModelPackage, OperatingPoint

SAME, DIFFERENT = "same", "different"
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


def comparison_kinds(*faces: EmbedResult | None) -> set[str]:
    """The kinds a comparison of these faces may be (None: a gallery photo template, bare)."""
    from itertools import product

    from mfr_ray.evaluation.comparison_kinds import kind_of
    from mfr_ray.masking.presence import masked_states

    states = [masked_states(f.mask_probability) if f is not None else {False} for f in faces]
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
    far: float | None  # the per-comparison FAR decided at; None when decided at a per-search `fpir`
    far_resolvable: bool  # the rate decided at (FAR or FPIR) is measurable on its calibration set
    image: ImageReport
    candidates: list[Candidate] = field(default_factory=list)
    reason: str = ""
    comparison_kind: str = ""  # per comparison: unmasked-unmasked ...; per search: search-masked / -bare / -unsure
    kind_calibrated: bool = True
    promise: str = ""  # the rate the threshold was calibrated to keep, in words
    fpir: float | None = None  # the per-search false-positive identification rate decided at
    gallery_identities: int | None = None  # the gallery size a per-search threshold was calibrated for


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


def _match(result: IdentifyResult) -> IdentifyResult:
    """The open-set rule: the best candidate if it reaches the result's threshold, else unknown."""
    if result.candidates:
        best = result.candidates[0]
        result.score = best.score
        if best.score >= result.threshold:
            result.decision, result.identity, result.reason = MATCH, best.identity, ""
        else:
            result.reason = f"best score {best.score:.4f} < threshold {result.threshold:.4f}: not enrolled"
    return result


def identify_decision(package: ModelPackage, far: float, probe: EmbedResult,
                      candidates: list[Candidate]) -> IdentifyResult:
    """The one open-set rule at a per-comparison FAR (CLI and service): the best candidate if it reaches
    the threshold of the comparison's kind (the probe against photo templates), else unknown."""
    image = ImageReport.of(probe)
    if not probe.ok:
        point = package.operating_point(far)
        return IdentifyResult(NO_DECISION, None, None, point.threshold, far, point.resolvable, image,
                              reason=_failure([probe], ("probe",)))
    template = _template_face(candidates[0]) if candidates else None
    point, kind, calibrated = package.decision_point(far, comparison_kinds(probe, template))
    return _match(IdentifyResult(UNKNOWN, None, None, point.threshold, far, point.resolvable, image, candidates,
                                 "the gallery has no templates", kind, calibrated, _promise(far, kind, calibrated)))


def _search_promise(point: OperatingPoint, state: str) -> str:
    measured = (f"measured on {point.n_impostor} never-enrolled faces" if point.resolvable else
                f"not resolvable: only {point.n_impostor} never-enrolled faces, none of which it accepts")
    return (f"false-positive identification rate {point.far_target:g} per search for a {state} face: at most that "
            f"share of people never enrolled is answered match ({measured}; {point.calibration_set})")


def search_decision(points: dict[bool, OperatingPoint], fpir: float, probe: EmbedResult,
                    candidates: list[Candidate], identities: int) -> IdentifyResult:
    """The open-set rule at a per-search FPIR (`search_calibration`): the best candidate if it reaches the
    threshold calibrated against this gallery for faces like the probe (masked, bare; unsure: stricter)."""
    from mfr_ray.serve.search_calibration import decision_point

    point, state = decision_point(points, probe.mask_probability if probe.ok else None)
    if not probe.ok:
        return IdentifyResult(NO_DECISION, None, None, point.threshold, None, point.resolvable, ImageReport.of(probe),
                              reason=_failure([probe], ("probe",)), fpir=fpir, gallery_identities=identities)
    return _match(IdentifyResult(UNKNOWN, None, None, point.threshold, None, point.resolvable, ImageReport.of(probe),
                                 candidates, "the gallery has no templates", f"search-{state}", True,
                                 _search_promise(point, state), fpir, identities))


def verify(package: ModelPackage, a_bytes: bytes, b_bytes: bytes, far: float) -> VerifyResult:
    """Are A and B the same person at false accept rate `far` (one of the package's calibrated FARs)?"""
    package.operating_point(far)  # an uncalibrated FAR is refused before any image is embedded
    a, b = package.embed_images([a_bytes, b_bytes])
    return verify_decision(package, far, a, b)


def identify(package: ModelPackage, gallery: Gallery, image_bytes: bytes, far: float | None, k: int = 5,
             fpir: float | None = None) -> IdentifyResult:
    """Who is this, among the gallery's enrolled identities, at false accept rate `far` per comparison (one
    of the package's calibrated FARs) or, given `fpir`, at that per-search rate (the package's search
    calibration against this gallery)? The top `k` identities come back as candidates either way."""
    from mfr_ray.serve.search_calibration import SearchCalibration, gallery_points

    gallery.check_package(package)
    points, identities = (None, 0) if fpir is None else gallery_points(SearchCalibration.of(package), gallery, fpir)
    if points is None:
        package.operating_point(far)
    (probe,) = package.embed_images([image_bytes])
    matches = gallery.search_identities(probe.embedding, k) if probe.ok else []
    candidates = [Candidate(m.identity, m.score, m.template_id, m.source_key, m.template_kind) for m in matches]
    if points is None:
        return identify_decision(package, far, probe, candidates)
    return search_decision(points, fpir, probe, candidates, identities)
