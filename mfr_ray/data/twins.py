"""The masked twins of an aligned training image, cut the way `AlignConfig.masked_twin` says.

At test time a masked face is aligned from landmarks found on the masked image, and masks move them
(MTCNN's mouth and nose points most). `reuse` paints the mask on the unmasked crop, so training never
sees that; `detect` masks the full frame and aligns the masked frame itself; `jitter` moves the unmasked
crop by a random similarity of the size masks cause, then paints the mask on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mfr_ray.faces.aligner import AlignResult, FaceAligner
from mfr_ray.faces.geometry import jitter_matrix, warp_with


@dataclass
class MaskedTwin:
    """One masked copy: `result` is the mask engine's result with `image` the masked crop; `align_method`
    is what placed the crop; `reason` says where the crop did not come from the configured way."""

    result: object  # mfr_ray.masking.MaskResult
    align_method: str
    reason: str = ""


def masked_twins(aligner: FaceAligner, engine, aligned: AlignResult, requests: list[tuple[str, str | None]]):
    """One MaskedTwin per (key, mask_type) request for the usable alignment `aligned`."""
    mode = aligner.config.masked_twin
    if mode == "detect" and aligned.frame is not None and aligned.matrix is not None:
        return _detected(aligner, engine, aligned, requests)
    if mode == "jitter" and aligned.frame is not None and aligned.matrix is not None:
        return [_jittered(aligner, engine, aligned, request) for request in requests]
    return [MaskedTwin(r, aligned.method) for r in engine.mask_copies(aligned.crop, requests, aligned=True)]


def _detected(aligner: FaceAligner, engine, aligned: AlignResult, requests) -> list[MaskedTwin]:
    """Mask the full frame, then align the masked frame; where the aligner finds no face on it, crop it
    with the unmasked landmarks, and where the frame cannot be masked, paint the unmasked crop."""
    crop = aligner.config.crop
    masked = engine.mask_copies(aligned.frame, requests, aligned=False)
    painted = [i for i, r in enumerate(masked) if r.image is not None and r.record.status == "ok"]
    realigned = dict(zip(painted, aligner.align_batch([masked[i].image for i in painted]), strict=True))
    twins = []
    for i, (request, result) in enumerate(zip(requests, masked, strict=True)):
        if i not in realigned:
            (fallback,) = engine.mask_copies(aligned.crop, [request], aligned=True)
            note = f"full-frame masking failed ({result.record.status}: {result.record.reason}); masked the crop"
            twins.append(MaskedTwin(fallback, aligned.method, note))
        elif realigned[i].status == "ok":
            twins.append(MaskedTwin(replace(result, image=realigned[i].crop, alpha=None), realigned[i].method))
        else:
            image = warp_with(result.image, aligned.matrix, crop)
            note = f"masked frame: {realigned[i].reason or realigned[i].status}; cropped with the unmasked landmarks"
            twins.append(MaskedTwin(replace(result, image=image, alpha=None), aligned.method, note))
    return twins


def _jittered(aligner: FaceAligner, engine, aligned: AlignResult, request) -> MaskedTwin:
    """The frame warped with the unmasked transform moved by this copy key's jitter, then masked."""
    crop = aligner.config.crop
    image = warp_with(aligned.frame, jitter_matrix(aligned.matrix, aligner.config, crop, request[0]), crop)
    (result,) = engine.mask_copies(image, [request], aligned=True)
    return MaskedTwin(result, aligned.method)
