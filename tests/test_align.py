"""Face alignment on real LFW faces: landmarks land on the template, fallbacks are recorded (a guessed
centre box is `ok_fallback`, never `ok`), bad input becomes a status instead of an exception, large
photos detect on a shrunk copy, and the mask-robust fits ignore the mouth."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mfr_ray.config import load_config
from mfr_ray.faces.aligner import RESCUE_MISS, FaceAligner
from mfr_ray.faces.config import AlignConfig
from mfr_ray.faces.geometry import (
    CROP_TEMPLATES,
    ARCFACE_112x112,
    SPHEREFACE_96x112,
    fit_targets,
    fit_weights,
    pick_face,
    residual_similarity,
    similarity_transform,
    template_matrix,
)
from mfr_ray.faces.mtcnn import mtcnn_detect
from mfr_ray.imageio import USABLE_STATUSES
from tests.prepare_inputs import REPO

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
    """The aligner runs MTCNN channels-last for speed in torch; it must find the same landmarks as the stock
    layout (the other runtimes: tests/test_runtime.py)."""
    import torch

    fast = FaceAligner(AlignConfig(fallbacks=[], runtime="torch"))
    stock = FaceAligner(AlignConfig(fallbacks=[], runtime="torch"))
    for net in (stock._mtcnn.pnet, stock._mtcnn.rnet, stock._mtcnn.onet):
        net.to(memory_format=torch.contiguous_format)
    assert fast._mtcnn.onet.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert stock._mtcnn.onet.conv1.weight.is_contiguous()
    for a, b in zip(fast.align_batch(faces), stock.align_batch(faces), strict=True):
        assert a.method == b.method == "mtcnn"
        assert np.abs(np.array(a.landmarks) - np.array(b.landmarks)).max() <= 0.05


def test_batched_mtcnn_matches_facenet_detect(faces):
    """The aligner's MTCNN resamples every candidate box at once (exact area pooling from integral
    images); it must find what facenet-pytorch's per-box loop finds, boxes near the border included (torch
    stages, which facenet-pytorch's own `detect` needs)."""
    from mfr_ray.masking.quality import lfw_files

    aligner = FaceAligner(AlignConfig(crop="112x96", runtime="torch"))
    frames = np.stack([cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in lfw_files(16, 5)])
    edge = np.stack([face[90:, 40:200] for face in faces])  # faces cut by the frame's top edge
    for stack in (frames, np.stack(faces), edge):
        ours = mtcnn_detect(aligner._mtcnn, stack)
        stock = aligner._mtcnn.detect(stack, landmarks=True)
        found = 0
        for box, prob, points, box_s, prob_s, points_s in zip(*ours, *stock, strict=True):
            assert (box is None) == (box_s is None)
            if box is None:
                continue
            found += 1
            assert box.shape == box_s.shape
            mine, theirs = np.lexsort(box.T[::-1]), np.lexsort(box_s.T[::-1])  # the same faces, in any order
            assert np.abs(box[mine] - box_s[theirs]).max() <= 0.01
            assert np.abs(points[mine] - points_s[theirs]).max() <= 0.01
            assert np.abs(np.asarray(prob, float)[mine] - np.asarray(prob_s, float)[theirs]).max() <= 1e-4
        assert found >= len(stack) - 1


def test_dlib_fallback_agrees_with_mtcnn(faces, aligner):
    mtcnn = aligner.align(faces[0])
    dlib_result = aligner._finish(faces[0], None, None)  # as if MTCNN had found nothing
    assert dlib_result.method == "dlib" and "mtcnn found no face" in dlib_result.reason
    assert np.abs(np.array(dlib_result.landmarks) - np.array(mtcnn.landmarks)).max() < 10


