"""`mfr mask` on a small tree of real LFW photos: identity folders kept at any depth, one manifest row per
input (bad files included), a contact sheet, and a config file plus flags."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
from typer.testing import CliRunner

from mfr_ray.cli import app
from mfr_ray.imageio import read_image_file
from mfr_ray.masking.quality import lfw_files
from mfr_ray.paths import PROJECT_ROOT


def _tree(root):
    files = lfw_files(6, seed=8)
    for i, path in enumerate(files):
        target = root / ("batch_a" if i % 2 else "batch_b/deeper") / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (root / "batch_a" / "Zoë_Ünïcode").mkdir()
    shutil.copy(files[0], root / "batch_a" / "Zoë_Ünïcode" / "фото_0001.jpg")
    (root / "batch_a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return 8


def test_mask_folder_tree_writes_images_manifest_and_sheet(tmp_path):
    count = _tree(tmp_path / "in")
    out = tmp_path / "out"
    sheet = tmp_path / "sheet.png"
    result = CliRunner().invoke(
        app,
        [
            "mask",
            str(tmp_path / "in"),
            str(out),
            "--mix",
            "surgical_blue:1,N95:1,cloth:2",
            "--pattern",
            "random",
            "--seed",
            "3",
            "--contact-sheet",
            str(sheet),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "decode_error 1" in result.output
    table = pq.read_table(tmp_path / "out_manifest.parquet").to_pylist()
    assert len(table) == count
    by_key = {row["key"]: row for row in table}
    assert by_key["batch_a/broken.jpg"]["status"] == "decode_error" and by_key["batch_a/broken.jpg"]["reason"]
    for row in table:
        if row["status"] == "ok":
            assert row["mask_type"] in ("surgical_blue", "N95", "cloth") and row["pattern"]
            written = out / row["key"]
            assert row["output_path"] == str(written) and read_image_file(written).image.shape == (
                250,
                250,
                3,
            )
    assert sum(row["status"] == "ok" for row in table) >= count - 2
    assert read_image_file(sheet).ok


def test_mask_single_file_with_config_and_csv(tmp_path):
    source = lfw_files(1, seed=9)[0]
    out = tmp_path / "masked.png"
    result = CliRunner().invoke(
        app,
        [
            "mask",
            str(source),
            str(out),
            "-c",
            str(PROJECT_ROOT / "configs" / "mask_default.yaml"),
            "--mask-type",
            "KN95",
            "--color",
            "#3366cc",
            "--manifest-format",
            "csv",
        ],
    )
    assert result.exit_code == 0, result.output
    assert read_image_file(out).ok
    manifest = (tmp_path / "masked_manifest.csv").read_text()
    assert "KN95" in manifest and "#3366cc" in manifest


def test_bad_option_exits_with_a_message(tmp_path):
    result = CliRunner().invoke(app, ["mask", str(tmp_path), str(tmp_path / "o"), "--mask-type", "balaclava"])
    assert result.exit_code == 2 and "unknown mask_type" in result.output
