"""The one read -> decode -> (mask) -> align path of the package: prepare's shards, evaluation's folder
crops (`evaluation.sources.FolderCropper`) and the service's photos all go through `read_decode_align`, so an
input gets the same status and reason in each."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np

from mfr_ray.faces.aligner import AlignResult, FaceAligner
from mfr_ray.imageio import Status, decode_image, join_reasons

# (bytes, "", "") of one input, or (None, status, reason) when there are none to decode.
ReadResult = tuple[bytes | None, str, str]


@dataclass
class FaceCrop:
    """What one input became on the read -> decode -> (mask) -> align path: its row's status, reason and
    align method ("none" where it never reached the aligner); `aligned` is the alignment when it gave a
    usable crop, else None."""

    status: str
    reason: str
    method: str
    aligned: AlignResult | None = None


def read_decode_align(
    keys: list[str],
    read: Callable[[str], ReadResult],
    aligner: FaceAligner,
    before_align: Callable[[np.ndarray, str], tuple[np.ndarray, str]] | None = None,
    timer: Callable[[str], AbstractContextManager] | None = None,
) -> list[FaceCrop]:
    """One FaceCrop per key, in order. `read(key)` gives the file's bytes or why there are none; they are
    decoded within the aligner's pixel budget; `before_align(frame, key)` may replace a decoded frame and
    add a note (evaluation masks the full frame there); the frames are aligned in one batch. A crop's
    reason joins the decode note, the note of `before_align` and the alignment's reason, in that order."""
    timer = timer or (lambda stage: nullcontext())
    crops: list[FaceCrop | None] = [None] * len(keys)
    frames, notes, slots = [], [], []
    for i, key in enumerate(keys):
        with timer("read"):
            data, status, reason = read(key)
        if data is None:
            crops[i] = FaceCrop(status, reason, "none")
            continue
        with timer("decode"):
            decoded = decode_image(data, max_pixels=aligner.config.max_pixels)
        if not decoded.ok:
            crops[i] = FaceCrop(decoded.status, decoded.reason, "none")
            continue
        frame, note = decoded.image, decoded.reason
        if before_align is not None:
            with timer("mask"):
                frame, extra = before_align(frame, key)
            note = join_reasons(note, extra)
        frames.append(frame)
        notes.append(note)
        slots.append(i)
    with timer("align"):
        results = align_each_on_failure(aligner, frames)
    for i, note, result in zip(slots, notes, results, strict=True):
        usable = result if result.usable else None
        crops[i] = FaceCrop(result.status, join_reasons(note, result.reason), result.method, usable)
    return crops  # type: ignore[return-value]


def align_each_on_failure(aligner: FaceAligner, images: list[np.ndarray]) -> list[AlignResult]:
    """Batched alignment; if the batch raises, align one by one so only the culprit fails."""
    try:
        return aligner.align_batch(images)
    except Exception:  # noqa: BLE001 - one bad image must not fail its batch
        results = []
        for image in images:
            try:
                results.append(aligner.align(image))
            except Exception as exc:  # noqa: BLE001 - becomes this image's status
                results.append(
                    AlignResult(None, "none", status=Status.UNSUPPORTED, reason=f"alignment failed: {exc!r}")
                )
        return results
