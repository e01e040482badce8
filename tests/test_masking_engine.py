"""Masking engine on real LFW faces: key-point geometry, template views by tilt, placement, determinism,
mixture frequencies, user-added types/patterns, and bad input that must not raise."""

from __future__ import annotations

import io
import itertools

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy.stats import chisquare

from mfr_ray.config import load_config
from mfr_ray.imageio import encode_image, read_image_file
from mfr_ray.masking import (
    KEYPOINT_NAMES,
    MaskEngine,
    MaskingConfig,
    available_mask_types,
    available_patterns,
    parse_mix,
)
from mfr_ray.masking.landmarks import face_tilt, implausible_landmarks, six_keypoints, view_for_tilt
from mfr_ray.masking.layers import builtin_layers
from mfr_ray.masking.quality import coverage_check, lfw_files, lfw_key
from mfr_ray.masking.render import POLYGON_LANDMARKS
from mfr_ray.paths import PROJECT_ROOT
from mfr_ray.registry import MASK_TYPES

TEMPLATE_TYPES = [name for name, spec in MASK_TYPES.items() if spec.drawing == "template"]  # a new one too


@pytest.fixture(scope="module")
def faces() -> list[tuple[str, np.ndarray]]:
    return [(lfw_key(f), read_image_file(f).image) for f in lfw_files(40, seed=21)]


@pytest.fixture(scope="module")
def engine() -> MaskEngine:
    return MaskEngine(MaskingConfig(mix={t: 1.0 for t in available_mask_types()}, pattern="random", seed=1))


