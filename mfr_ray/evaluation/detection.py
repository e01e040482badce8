"""How well the service's detector chain finds faces: the share of photos that give an `ok` face (masked
probes, bare photos, and non-faces, where every `ok` is a false face), and how far MTCNN's five points move
when the same photo is masked. Images go through `read_decode_align` as encoded bytes, as `/identify`'s do.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mfr_ray.faces.aligner import FaceAligner
from mfr_ray.faces.geometry import LANDMARK_NAMES
from mfr_ray.faces.reading import FaceCrop, read_decode_align
from mfr_ray.imageio import Status


@dataclass
class DetectionCount:
    """Files in, `ok` faces out, and how each `ok` face was found (`methods`)."""

    files: int = 0
    found: int = 0
    methods: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.found / self.files if self.files else 0.0

    def line(self) -> str:
        methods = ", ".join(f"{m} {n}" for m, n in sorted(self.methods.items()))
        return f"{self.found}/{self.files} ({100 * self.rate:.1f}%){' [' + methods + ']' if methods else ''}"


def detect_all(aligner: FaceAligner, images: list[bytes], chunk: int = 64) -> list[FaceCrop]:
    """One FaceCrop per encoded image, in order (the service's read -> decode -> align path)."""
    keys, crops = [str(i) for i in range(len(images))], []
    for start in range(0, len(images), chunk):
        crops += read_decode_align(keys[start : start + chunk], lambda key: (images[int(key)], "", ""), aligner)
    return crops


def count(crops: list[FaceCrop]) -> DetectionCount:
    """Files in = rows out: every crop is counted under its status; only `ok` ones are faces found."""
    result = DetectionCount(files=len(crops))
    for crop in crops:
        result.statuses[crop.status] += 1
        if crop.status == Status.OK:
            result.found += 1
            result.methods[crop.method] += 1
    return result


def landmark_shift(bare: FaceCrop, masked: FaceCrop) -> np.ndarray | None:
    """Distance of each of the five points on the masked photo from the same point on the bare photo, in
    the bare face's inter-ocular distances; None unless MTCNN placed both (dlib's points are another
    model's)."""
    if bare.aligned is None or masked.aligned is None or {bare.method, masked.method} != {"mtcnn"}:
        return None
    before, after = np.asarray(bare.aligned.landmarks), np.asarray(masked.aligned.landmarks)
    return np.linalg.norm(after - before, axis=1) / np.linalg.norm(before[1] - before[0])


def shift_summary(shifts: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per landmark: (median, 90th percentile) shift in inter-ocular distances."""
    stacked = np.stack(shifts)
    return {name: (float(np.median(stacked[:, i])), float(np.percentile(stacked[:, i], 90)))
            for i, name in enumerate(LANDMARK_NAMES)}
