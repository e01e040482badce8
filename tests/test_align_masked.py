"""Alignment of masked faces on real LFW images: the masked twin of a training image cut as
`masked_twin` says (reuse / detect / jitter), and evaluation crops keeping centre-box guesses marked."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mfr_ray.data.twins import masked_twins
from mfr_ray.faces.aligner import RESCUE_MISS, FaceAligner
from mfr_ray.faces.config import AlignConfig
from mfr_ray.faces.geometry import CROP_TEMPLATES, residual_similarity, warp_with
from mfr_ray.masking import MaskEngine, MaskingConfig

KEYS = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "George_W_Bush/George_W_Bush_0001.jpg"]


@pytest.fixture(scope="module")
def faces(lfw_dir):
    return [cv2.cvtColor(cv2.imread(str(lfw_dir / k)), cv2.COLOR_BGR2RGB) for k in KEYS]


@pytest.fixture(scope="module")
def engine():
    return MaskEngine(MaskingConfig(mask_type="surgical_blue", seed=0))


def _aligner(twin: str) -> FaceAligner:
    return FaceAligner(AlignConfig(crop="112x96", fallbacks=["dlib"], masked_twin=twin))


def test_reuse_twin_paints_the_unmasked_crop(faces, engine):
    aligner = _aligner("reuse")
    aligned = aligner.align(faces[0])
    (twin,) = masked_twins(aligner, engine, aligned, [(KEYS[0], None)])
    (painted,) = engine.mask_copies(aligned.crop, [(KEYS[0], None)], aligned=True)
    assert twin.align_method == "mtcnn" and twin.reason == ""
    assert np.array_equal(twin.result.image, painted.image)


def test_detect_twin_is_aligned_on_the_masked_frame(faces, engine):
    """The masked copy's crop comes from landmarks MTCNN found on the masked full frame, not from the
    unmasked image's: the same crop as aligning the masked frame directly, unlike the reused transform."""
    aligner = _aligner("detect")
    for face, key in zip(faces, KEYS, strict=True):
        aligned = aligner.align(face)
        (twin,) = masked_twins(aligner, engine, aligned, [(key, None)])
        masked_frame = engine.mask(face, key, aligned=False).image
        direct = aligner.align(masked_frame)
        assert direct.status == "ok" and twin.align_method == direct.method and twin.reason == ""
        assert np.array_equal(twin.result.image, direct.crop)
        reused = warp_with(masked_frame, aligned.matrix, "112x96")
        assert np.abs(twin.result.image.astype(int) - reused.astype(int)).mean() > 2
        assert twin.result.record.mask_type == "surgical_blue"


def test_detect_twin_falls_back_to_the_unmasked_landmarks(faces, engine):
    """Where nothing is found on the masked frame, the twin is the masked frame cut with the unmasked
    transform, and the row says so."""
    aligner = FaceAligner(AlignConfig(crop="112x96", fallbacks=[], masked_twin="detect", mtcnn_min_score=0.9))
    aligned = aligner.align(faces[1])
    aligner.config.mtcnn_min_score = 1.0  # nothing on the masked frame scores 1.0
    (twin,) = masked_twins(aligner, engine, aligned, [(KEYS[1], None)])
    masked_frame = engine.mask(faces[1], KEYS[1], aligned=False).image
    assert np.array_equal(twin.result.image, warp_with(masked_frame, aligned.matrix, "112x96"))
    assert twin.align_method == "mtcnn" and "cropped with the unmasked landmarks" in twin.reason
    assert "mtcnn found no face" in twin.reason