def _landmarks(engine: MaskEngine, image: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return engine.locator.landmarker.fit(grey, engine.locator.landmarker.detect(image, grey)[0])


def _distance_to_polyline(point: np.ndarray, polyline: np.ndarray) -> float:
    best = np.inf
    for a, b in itertools.pairwise(polyline):
        t = np.clip(np.dot(point - a, b - a) / max(np.dot(b - a, b - a), 1e-9), 0, 1)
        best = min(best, float(np.linalg.norm(point - (a + t * (b - a)))))
    return best


def test_six_keypoints_sit_on_the_jaw_at_nose_and_lip_level(engine, faces):
    level_pairs = 0
    for _, image in faces[:10]:
        lm = _landmarks(engine, image)
        kp = six_keypoints(lm)
        eye_dir = lm[42:48].mean(0) - lm[36:42].mean(0)
        eye_dir /= np.linalg.norm(eye_dir)
        down = np.array([-eye_dir[1], eye_dir[0]])
        for index in (1, 3):
            assert _distance_to_polyline(kp[index], lm[0:9]) < 0.5
            assert _distance_to_polyline(kp[index + 1], lm[8:17]) < 0.5
        # both cheek points on one level, at or below landmark 29 (unless that line misses a jaw side)
        level_pairs += abs((kp[1] - kp[2]) @ down) < 0.5 and (kp[1] - lm[29]) @ down >= -0.5
        assert abs((kp[3] - lm[57]) @ down) < 0.5 and abs((kp[4] - lm[57]) @ down) < 0.5  # lower-lip level
        assert np.allclose(kp[5], lm[8])
        assert (lm[36:48] @ down).max() < kp[0] @ down < lm[30] @ down  # bridge between eyes and nose tip
        assert kp[1] @ eye_dir < lm[30] @ eye_dir < kp[2] @ eye_dir
    assert level_pairs >= 8


def test_tilt_sign_matches_head_turn_and_picks_the_view(engine, faces):
    """Measured tilt beyond 13 degrees selects a side view; the mirror image flips it; and the sign agrees
    with an independent cue: the nose tip sits nearer the jaw side the face is turned towards."""
    turned = []
    for key, image in (f for f in ((lfw_key(p), read_image_file(p).image) for p in lfw_files(400, seed=4))):
        lm = _landmarks_or_none(engine, image)
        if lm is not None and abs(face_tilt(lm)) > 16:
            turned.append((key, image, lm))
        if len(turned) == 6:
            break
    assert len(turned) >= 4
    mirrored_checked = 0
    for key, image, lm in turned:
        tilt = face_tilt(lm)
        nose_offset = (lm[30, 0] - lm[0, 0]) / (lm[16, 0] - lm[0, 0]) - 0.5  # < 0: nearer the image-left jaw
        assert np.sign(tilt) == -np.sign(nose_offset)
        expected = "left" if tilt > 0 else "right"
        assert view_for_tilt(tilt, 13) == expected
        result = engine.mask(image, key, mask_type="surgical")
        assert result.record.template_view == expected
        mirrored = engine.mask(np.ascontiguousarray(image[:, ::-1]), key, mask_type="surgical")
        if mirrored.record.status == "ok":  # the HOG detector is not mirror-symmetric
            mirrored_checked += 1
            assert mirrored.record.template_view == {"left": "right", "right": "left"}[expected]
            assert mirrored.record.tilt_deg == pytest.approx(-result.record.tilt_deg, abs=6)
    assert mirrored_checked >= 3


def _landmarks_or_none(engine, image):
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    boxes = engine.locator.landmarker.detect(image, grey)
    return engine.locator.landmarker.fit(grey, boxes[0]) if boxes else None


@pytest.mark.parametrize("aligned", [False, True])
def test_masks_cover_nose_mouth_chin_and_leave_eyes_free(engine, faces, aligned):
    placed, masked = 0, 0
    for key, image in faces:
        result = engine.mask(image, key, aligned=aligned)
        if result.record.status != "ok":
            continue
        masked += 1
        assert result.image.shape == image.shape and result.alpha.shape == image.shape[:2]
        placed += coverage_check(result.alpha, _landmarks(engine, image), style=result.record.style).ok
        assert len(result.record.keypoints) == len(KEYPOINT_NAMES) and len(result.record.polygon) >= 3
    assert masked >= 0.95 * len(faces)
    assert placed >= 0.95 * masked


def test_every_face_is_masked(engine, faces):
    """Two real faces side by side: both masked, each over its own nose tip and mouth."""
    single = [(image, engine.mask(image, key, mask_type="N95")) for key, image in faces]
    clear = [
        image
        for image, result in single
        if coverage_check(result.alpha, _landmarks(engine, image), style=result.record.style).ok
    ][:2]
    result = engine.mask(np.hstack(clear), "pair", mask_type="N95")
    assert result.record.status == "ok" and result.record.num_faces == 2
    for offset, image in zip((0, 250), clear, strict=True):
        alpha = result.alpha[:, offset : offset + 250]
        assert coverage_check(alpha, _landmarks(engine, image), style=result.record.style).ok


def test_same_seed_and_key_give_identical_bytes(faces):
    cfg = MaskingConfig(
        mix={"cloth": 1, "KN95": 1, "surgical_blue": 1}, pattern="random", color="random", seed=7
    )
    first, second = MaskEngine(cfg), MaskEngine(cfg)
    key, image = faces[2]
    a, b = first.mask(image, key), second.mask(image.copy(), key)
    assert encode_image(a.image, "png") == encode_image(b.image, "png")
    assert a.record.to_row() == b.record.to_row()
    other_seed = MaskEngine(cfg.model_copy(update={"seed": 8}))
    choices = {
        (first.choose(k).mask_type, first.choose(k).pattern)
        == (other_seed.choose(k).mask_type, other_seed.choose(k).pattern)
        for k, _ in faces
    }
    assert False in choices  # a different seed draws differently


def test_copies_share_one_fit_and_match_single_masks(engine, faces):
    """mask_copies (one landmark fit for all variants of a crop) gives exactly what separate mask calls give."""
    key, image = faces[3]
    requests = [(key, "surgical_green"), (f"{key}#n95", "N95"), (f"{key}#cloth", "cloth"), (key, None)]
    copies = engine.mask_copies(image, requests)
    assert [c.record.mask_type for c in copies[:3]] == ["surgical_green", "N95", "cloth"]
    for (k, mask_type), copy in zip(requests, copies, strict=True):
        single = engine.mask(image, k, mask_type=mask_type)
        assert copy.record.status == "ok" and copy.record.to_row() == single.record.to_row()
        assert np.array_equal(copy.image, single.image)
    assert not np.array_equal(copies[0].image, copies[1].image)


def test_mixture_frequencies_follow_weights():
    weights = parse_mix("surgical_blue:1,N95:1,cloth:2,gas:4")
    engine = MaskEngine(MaskingConfig(mix=weights, preload_templates=False))
    keys = [f"person_{i}/img_{i:04d}.jpg" for i in range(4000)]
    counts = {name: 0 for name in weights}
    for key in keys:
        counts[engine.choose(key).mask_type] += 1
    observed = np.array([counts[n] for n in weights])
    expected = np.array([weights[n] for n in weights]) / sum(weights.values()) * len(keys)
    assert chisquare(observed, expected).pvalue > 0.001
    assert chisquare(observed, np.full(4, len(keys) / 4)).pvalue < 1e-6  # the test can tell weights apart


def test_code_style_entries_fix_pattern_or_colour():
    engine = MaskEngine(MaskingConfig(mix={"cloth/checks": 1, "cloth/#e54294": 1}, preload_templates=False))
    looks = {(c.pattern, c.color) for c in (engine.choose(f"k{i}") for i in range(50))}
    assert looks == {("checks", None), (None, "#e54294")}


def test_templates_and_patterns_library():
    assert len(available_patterns()) >= 24
    assert sorted(available_mask_types()) == MASK_TYPES.names() and TEMPLATE_TYPES
    for mask_type in TEMPLATE_TYPES:
        front = builtin_layers(mask_type, "front")
        for view in ("left", "right"):
            layers = builtin_layers(mask_type, view)
            alpha = layers.base[..., 3]
            for x, y in layers.keypoints:
                assert alpha[round(y), round(x)] > 0.5, (mask_type, view)
            assert not np.array_equal(layers.base, front.base)
        left, right = builtin_layers(mask_type, "left"), builtin_layers(mask_type, "right")
        assert np.allclose(left.base[:, ::-1], right.base)


def test_polygon_type_fills_the_jaw_and_nose_bridge_landmarks(engine, faces):
    key, image = faces[3]
    result = engine.mask(image, key, mask_type="polygon")
    assert result.record.mask_type == "polygon" and result.record.color in ("#000000", "#ffffff", "#87ceeb")
    lm = _landmarks(engine, image)
    assert len(result.record.polygon) == len(POLYGON_LANDMARKS)
    assert np.allclose(result.record.polygon[-1], lm[28], atol=0.01)
    assert coverage_check(result.alpha, lm, style=result.record.style).ok


def test_user_mask_type_and_pattern_from_files(tmp_path, faces):
    """A user drops an RGBA template, a pattern tile, and a config entry; the engine uses them."""
    layers = builtin_layers("KN95", "front")
    rgba = np.dstack([layers.base[..., :3] / np.maximum(layers.base[..., 3:], 1e-3), layers.base[..., 3]])
    Image.fromarray((np.clip(rgba, 0, 1) * 255).astype(np.uint8), "RGBA").save(tmp_path / "mine.png")
    tile = np.zeros((32, 32, 3), np.uint8)
    tile[::8] = (255, 0, 0)
    Image.fromarray(tile).save(tmp_path / "red_lines.png")
    config_file = tmp_path / "mask_custom.yaml"
    config_file.write_text(
        "kind: mask\nmask_type: my_mask\npattern: red_lines\n"
        f"custom_patterns:\n  red_lines: {tmp_path / 'red_lines.png'}\n"
        f"custom_masks:\n  my_mask:\n    front: {tmp_path / 'mine.png'}\n"
        f"    keypoints:\n      front: {layers.keypoints.round(1).tolist()}\n"
    )
    cfg = load_config(config_file, expected=MaskingConfig)
    engine = MaskEngine(cfg)
    key, image = faces[4]
    result = engine.mask(image, key)
    assert result.record.status == "ok" and result.record.mask_type == "my_mask"
    assert result.record.pattern == "red_lines"
    assert coverage_check(result.alpha, _landmarks(engine, image), style=result.record.style).ok


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown mask_type"):
        MaskingConfig(mask_type="balaclava")
    with pytest.raises(ValueError, match="neither a pattern"):
        MaskingConfig(mix={"cloth/plaidd": 1})
    with pytest.raises(ValueError, match="color"):
        MaskingConfig(color="blue")


def test_shipped_configs_load():
    for path in sorted((PROJECT_ROOT / "configs").glob("mask_*.yaml")):
        assert isinstance(load_config(path), MaskingConfig)


def test_implausible_fit_is_named():
    lm = np.zeros((68, 2), np.float32)
    lm[36:42], lm[42:48] = (30, 60), (70, 60)
    lm[27], lm[30], lm[57], lm[8] = (50, 55), (50, 40), (50, 30), (50, 20)  # upside-down face
    assert "order" in implausible_landmarks(lm, (0, 0, 100, 100))


def test_bad_input_never_raises(engine, faces):
    _, image = faces[5]
    face_bytes = encode_image(image)
    cmyk = io.BytesIO()
    Image.fromarray(image).convert("CMYK").save(cmyk, format="JPEG")
    grey = io.BytesIO()
    Image.fromarray(image).convert("L").save(grey, format="PNG")
    cases = {
        b"": "decode_error",
        b"\x89PNG\r\n\x1a\n garbage": "decode_error",
        face_bytes[: len(face_bytes) // 4]: "decode_error",
        cmyk.getvalue(): "ok",
        grey.getvalue(): "ok",
    }
    for data, status in cases.items():
        result = engine.mask_bytes(data, "k")
        assert result.record.status == status, result.record.reason
        assert (result.image is not None) == (status == "ok") and result.record.reason
    arrays = {
        "none": (None, "decode_error"),
        "empty": (np.zeros((0, 0, 3), np.uint8), "decode_error"),
        "blank": (np.full((112, 112, 3), 128, np.uint8), "no_face"),
        "rgba": (np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]), "ok"),
        "16bit": (image.astype(np.uint16) * 257, "ok"),
        "five_channels": (np.zeros((20, 20, 5), np.uint8), "unsupported"),
        "text": ("not an array", "unsupported"),
    }
    for name, (array, status) in arrays.items():
        assert engine.mask(array, name).record.status == status, name
    huge = MaskEngine(MaskingConfig(max_pixels=10_000, preload_templates=False)).mask(image, "big")
    assert huge.record.status == "too_large"


