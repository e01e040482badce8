"""Checks that a placed mask is plausible, measured against 68 landmarks, plus the LFW sample the tests
and the benchmark share."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfr_ray.paths import shared_dir

MUST_COVER = {"nose_tip": [30], "mouth_corners": [48, 54], "chin": [8]}
MUST_NOT_COVER = {"eyes": list(range(36, 48))}


@dataclass
class Coverage:
    ok: bool
    failures: list[str]


def coverage_check(
    alpha: np.ndarray, landmarks: np.ndarray, threshold: int = 128, style: str = ""
) -> Coverage:
    """A mask is well placed when its alpha (uint8 HxW) covers the nose tip, both mouth corners and the
    chin landmark and leaves every eye landmark uncovered. Landmarks outside the image (a chin cut off by
    a tight aligned crop) are not judged. `style` (the record's JSON): a mask worn with the chin exposed
    must leave the chin landmark free instead of covering it."""
    chin_exposed = bool(style) and json.loads(style).get("coverage") == "chin_exposed"
    h, w = alpha.shape
    points = np.round(landmarks).astype(int)
    inside = (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)

    def covered(index: int) -> bool:
        return bool(alpha[points[index, 1], points[index, 0]] >= threshold)

    failures = [
        f"{name} not covered"
        for name, idx in MUST_COVER.items()
        if not (chin_exposed and name == "chin") and not all(covered(i) for i in idx if inside[i])
    ]
    if chin_exposed and inside[8] and covered(8):
        failures.append("chin covered (style chin_exposed)")
    failures += [
        f"{name} covered" for name, idx in MUST_NOT_COVER.items() if any(covered(i) for i in idx if inside[i])
    ]
    return Coverage(not failures, failures)


def lfw_files(count: int, seed: int = 0) -> list[Path]:
    """A reproducible random sample of LFW deep-funneled images from the shared folder."""
    root = shared_dir() / "datasets" / "lfw" / "lfw-deepfunneled"
    files = sorted(root.glob("*/*.jpg"))
    if not files:
        raise FileNotFoundError(f"no LFW images under {root}")
    random.Random(seed).shuffle(files)
    return files[:count]


def lfw_key(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"