def test_jitter_twin_is_moved_deterministically_per_key(faces, engine):
    aligner = _aligner("jitter")
    cfg = aligner.config
    aligned = aligner.align(faces[0])
    requests = [(KEYS[0], None), (KEYS[0] + "#masked1", None)]
    first = masked_twins(aligner, engine, aligned, requests)
    again = masked_twins(aligner, engine, aligned, requests)
    assert all(np.array_equal(a.result.image, b.result.image) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0].result.image, first[1].result.image)
    (reused,) = masked_twins(_aligner("reuse"), engine, aligned, requests[:1])
    assert not np.array_equal(first[0].result.image, reused.result.image)
    # the jitter is the crop difference the benchmark measures, drawn with the configured means and spreads
    from mfr_ray.faces.geometry import jitter_matrix

    cfg = cfg.model_copy(update={"jitter_shift_y_mean": 0.1, "jitter_scale_mean": 0.05})
    template = CROP_TEMPLATES["112x96"][1]
    eye_distance = np.linalg.norm(template[1] - template[0])
    drawn = [residual_similarity(jitter_matrix(aligned.matrix, cfg, "112x96", f"k{i}"), aligned.matrix,
                                 template.mean(0)) for i in range(300)]
    shifts = np.array([d[0] for d in drawn]) / eye_distance
    scales, rotations = np.array([d[1] for d in drawn]), np.array([d[2] for d in drawn])
    assert shifts.std(0) == pytest.approx([cfg.jitter_shift] * 2, rel=0.2)
    assert shifts.mean(0) == pytest.approx([0.0, 0.1], abs=0.01)
    assert scales.mean() == pytest.approx(0.05, abs=0.01) and scales.std() == pytest.approx(cfg.jitter_scale, rel=0.2)
    assert rotations.std() == pytest.approx(cfg.jitter_rotation_deg, rel=0.2)


def test_folder_source_keeps_centre_guesses_marked(tmp_path, lfw_dir):
    """Evaluation needs a crop for every pair image: a non-face gets the centre box, status ok_fallback
    with the reason, and a real crop (not the black crop of a failure)."""
    from mfr_ray.evaluation.sources import ImageSourceConfig, load_crops

    (tmp_path / "Grey").mkdir()
    cv2.imwrite(str(tmp_path / "Grey" / "Grey_0001.png"), np.full((250, 250, 3), 128, np.uint8))
    (tmp_path / KEYS[0]).parent.mkdir()
    (tmp_path / KEYS[0]).write_bytes((lfw_dir / KEYS[0]).read_bytes())
    source = ImageSourceConfig(uri=str(tmp_path), align={"crop": "112x96", "fallbacks": ["dlib", "center"]})
    crops = load_crops(source, [KEYS[0], "Grey/Grey_0001.png"])
    assert crops.status.tolist() == ["ok", "ok_fallback"]
    assert crops.method.tolist() == ["mtcnn", "center"]
    assert crops.reason[1] == f"mtcnn found no face; dlib found no face; {RESCUE_MISS}; centre box guessed"
    assert crops.crops[1].mean() == pytest.approx(128, abs=1)


@pytest.mark.slow
def test_prepare_detect_twin_end_to_end(tmp_path, lfw_dir, ray_local):
    """`mfr prepare` with masked_twin=detect and the training fallbacks: a face's masked row is the crop
    aligned on its masked frame; a grey frame is a no_face row (no masked rows); files in = rows out."""
    import io

    from PIL import Image

    from mfr_ray.data.config import PrepareConfig
    from mfr_ray.data.job import run_prepare
    from tests.prepare_inputs import prepare_config, read_variant

    for key in KEYS:
        (tmp_path / "in" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / key).write_bytes((lfw_dir / key).read_bytes())
    (tmp_path / "in" / "Grey").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "Grey" / "Grey_0001.png"), np.full((250, 250, 3), 128, np.uint8))
    config = prepare_config(
        str(tmp_path / "in"), str(tmp_path / "out"),
        align={"fallbacks": ["dlib"], "masked_twin": "detect"},
        masking={"mix": {"surgical_blue": 1}, "seed": 0},
        output={"uri": str(tmp_path / "out"), "image_format": "png"},
    )
    cfg = PrepareConfig.model_validate({k: v for k, v in config.items() if k != "kind"})
    run_prepare(cfg, progress=False)
    unmasked = {r["source_key"]: r for r in read_variant(tmp_path / "out", "unmasked").to_pylist()}
    masked = {r["source_key"]: r for r in read_variant(tmp_path / "out", "masked").to_pylist()}
    assert sorted(unmasked) == sorted([*KEYS, "Grey/Grey_0001.png"])
    assert unmasked["Grey/Grey_0001.png"]["status"] == "no_face" and "Grey/Grey_0001.png" not in masked
    assert unmasked["Grey/Grey_0001.png"]["reason"] == f"mtcnn found no face; dlib found no face; {RESCUE_MISS}"
    engine = MaskEngine(cfg.masking)
    aligner = FaceAligner(cfg.align)
    for key, face in zip(KEYS, [cv2.cvtColor(cv2.imread(str(lfw_dir / k)), cv2.COLOR_BGR2RGB) for k in KEYS]):
        row = masked[key]
        assert row["status"] == "ok" and row["reason"] == "" and row["align_method"] == "mtcnn"
        expected = aligner.align(engine.mask(face, key, aligned=False).image).crop
        stored = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        assert np.array_equal(stored, expected)