def non_faces() -> list[np.ndarray]:
    grey = np.full((250, 250, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (250, 250, 3), dtype=np.uint8)
    return [grey, noise]


def test_no_face_falls_back_to_centre_or_reports(faces):
    for blank in non_faces():
        centre = FaceAligner(AlignConfig(fallbacks=["center"])).align(blank)
        assert centre.status == "ok_fallback" and centre.method == "center" and centre.crop.shape == (112, 96, 3)
        assert centre.reason == f"mtcnn found no face; {RESCUE_MISS}; centre box guessed" and centre.usable
        none = FaceAligner(AlignConfig(fallbacks=[])).align(blank)
        assert none.status == "no_face" and none.crop is None and "mtcnn found no face" in none.reason
    assert USABLE_STATUSES == {"ok", "ok_fallback"}


def _shipped_align(name: str) -> AlignConfig:
    cfg = load_config(REPO / "configs" / name)
    return cfg.align if hasattr(cfg, "align") else cfg.sources["unmasked"].align


@pytest.mark.parametrize("name", ["prepare_celeba_112x96.yaml", "prepare_celeba_112x112.yaml"])
def test_training_configs_turn_non_faces_into_no_face(faces, name):
    """Training must not learn a guessed box: the shipped training configs have no centre fallback."""
    aligner = FaceAligner(_shipped_align(name))
    results = aligner.align_batch(non_faces() + faces[:2])
    assert [r.status for r in results] == ["no_face", "no_face", "ok", "ok"]
    assert results[0].reason == f"mtcnn found no face; dlib found no face; {RESCUE_MISS}"


@pytest.mark.parametrize("name", ["prepare_lfw_eval.yaml", "eval_lfw.yaml"])
def test_evaluation_configs_keep_a_marked_centre_crop(faces, name):
    """The LFW protocol needs a crop for every pair image: evaluation keeps the centre box, marked."""
    results = FaceAligner(_shipped_align(name)).align_batch(non_faces() + faces[:1])
    assert [r.status for r in results] == ["ok_fallback", "ok_fallback", "ok"]
    assert results[1].reason == f"mtcnn found no face; dlib found no face; {RESCUE_MISS}; centre box guessed"
    assert results[2].reason == ""


def test_large_image_detects_on_a_shrunk_copy(faces, monkeypatch):
    """A 3000x3000 photo: MTCNN sees at most detect_max_side px, the crop still comes from the full frame
    and matches the 250 px original's."""
    import mfr_ray.faces.aligner as align_module

    aligner = FaceAligner(AlignConfig(fallbacks=[]))
    seen = []
    detect = align_module.mtcnn_detect
    monkeypatch.setattr(align_module, "mtcnn_detect", lambda mtcnn, stack: seen.append(stack.shape) or detect(mtcnn, stack))
    big = cv2.resize(faces[0], (3000, 3000), interpolation=cv2.INTER_CUBIC)
    small, large = aligner.align_batch([faces[0], big])
    assert seen == [(1, 250, 250, 3), (1, 1024, 1024, 3)]
    assert large.status == "ok" and large.method == "mtcnn"
    assert np.abs(np.array(large.landmarks) / 12.0 - np.array(small.landmarks)).max() < 1.5
    assert large.box[2] > 1000  # box in full-frame pixels
    assert np.abs(large.crop.astype(int) - small.crop.astype(int)).mean() < 8


def test_weighted_similarity_ignores_zero_weight_points():
    src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 3.0], [5.0, 5.0]])
    dst = np.stack([5 - 2 * src[:, 1], 7 + 2 * src[:, 0]], 1)
    dst[3:] += 40.0  # two wild points
    exact = np.array([[0.0, -2.0, 5.0], [2.0, 0.0, 7.0]])
    assert similarity_transform(src, dst, [1, 1, 1, 0, 0]) == pytest.approx(exact, abs=1e-9)
    assert similarity_transform(src, dst) != pytest.approx(exact, abs=1.0)
    with pytest.raises(ValueError, match="two points"):
        similarity_transform(src, dst, [1, 0, 0, 0, 0])


def test_upper_face_fit_does_not_move_with_the_mouth(faces, aligner):
    """Masks move MTCNN's mouth corners: with upper_face they cannot move the crop, with all5 they do,
    and `weighted` moves it less than all5."""
    landmarks = np.array(aligner.align(faces[2]).landmarks)
    moved = landmarks.copy()
    moved[3:] += [3.0, 12.0]  # mouth corners dragged down by a mask's edge
    centre = CROP_TEMPLATES["112x96"][1].mean(0)
    shift = {}
    for fit in ("all5", "weighted", "upper_face"):
        weights = fit_weights(AlignConfig(landmark_fit=fit))
        before, after = template_matrix(landmarks, "112x96", weights), template_matrix(moved, "112x96", weights)
        offset, scale, rotation = residual_similarity(after, before, centre)
        shift[fit] = np.linalg.norm(offset) + 100 * abs(scale) + abs(rotation)
    assert shift["upper_face"] < 1e-9
    assert shift["all5"] > 2.0
    assert 0 < shift["weighted"] < 0.8 * shift["all5"]


def test_landmark_fit_is_applied_to_the_crop(faces):
    crops = {fit: FaceAligner(AlignConfig(landmark_fit=fit, fallbacks=[])).align(faces[1]) for fit in
             ("all5", "upper_face")}
    targets = fit_targets("112x96")
    upper = np.array(crops["upper_face"].landmarks)
    assert crops["upper_face"].matrix == pytest.approx(similarity_transform(upper[:3], targets[:3]), abs=0.02)
    template = CROP_TEMPLATES["112x96"][1]
    assert crops["all5"].matrix == pytest.approx(similarity_transform(crops["all5"].landmarks, template), abs=0.02)
    assert np.abs(crops["upper_face"].crop.astype(int) - crops["all5"].crop.astype(int)).mean() > 1


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
    # grey and RGBA arrays are converted, then (all black, no face) get the centre box, marked as a guess
    assert [r.status for r in results[3:]] == ["ok_fallback", "ok_fallback"]
    assert all("centre box guessed" in r.reason for r in results[3:])


def test_prealigned_skips_detection(faces):
    result = FaceAligner(AlignConfig(skip_detection=True, crop="112x112")).align(faces[0])
    assert result.method == "prealigned" and result.crop.shape == (112, 112, 3)
