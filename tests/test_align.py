"""Face alignment on real LFW faces: landmarks land on the template, fallbacks are recorded, bad input
becomes a status instead of an exception."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mfr_ray.data.align import (
    CROP_TEMPLATES,
    AlignConfig,
    ARCFACE_112x112,
    FaceAligner,
    SPHEREFACE_96x112,
    pick_face,
    similarity_transform,
)

KEYS = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0001.jpg",
        "George_W_Bush/George_W_Bush_0001.jpg", "Serena_Williams/Serena_Williams_0001.jpg"]


@pytest.fixture(scope="module")
def faces(lfw_dir):
    return [cv2.cvtColor(cv2.imread(str(lfw_dir / k)), cv2.COLOR_BGR2RGB) for k in KEYS]


@pytest.fixture(scope="module")
def aligner():
    return FaceAligner(AlignConfig(crop="112x96"))


def test_similarity_transform_recovers_known_transform():
    src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 3.0]])
    # rotate 90 degrees, scale 2, shift (5, 7): (x, y) -> (5 - 2y, 7 + 2x)
    dst = np.stack([5 - 2 * src[:, 1], 7 + 2 * src[:, 0]], 1)
    matrix = similarity_transform(src, dst)
    assert matrix == pytest.approx(np.array([[0.0, -2.0, 5.0], [2.0, 0.0, 7.0]]), abs=1e-9)


def test_templates():
    assert CROP_TEMPLATES["112x96"][0] == (112, 96)
    assert SPHEREFACE_96x112[0].tolist() == pytest.approx([30.2946, 51.6963])
    assert ARCFACE_112x112[0].tolist() == pytest.approx([38.2946, 51.6963])


@pytest.mark.parametrize("crop", ["112x96", "112x112", "160x160"])
def test_mtcnn_landmarks_land_on_template(faces, crop):
    aligner = FaceAligner(AlignConfig(crop=crop, fallbacks=[]))
    (height, width), template = CROP_TEMPLATES[crop]
    for result in aligner.align_batch(faces):
        assert result.status == "ok" and result.method == "mtcnn" and result.score > 0.9
        assert result.crop.shape == (height, width, 3) and result.crop.dtype == np.uint8
        landmarks = np.array(result.landmarks)
        # deep-funneled LFW: the face sits in the central ~110x130 px of the 250x250 image
        assert np.all(np.abs(landmarks.mean(0) - 125) < 40)
        matrix = similarity_transform(landmarks, template)
        mapped = landmarks @ matrix[:, :2].T + matrix[:, 2]
        assert np.abs(mapped - template).max() < 0.12 * width  # 5-point fit, not exact
        box = result.box
        assert box[0] < landmarks[:, 0].min() and landmarks[:, 0].max() < box[2]


def test_batch_equals_single(faces, aligner):
    batch = aligner.align_batch(faces[:2])
    single = [aligner.align(face) for face in faces[:2]]
    for a, b in zip(batch, single):
        assert np.allclose(a.landmarks, b.landmarks, atol=0.5)


def test_channels_last_mtcnn_matches_default_layout(faces):
    """The aligner runs MTCNN channels-last for speed; it must find the same landmarks as the stock layout."""
    import torch

    fast = FaceAligner(AlignConfig(fallbacks=[]))
    stock = FaceAligner(AlignConfig(fallbacks=[]))
    for net in (stock._mtcnn.pnet, stock._mtcnn.rnet, stock._mtcnn.onet):
        net.to(memory_format=torch.contiguous_format)
    assert fast._mtcnn.onet.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert stock._mtcnn.onet.conv1.weight.is_contiguous()
    for a, b in zip(fast.align_batch(faces), stock.align_batch(faces), strict=True):
        assert a.method == b.method == "mtcnn"
        assert np.abs(np.array(a.landmarks) - np.array(b.landmarks)).max() <= 0.05


def test_dlib_fallback_agrees_with_mtcnn(faces, aligner):
    mtcnn = aligner.align(faces[0])
    dlib_result = aligner._finish(faces[0], None)  # as if MTCNN had found nothing
    assert dlib_result.method == "dlib" and "mtcnn found no face" in dlib_result.reason
    assert np.abs(np.array(dlib_result.landmarks) - np.array(mtcnn.landmarks)).max() < 10


def test_no_face_falls_back_to_centre_or_reports(faces):
    blank = np.full((250, 250, 3), 128, dtype=np.uint8)
    centre = FaceAligner(AlignConfig(fallbacks=["center"])).align(blank)
    assert centre.status == "ok" and centre.method == "center" and centre.crop.shape == (112, 96, 3)
    none = FaceAligner(AlignConfig(fallbacks=[])).align(blank)
    assert none.status == "no_face" and none.crop is None and "mtcnn found no face" in none.reason


def test_largest_central_face_is_chosen(faces, aligner):
    canvas = np.zeros((250, 500, 3), dtype=np.uint8)
    canvas[:, :250] = faces[1]
    canvas[60:185, 310:435] = cv2.resize(faces[2], (125, 125))
    result = aligner.align(canvas)
    assert result.method == "mtcnn" and result.box[2] < 250
    assert pick_face(np.array([[0, 0, 10, 10], [100, 100, 150, 150], [0, 0, 60, 60]]), (200, 200)) == 1


def test_bad_input_never_raises(aligner):
    results = aligner.align_batch([None, np.zeros((5, 5, 3), np.uint8), np.zeros((10, 10, 10, 3), np.uint8),
                                   np.zeros((120, 120), np.uint8), np.zeros((120, 120, 4), np.uint8)])
    assert [r.status for r in results[:3]] == ["unsupported"] * 3
    assert all(r.reason for r in results[:3])
    assert [r.status for r in results[3:]] == ["ok", "ok"]  # grey and RGBA are converted (centre fallback)


def test_prealigned_skips_detection(faces):
    result = FaceAligner(AlignConfig(skip_detection=True, crop="112x112")).align(faces[0])
    assert result.method == "prealigned" and result.crop.shape == (112, 112, 3)
