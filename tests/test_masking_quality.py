"""Masking quality on 500 real LFW faces: how many get masked on each path, and whether the masks sit
where a mask belongs (nose tip, mouth corners, chin covered; eyes free)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mfr_ray.imageio import read_image_file
from mfr_ray.masking import MaskEngine, MaskingConfig, available_mask_types
from mfr_ray.masking.landmarks import crop_and_resize
from mfr_ray.masking.quality import coverage_check, lfw_files, lfw_key

pytestmark = pytest.mark.slow

SAMPLE = 500
ARCFACE_CROP = (61, 55, 188, 182)  # LFW box resized to 112x112, framing like ArcFace alignment
MIX = {t: 1.0 for t in available_mask_types()}


@pytest.fixture(scope="module")
def lfw():
    return [(lfw_key(f), read_image_file(f).image) for f in lfw_files(SAMPLE, seed=11)]


@pytest.fixture(scope="module")
def engine():
    return MaskEngine(MaskingConfig(mix=MIX, seed=5))


def _central_landmarks(engine: MaskEngine, image: np.ndarray) -> np.ndarray | None:
    """Independent reference: detector + predictor on the full photo, the face nearest the centre."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    boxes = engine.locator.landmarker.detect(image, grey)
    if not boxes:
        return None
    h, w = grey.shape
    box = min(boxes, key=lambda b: ((b[0] + b[2]) / 2 - w / 2) ** 2 + ((b[1] + b[3]) / 2 - h / 2) ** 2)
    return engine.locator.landmarker.fit(grey, box)


def test_detector_path_masks_97_percent_and_places_masks(engine, lfw):
    ok, placed = 0, 0
    for key, image in lfw:
        result = engine.mask(image, key, aligned=False)
        if result.record.status != "ok":
            continue
        ok += 1
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        landmarks = engine.locator.landmarker.fit(grey, result.record.face_boxes[0])
        placed += coverage_check(result.alpha, landmarks, style=result.record.style).ok
    print(f"detector path: masked {ok}/{len(lfw)}, well placed {placed}/{ok}")
    assert ok / len(lfw) >= 0.97, f"detector path masked {ok}/{len(lfw)}"
    assert placed / ok >= 0.98, f"well placed {placed}/{ok}"


def test_aligned_fast_path_masks_99_percent_and_places_masks(engine, lfw):
    """112x112 crops through the fast path, judged by landmarks found on the full photo by the detector
    (mapped into the crop), so a wrong fixed face box would show."""
    left, top, right, bottom = ARCFACE_CROP
    scale = np.array([112 / (right - left), 112 / (bottom - top)], np.float32)
    ok, placed, judged = 0, 0, 0
    for key, image in lfw:
        result = engine.mask(crop_and_resize(image, ARCFACE_CROP, (112, 112)), key, aligned=True)
        assert result.record.detector == "aligned"
        if result.record.status != "ok":
            continue
        ok += 1
        reference = _central_landmarks(engine, image)
        if reference is None:
            continue
        judged += 1
        placed += coverage_check(
            result.alpha, (reference - [left, top]) * scale, style=result.record.style
        ).ok
    print(f"fast path 112x112: masked {ok}/{len(lfw)}, well placed {placed}/{judged} judged")
    assert ok / len(lfw) >= 0.99, f"fast path masked {ok}/{len(lfw)}"
    assert judged >= 0.95 * len(lfw)
    assert placed / judged >= 0.98, f"well placed {placed}/{judged}"


@pytest.mark.parametrize(
    ("crop", "size"),
    [((70, 55, 179, 182), (96, 112)), ((78, 64, 171, 189), (160, 160))],
    ids=["sphereface_112x96", "facenet_160x160"],
)
def test_other_aligned_layouts(engine, lfw, crop, size):
    """112x96 (SphereFace framing) and 160x160 (MTCNN box, margin 0, stretched) crops of LFW."""
    left, top, right, bottom = crop
    scale = np.array([size[0] / (right - left), size[1] / (bottom - top)], np.float32)
    ok, placed, judged = 0, 0, 0
    for key, image in lfw[:150]:
        result = engine.mask(crop_and_resize(image, crop, size), key, aligned=True)
        ok += result.record.status == "ok"
        reference = _central_landmarks(engine, image)
        if result.record.status == "ok" and reference is not None:
            judged += 1
            placed += coverage_check(
                result.alpha, (reference - [left, top]) * scale, style=result.record.style
            ).ok
    print(f"fast path {size[0]}x{size[1]}: masked {ok}/150, well placed {placed}/{judged}")
    assert ok / 150 >= 0.99 and placed / judged >= 0.97


def test_aligned_lfw_250_fast_path(engine, lfw):
    ok, placed = 0, 0
    for key, image in lfw[:200]:
        result = engine.mask(image, key, aligned=True)
        ok += result.record.status == "ok"
        reference = _central_landmarks(engine, image)
        if result.record.status == "ok" and reference is not None:
            placed += coverage_check(result.alpha, reference, style=result.record.style).ok
    print(f"fast path LFW 250x250: masked {ok}/200, well placed {placed}/{ok}")
    assert ok / 200 >= 0.99
    assert placed / ok >= 0.97
