"""1:1 verification and open-set 1:N identification at a calibrated false accept rate.

A decision is only made on faces: an image without one answers `no_face` (or why it could not be read),
never a score against a guessed box. Identification rejects (`unknown`) when the best gallery score is
below the threshold of the chosen FAR. Results are plain dataclasses (`dataclasses.asdict` gives the JSON
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

    @classmethod
    def of(cls, result: EmbedResult) -> ImageReport:
        return cls(result.status, result.reason, result.align_method)


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

    @property
    def same(self) -> bool:
        return self.decision == SAME


@dataclass
class Candidate:
    identity: str
    score: float
    template_id: str
    source_key: str


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


def _failure(results: list[EmbedResult], labels: tuple[str, ...]) -> str:
    return "; ".join(f"image {label}: {r.status} ({r.reason})" for label, r in zip(labels, results, strict=True)
                     if not r.ok)


def verify_decision(package: ModelPackage, point: OperatingPoint, far: float, a: EmbedResult,
                    b: EmbedResult) -> VerifyResult:
    """The one verification rule (CLI and service): same person when the score reaches the threshold."""
    images = [ImageReport.of(a), ImageReport.of(b)]
    if not (a.ok and b.ok):
        return VerifyResult(NO_DECISION, None, point.threshold, far, point.resolvable, images, _failure([a, b], ("A", "B")))
    score = package.score(a, b)
    decision = SAME if score >= point.threshold else DIFFERENT
    return VerifyResult(decision, score, point.threshold, far, point.resolvable, images)


def identify_decision(point: OperatingPoint, far: float, probe: EmbedResult,
                      candidates: list[Candidate]) -> IdentifyResult:
    """The one open-set rule (CLI and service): the best candidate if it reaches the threshold, else
    unknown."""
    image = ImageReport.of(probe)
    if not probe.ok:
        return IdentifyResult(NO_DECISION, None, None, point.threshold, far, point.resolvable, image,
                              reason=_failure([probe], ("probe",)))
    if not candidates:
        return IdentifyResult(UNKNOWN, None, None, point.threshold, far, point.resolvable, image, [],
                              "the gallery has no templates")
    best = candidates[0]
    if best.score < point.threshold:
        return IdentifyResult(UNKNOWN, None, best.score, point.threshold, far, point.resolvable, image, candidates,
                              f"best score {best.score:.4f} < threshold {point.threshold:.4f}: not enrolled")
    return IdentifyResult(MATCH, best.identity, best.score, point.threshold, far, point.resolvable, image, candidates)


def verify(package: ModelPackage, a_bytes: bytes, b_bytes: bytes, far: float) -> VerifyResult:
    """Are A and B the same person at false accept rate `far` (one of the package's calibrated FARs)?"""
    point = package.operating_point(far)
    a, b = package.embed_images([a_bytes, b_bytes])
    return verify_decision(package, point, far, a, b)


def identify(package: ModelPackage, gallery: Gallery, image_bytes: bytes, far: float, k: int = 5) -> IdentifyResult:
    """Who is this, among the gallery's enrolled identities, at false accept rate `far`? The top `k`
    identities come back as candidates either way."""
    gallery.check_package(package)
    point = package.operating_point(far)
    (probe,) = package.embed_images([image_bytes])
    matches = gallery.search_identities(probe.embedding, k) if probe.ok else []
    candidates = [Candidate(m.identity, m.score, m.template_id, m.source_key) for m in matches]
    return identify_decision(point, far, probe, candidates)
