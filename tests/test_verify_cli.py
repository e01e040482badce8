"""`mfr export`, `mfr verify` and `mfr identify` as a user runs them (real subprocesses) on LFW images:
the decision at a FAR with the score, the threshold and the alignment method; a clear "no face found" (exit
3) instead of a guess; open-set identification against a gallery."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mfr_ray.serve.gallery import Gallery
from mfr_ray.serve.package import load_package

MFR = str(Path(sys.executable).parent / "mfr")


def mfr(*args: str, tracking_uri: str) -> subprocess.CompletedProcess:
    return subprocess.run([MFR, *args], check=False, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})


def test_export_then_verify_a_pair_from_the_command_line(calibrated, tmp_path, lfw_dir):
    uri = calibrated["tracking"].tracking_uri
    proc = mfr("export", calibrated["summary"]["run_id"], str(tmp_path / "pkg"), "--far", "0.1", "--far", "0.001",
               tracking_uri=uri)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAR 0.001" in proc.stdout and "NOT RESOLVABLE (10 impostor pairs" in proc.stdout
    assert "mlflow run:" in proc.stdout
    expected = {p.far_target: p.threshold for p in calibrated["export"].operating_points}
    assert load_package(tmp_path / "pkg").threshold(0.1) == expected[0.1]

    pairs, scores = calibrated["pairs"], calibrated["scores"]
    first = int(pairs.same.argmax())  # a genuine pair of the evaluation
    a, b = (str(lfw_dir / k) for k in (pairs.left[first], pairs.right[first]))
    proc = mfr("verify", a, b, "--package", str(tmp_path / "pkg"), "--far", "0.1", "--json", tracking_uri=uri)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["score"] == pytest.approx(scores[first], abs=1e-4)
    assert result["threshold"] == expected[0.1] and result["far"] == 0.1
    assert result["decision"] == ("same" if scores[first] >= expected[0.1] else "different")
    assert [i["align_method"] for i in result["images"]] == ["mtcnn", "mtcnn"]
    text = mfr("verify", a, b, "--package", str(tmp_path / "pkg"), "--far", "0.05", tracking_uri=uri)
    assert text.returncode == 2 and "no threshold calibrated at FAR=0.05" in text.stderr


def test_no_face_and_non_image_get_no_decision(calibrated, tmp_path, lfw_dir):
    corner = Image.open(lfw_dir / "Colin_Powell" / "Colin_Powell_0001.jpg").convert("RGB").crop((0, 0, 60, 60))
    buffer = io.BytesIO()
    corner.resize((250, 250)).save(buffer, "JPEG")
    (tmp_path / "wall.jpg").write_bytes(buffer.getvalue())
    (tmp_path / "notes.jpg").write_text("not a picture")
    face = str(lfw_dir / "Colin_Powell" / "Colin_Powell_0002.jpg")
    proc = mfr("verify", face, str(tmp_path / "wall.jpg"), "--package", calibrated["package"], "--far", "0.1",
               "--json", tracking_uri=calibrated["tracking"].tracking_uri)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["decision"] == "no_decision" and result["score"] is None
    assert result["images"][0]["status"] == "ok" and result["images"][1]["status"] == "no_face"
    assert "image B: no_face (no face found" in result["reason"]
    proc = mfr("verify", str(tmp_path / "notes.jpg"), face, "--package", calibrated["package"], "--far", "0.1",
               tracking_uri=calibrated["tracking"].tracking_uri)
    assert proc.returncode == 3 and "image A: decode_error (not an image" in proc.stdout


def test_identify_from_the_command_line(calibrated, tmp_path, lfw_dir):
    package = load_package(calibrated["package"])
    gallery = Gallery.create_or_open(str(tmp_path / "gallery"), package, package_uri=calibrated["package"])
    for identity in ("Colin_Powell", "Tony_Blair"):
        images = [(f"{identity}/{i}", (lfw_dir / identity / f"{identity}_{i:04d}.jpg").read_bytes()) for i in (1, 2)]
        gallery.enrol_images(package, identity, images)
    probe = str(lfw_dir / "Tony_Blair" / "Tony_Blair_0010.jpg")
    proc = mfr("identify", probe, "--gallery", str(tmp_path / "gallery"), "--far", "0.1", "--json",
               tracking_uri=calibrated["tracking"].tracking_uri)  # the package comes from the gallery
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["decision"] == "match" and result["identity"] == "Tony_Blair"
    assert [c["identity"] for c in result["candidates"]] == ["Tony_Blair", "Colin_Powell"]
    assert result["score"] >= result["threshold"] == package.threshold(0.1)
    stranger = str(lfw_dir / "AJ_Cook" / "AJ_Cook_0001.jpg")
    proc = mfr("identify", stranger, "--gallery", str(tmp_path / "gallery"), "--far", "0.001",
               tracking_uri=calibrated["tracking"].tracking_uri)
    assert proc.returncode == 0 and proc.stdout.startswith("unknown (best score"), proc.stdout