def test_evaluation_cache_ignores_training_twin_settings():
    from mfr_ray.evaluation.sources import EVAL_IRRELEVANT_ALIGN, ImageSourceConfig, source_fingerprint

    assert EVAL_IRRELEVANT_ALIGN <= set(AlignConfig.model_fields)
    plain = ImageSourceConfig()
    jittered = ImageSourceConfig(align={"masked_twin": "jitter", "jitter_shift": 0.2})
    refit = ImageSourceConfig(align={"landmark_fit": "upper_face"})
    assert source_fingerprint(plain, ["a"]) == source_fingerprint(jittered, ["a"]) != source_fingerprint(refit, ["a"])


def test_dlib_upper_face_fit_keeps_the_unmasked_framing_and_ignores_the_mask(faces, engine):
    """landmark_fit=dlib_upper_face fits on dlib's brows, nose bridge and eyes: on unmasked faces the crop
    is all5's on average (within a few px), and a mask drawn on the full frame moves it less than it moves
    the all5 crop (MTCNN's nose and mouth points follow the mask)."""
    centre = CROP_TEMPLATES["112x96"][1].mean(0)
    fits = {fit: FaceAligner(AlignConfig(crop="112x96", fallbacks=[], landmark_fit=fit)) for fit in
            ("all5", "dlib_upper_face")}
    moved = {}
    for key, face in zip(KEYS, faces, strict=True):
        masked = engine.mask(face, key, aligned=False).image
        plain = {fit: aligner.align(face) for fit, aligner in fits.items()}
        covered = {fit: aligner.align(masked) for fit, aligner in fits.items()}
        assert all(r.method == "mtcnn" and r.reason == "" for r in [*plain.values(), *covered.values()])
        shift, scale, rotation = residual_similarity(plain["dlib_upper_face"].matrix, plain["all5"].matrix, centre)
        assert np.linalg.norm(shift) < 4.0 and abs(scale) < 0.08 and abs(rotation) < 4.0
        for fit in fits:
            shift, scale, _ = residual_similarity(covered[fit].matrix, plain[fit].matrix, centre)
            moved[fit] = moved.get(fit, 0.0) + np.linalg.norm(shift) + 100 * abs(scale)
    assert moved["dlib_upper_face"] < moved["all5"]


def test_dlib_upper_face_fit_is_rejected_where_dlib_misses_the_eyes(faces):
    """A dlib fit whose eyes land far from the detector's falls back to the 5-point fit, with a note."""
    aligner = FaceAligner(AlignConfig(crop="112x96", fallbacks=[], landmark_fit="dlib_upper_face"))
    result = aligner.align(faces[0])
    wrong = np.array(result.landmarks) + [60.0, 0.0]  # the detector's points a face-width to the right
    assert aligner.upper_face_landmarks(result.frame, wrong) is None
    assert aligner.upper_face_landmarks(result.frame, np.array(result.landmarks)) is not None
