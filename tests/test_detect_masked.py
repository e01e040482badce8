"""Masked faces found as well as bare ones, and no non-face taken for a face (issue 24, point 5): real LFW
photos masked the way the masked-identification benchmark masks its probes, and the real non-face set cut
from LFW and CelebA-299 frames, through the service's own path."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mfr_ray.evaluation.detection import count, detect_all, landmark_shift
from mfr_ray.evaluation.nonfaces import FACE_ZONE, MIN_CONTRAST, OUTPUT_SIDE, nonface_set
from mfr_ray.faces.aligner import RESCUE_METHOD, FaceAligner
from mfr_ray.faces.config import AlignConfig
from mfr_ray.imageio import Status, encode_image
from mfr_ray.masking.held_out import N95_HELD_OUT, mask_photo
from mfr_ray.paths import shared_dir

# Held-out N95 copies the first pass (MTCNN, then dlib) misses: the first two found by the padded pass, the
# last two only by the mirrored one (benchmarks/bench_detect_masked.py's exploration, seed 24).
MISSED = ["Andre_Agassi/Andre_Agassi_0012.jpg", "Carlos_Moya/Carlos_Moya_0010.jpg",
          "Matt_Roney/Matt_Roney_0001.jpg", "Prince_Felipe/Prince_Felipe_0001.jpg"]
SERVING = {"crop": "112x96", "fallbacks": ["dlib"], "num_threads": 1}


@pytest.fixture(scope="module")
def nonfaces():
    return nonface_set()


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> tuple[list[bytes], list[bytes]]:
    """(bare, held-out-N95 copy) of each MISSED photo, masked by the identification benchmark's code."""
    root, out = shared_dir() / "datasets" / "lfw" / "lfw-deepfunneled", tmp_path_factory.mktemp("masked")
    copies = []
    for key in MISSED:
        assert mask_photo(str(root / key), N95_HELD_OUT, str(out / key), 0) == N95_HELD_OUT
        copies.append((out / key).read_bytes())
    return [(root / key).read_bytes() for key in MISSED], copies


def test_the_nonface_set_is_real_fixed_and_away_from_the_face(nonfaces):
    assert len(nonfaces) == 300 and len({n.key for n in nonfaces}) == 300
    assert [n.key for n in nonface_set(20)] == [n.key for n in nonface_set(20)]
    assert [n.key for n in nonface_set(20, seed=1)] != [n.key for n in nonface_set(20)]
    sources = Counter(n.key.split("/")[0] for n in nonfaces)
    assert sources == {"lfw-deepfunneled": 240, "celeba299": 60}
    assert len({n.region for n in nonfaces}) >= 6  # sides, top, bottom and corners
    zl, zt, zr, zb = FACE_ZONE
    for item in nonfaces:
        left, top, right, bottom = map(int, item.key.rsplit("@", 1)[1].split(","))
        assert right <= zl or left >= zr or bottom <= zt or top >= zb
        assert item.image.shape == (OUTPUT_SIDE, OUTPUT_SIDE, 3)
        assert item.image.mean(axis=2).std() >= MIN_CONTRAST * 0.8  # textured, not grey fill (resampled)


def test_no_nonface_is_an_ok_face_through_the_service(calibrated, nonfaces):
    """Through `ModelPackage.embed_images` (the service's chain, rescue pass included): files in = rows
    out, each with a status and a reason, and not one `ok` face."""
    from mfr_ray.serve.package import load_package

    package = load_package(calibrated["package"], num_threads=1)
    assert AlignConfig.model_validate(package.serving_align()).rescue
    results = package.embed_images([encode_image(n.image, "jpg", quality=95) for n in nonfaces])
    assert len(results) == len(nonfaces)
    accepted = [n.key for n, r in zip(nonfaces, results, strict=True) if r.status == Status.OK]
    assert accepted == []
    assert all(r.status == Status.NO_FACE and r.reason for r in results)


def test_masked_faces_the_first_pass_misses_are_found_by_the_rescue(masked):
    bare, copies = masked
    before = detect_all(FaceAligner(AlignConfig(**SERVING, rescue=False)), copies)
    assert [c.status for c in before] == [Status.NO_FACE] * len(MISSED)
    rescuer = FaceAligner(AlignConfig(**SERVING, rescue=True))
    after, found_bare = detect_all(rescuer, copies), detect_all(rescuer, bare)
    assert count(after).methods == {RESCUE_METHOD: len(MISSED)}
    for bare_crop, crop in zip(found_bare, after, strict=True):
        assert bare_crop.method == "mtcnn"
        crop.method = "mtcnn"  # compare the rescued points (mapped back from padding / mirror) with the bare
        shift = landmark_shift(bare_crop, crop)
        # The eyes, which the mask leaves, land near where they were (MTCNN moves them up to ~0.37 of their
        # distance on these four, bench_detect_masked.py: p90 0.29); a point left in the padded frame's
        # coordinates (+62 px) or a mirror not undone (eyes swapped) would be more than one distance away.
        assert shift[:2].max() < 0.5, shift


def test_the_rescue_leaves_faces_the_first_pass_finds_as_they_were(masked):
    bare, _ = masked
    off = detect_all(FaceAligner(AlignConfig(**SERVING, rescue=False)), bare)
    on = detect_all(FaceAligner(AlignConfig(**SERVING, rescue=True)), bare)
    for a, b in zip(off, on, strict=True):
        assert (a.status, a.method) == (b.status, b.method) == (Status.OK, "mtcnn")
        np.testing.assert_array_equal(a.aligned.crop, b.aligned.crop)
