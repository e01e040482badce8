"""A real non-face set: crops cut from the shared LFW and CelebA-299 frames away from the face, the
backgrounds, borders, hair, clothes, hands and objects around a portrait, never the face itself.

A service that accepts a non-face as a face compares it with the gallery; this set measures how often the
detector chain does that. Both datasets frame one face in the centre of a 250x250 image, so a crop that
stays out of `FACE_ZONE` shows no part of that face (another person in the background can still appear:
the benchmark lists what the chain accepts, to be looked at; `BACKGROUND_FACES` are those). The set is drawn from a seed, so the
tests and `benchmarks/bench_detect_masked.py` use the same crops.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfr_ray.paths import shared_dir

FRAME = 250
# Kept out of every crop (l, t, r, b on the 250x250 frame): LFW's mean MTCNN face box (77.6, 64.4, 170.8,
# 188.6) grown by about 12 px on each side; CelebA-299's box (68-182 square, README) lies inside it.
FACE_ZONE = (65, 50, 185, 200)
CROP_SIDES = (40, 64)  # crop side range in frame pixels
OUTPUT_SIDE = 160  # crops are enlarged to a photo-like size, so their content is at a face's scale
MIN_CONTRAST = 10.0  # grey-level std below this is a flat patch (black fill, blank wall): redrawn
# Crops the service's detector chain accepted that, looked at, show the whole face of someone behind the
# portrait's subject: faces, not non-faces, so they are left out (the next frame's crop takes the place).
BACKGROUND_FACES = frozenset({"lfw-deepfunneled/Rudolph_Giuliani/Rudolph_Giuliani_0025.jpg@186,108,243,165"})


@dataclass(frozen=True)
class NonFace:
    """One non-face image: `key` names it (source file and crop box), `region` where the crop lies."""

    key: str
    region: str
    image: np.ndarray  # RGB uint8, OUTPUT_SIDE square


def region_of(box: tuple[int, int, int, int]) -> str:
    """Where a crop lies around the face zone: top/bottom/left/right, or a corner (both)."""
    left, top, right, bottom = box
    zl, zt, zr, zb = FACE_ZONE
    vertical = "top" if bottom <= zt else "bottom" if top >= zb else ""
    horizontal = "left" if right <= zl else "right" if left >= zr else ""
    return "_".join(filter(None, [vertical, horizontal]))


def _outside_zone(box: tuple[int, int, int, int]) -> bool:
    left, top, right, bottom = box
    zl, zt, zr, zb = FACE_ZONE
    return right <= zl or left >= zr or bottom <= zt or top >= zb


def _crop(frame: np.ndarray, rng: random.Random, tries: int = 50) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """A textured square crop of `frame` outside FACE_ZONE, enlarged to OUTPUT_SIDE; None if none is found."""
    import cv2

    for _ in range(tries):
        side = rng.randint(*CROP_SIDES)
        x, y = rng.randint(0, FRAME - side), rng.randint(0, FRAME - side)
        box = (x, y, x + side, y + side)
        patch = frame[y : y + side, x : x + side]
        if _outside_zone(box) and cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY).std() >= MIN_CONTRAST:
            return box, cv2.resize(patch, (OUTPUT_SIDE, OUTPUT_SIDE), interpolation=cv2.INTER_CUBIC)
    return None


def _sources() -> tuple[list[Path], list[Path]]:
    """Every LFW frame and every CelebA-299 frame without black fill (its README's `padded` = 0)."""
    root = shared_dir() / "datasets"
    lfw = sorted((root / "lfw" / "lfw-deepfunneled").glob("*/*.jpg"))
    with open(root / "celeba299" / "sources.csv", newline="") as handle:
        celeba = sorted(root / "celeba299" / row["relative_path"] for row in csv.DictReader(handle) if row["padded"] == "0")
    if not lfw or not celeba:
        raise FileNotFoundError(f"no LFW or CelebA-299 frames under {root}")
    return lfw, celeba


def _cut(paths: list[Path], count: int, rng: random.Random) -> list[NonFace]:
    """One crop from each of `count` frames drawn from `paths` (frames without a textured crop skipped)."""
    from mfr_ray.imageio import read_image_file

    found: list[NonFace] = []
    for path in rng.sample(paths, min(len(paths), 2 * count)):
        cropped = _crop(read_image_file(path).image, rng)
        if cropped is not None:
            box, image = cropped
            key = f"{path.parent.parent.name}/{path.parent.name}/{path.name}@{','.join(map(str, box))}"
            if key not in BACKGROUND_FACES:
                found.append(NonFace(key, region_of(box), image))
        if len(found) == count:
            return found
    raise ValueError(f"only {len(found)} of {count} non-face crops found")


def nonface_set(count: int = 300, seed: int = 0, celeba_share: float = 0.2) -> list[NonFace]:
    """`count` non-face crops, one per source frame (a `celeba_share` of them from CelebA-299), drawn from
    `seed`: the same set on every machine that has the shared data."""
    rng = random.Random(seed)
    lfw, celeba = _sources()
    celeba_count = round(count * celeba_share)
    return _cut(lfw, count - celeba_count, rng) + _cut(celeba, celeba_count, rng)