def test_unknown_aligned_size_falls_back_to_the_detector(engine, faces):
    key, image = faces[6]
    result = engine.mask(cv2.resize(image, (200, 200)), key, aligned=True)
    assert result.record.detector == "hog" and "no aligned layout for 200x200" in result.record.reason


def test_cnn_detector_path(faces):
    engine = MaskEngine(MaskingConfig(detector="cnn", mask_type="cloth"))
    key, image = faces[7]
    result = engine.mask(image, key)
    assert result.record.status == "ok" and result.record.detector == "cnn"
    assert coverage_check(result.alpha, _landmarks(engine, image), style=result.record.style).ok


def test_fast_draws_equal_their_reference_formulas():
    """The engine's shortcuts give the very numbers of the code they replace: the mix pick is what
    `rng.choice(n, p=...)` draws, and a grain window is a window of the tiled grain, wrap-around included."""
    import zlib

    from mfr_ray.masking.render import GRAIN_TILE, grain_patch, grain_tile
    from mfr_ray.masking.sampling import rng_for

    weights = {"surgical_blue": 1.0, "N95": 2.5, "cloth": 0.5, "surgical_green": 1.0}
    engine = MaskEngine(MaskingConfig(mix=weights, seed=4, preload_templates=False))
    probs = np.array(list(weights.values())) / sum(weights.values())
    for i in range(400):
        expected = list(weights)[int(rng_for(4, f"k{i}").choice(len(weights), p=probs))]
        assert engine.choose(f"k{i}").mask_type == expected
    for key, shape in [("a", (112, 96)), ("b", (250, 250)), ("c", (300, 40)), ("d", (600, 700))]:
        offset = zlib.crc32(key.encode())
        oy, ox = offset % GRAIN_TILE, (offset >> 8) % GRAIN_TILE
        tiled = np.tile(grain_tile(), (4, 4))[oy : oy + shape[0], ox : ox + shape[1]]
        assert np.array_equal(grain_patch(shape, key), tiled)


def test_record_schema_is_read_off_the_record_fields():
    """The manifest schema follows MaskRecord (written once): every field, in order, with its arrow type,
    and a full record round-trips through it."""
    import pyarrow as pa

    from mfr_ray.masking.records import MaskRecord, record_schema

    schema = record_schema()
    record = MaskRecord("a/b.jpg", "ok", num_faces=1, tilt_deg=2.5, keypoints=[[1.0, 2.0]], width=3, style="{}")
    assert schema.names == list(record.to_row())
    assert (schema.field("num_faces").type, schema.field("tilt_deg").type) == (pa.int64(), pa.float64())
    assert schema.field("keypoints").type == pa.list_(pa.list_(pa.float64()))
    assert pa.Table.from_pylist([record.to_row()], schema=schema).to_pylist() == [record.to_row()]
