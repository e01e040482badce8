"""Per-search operating points (FPIR): a case worked by hand, the unsure rule, and thresholds that follow the
live gallery - a package's never-enrolled calibration faces (real CelebA photos, bare and masked with
held-out masks) against a gallery of real LFW people."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mfr_ray.serve.search_calibration import decision_point, search_point

CALIBRATION_IDENTITIES = 12


def test_search_point_by_hand():
    scores = np.arange(1, 11) / 10  # best scores of 10 never-enrolled faces: 0.1 .. 1.0
    point = search_point(scores, 0.1, "ten faces")
    assert point.false_accepts == 1 and 0.9 < point.threshold <= 1.0 and point.resolvable  # floor(0.1 * 10) = 1
    strict = search_point(scores, 0.05, "ten faces")  # 1 / 10 > 0.05: cannot be measured on 10 faces
    assert strict.false_accepts == 0 and strict.threshold > 1.0 and not strict.resolvable


def test_an_unsure_face_takes_the_stricter_threshold():
    points = {False: search_point(np.linspace(0, 0.5, 100), 0.01, "bare"),
              True: search_point(np.linspace(0, 0.8, 100), 0.01, "masked")}
    assert decision_point(points, 0.95) == (points[True], "masked")
    assert decision_point(points, 0.05) == (points[False], "bare")
    assert decision_point(points, 0.5) == (points[True], "unsure")  # between 0.3 and 0.7: either could hold
    assert decision_point(points, None)[1] == "unsure"


@pytest.fixture(scope="module")
def package_with_calibration(calibrated, celeba_dir, tmp_path_factory):
    from mfr_ray.serve.package import load_package
    from mfr_ray.serve.search_calibration import SEARCH_CALIBRATION_FILE, add_search_calibration

    folder = tmp_path_factory.mktemp("search") / "package"
    shutil.copytree(calibrated["package"], folder)
    calibration = add_search_calibration(folder, celeba_dir, per_identity=1, max_identities=CALIBRATION_IDENTITIES)
    assert (folder / SEARCH_CALIBRATION_FILE).is_file()
    return load_package(folder), calibration


def _lfw(lfw_dir: Path, name: str, number: int) -> bytes:
    return (lfw_dir / name / f"{name}_{number:04d}.jpg").read_bytes()


def test_thresholds_follow_the_live_gallery(package_with_calibration, lfw_dir, celeba_dir, tmp_path):
    from mfr_ray.serve.gallery import Gallery
    from mfr_ray.serve.recognise import identify
    from mfr_ray.serve.search_calibration import SearchCalibration, gallery_points

    package, calibration = package_with_calibration
    faces = len(calibration.embeddings)
    assert faces >= CALIBRATION_IDENTITIES + 6  # each photo bare, and masked where a mask could be drawn
    assert calibration.in_state(True).sum() >= 6 and calibration.in_state(False).sum() >= 6  # the classifier sees both
    gallery = Gallery.create_or_open(str(tmp_path / "gallery"), package)
    for name in ("Colin_Powell", "Tony_Blair", "Gloria_Macapagal_Arroyo"):
        gallery.enrol_images(package, name, [(f"{name}/1.jpg", _lfw(lfw_dir, name, 1))])
    fpir = 0.2
    before, identities = gallery_points(SearchCalibration.of(package), gallery, fpir)
    assert identities == 3 and all(p.far_target == fpir for p in before.values())
    for masked, point in before.items():  # at most 20% of the calibration faces of that state reach it
        assert point.false_accepts <= fpir * point.n_impostor and point.n_impostor == calibration.in_state(masked).sum()

    # Enrol the calibration people themselves (another photo each): they are no longer strangers to this
    # gallery, their best scores rise, and so must the thresholds - computed live, not frozen at export.
    for folder in sorted(p for p in Path(celeba_dir).iterdir() if p.is_dir())[:CALIBRATION_IDENTITIES]:
        photo = sorted(folder.iterdir())[1]
        gallery.enrol_images(package, folder.name, [(f"{folder.name}/{photo.name}", photo.read_bytes())])
    after, identities = gallery_points(SearchCalibration.of(package), gallery, fpir)
    assert identities > 3 + CALIBRATION_IDENTITIES // 2
    assert after[False].threshold > before[False].threshold + 0.05

    result = identify(package, gallery, _lfw(lfw_dir, "Colin_Powell", 2), None, k=3, fpir=fpir)
    assert result.fpir == fpir and result.far is None and result.gallery_identities == identities
    assert result.comparison_kind == "search-bare" and result.threshold == pytest.approx(after[False].threshold)
    assert result.candidates[0].identity == "Colin_Powell" and "per search" in result.promise


def test_a_package_without_calibration_refuses_an_fpir(calibrated, lfw_dir, tmp_path):
    from mfr_ray.serve.gallery import Gallery
    from mfr_ray.serve.package import PackageError, load_package
    from mfr_ray.serve.recognise import identify

    package = load_package(calibrated["package"])
    gallery = Gallery.create_or_open(str(tmp_path / "gallery"), package)
    with pytest.raises(PackageError, match="no search calibration"):
        identify(package, gallery, _lfw(lfw_dir, "Colin_Powell", 2), None, fpir=0.01)
