"""`mfr mask` on a small tree of real LFW photos: identity folders kept at any depth, one manifest row per
input (bad files included), a contact sheet, and a config file plus flags."""

from __future__ import annotations

import json
import os
import re
import shutil

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from mfr_ray.cli import app
from mfr_ray.imageio import encode_image, read_image_file
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
    assert re.search(r"decode_error +1\n", result.output) and "img/s" in result.output
    assert f"check: files in {count} = rows out {count}: OK" in result.output
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


def _mask(*args: str):
    return CliRunner().invoke(app, ["mask", *map(str, args)])


def _manifest(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_single_file_into_a_folder_or_a_bad_suffix(tmp_path):
    """An output without suffix is a folder (the file keeps its name); a suffix we cannot write is refused
    before any work, with the writable ones named."""
    source = lfw_files(1, seed=10)[0]
    result = _mask(source, tmp_path / "out", "--seed", "1")
    assert result.exit_code == 0, result.output
    rows = _manifest(tmp_path / "out_manifest.parquet")
    assert [(row["key"], row["status"]) for row in rows] == [(source.name, "ok")]
    assert rows[0]["output_path"] == str(tmp_path / "out" / source.name)
    assert read_image_file(tmp_path / "out" / source.name).image.shape == (250, 250, 3)

    result = _mask(source, tmp_path / "masked.tif")
    assert result.exit_code == 2 and "cannot write .tif images" in result.output and ".png" in result.output
    assert not list(tmp_path.glob("masked*"))


def test_same_name_with_other_suffix_gets_its_own_output(tmp_path):
    """`same.png` and `same.tif` (two different people) both come out, each from its own input."""
    first, second = lfw_files(2, seed=11)
    folder = tmp_path / "in" / "someone"
    folder.mkdir(parents=True)
    faces = [read_image_file(path).image for path in (first, second)]
    (folder / "same.png").write_bytes(encode_image(faces[0], "png"))
    Image.fromarray(faces[1]).save(folder / "same.tif")
    (tmp_path / "in" / "other").mkdir()
    Image.fromarray(faces[0]).save(tmp_path / "in" / "other" / "x.tif")
    (tmp_path / "in" / "other" / "x.tif.png").write_bytes(encode_image(faces[1], "png"))
    result = _mask(tmp_path / "in", tmp_path / "out", "--seed", "2")
    assert result.exit_code == 0, result.output
    rows = {row["key"]: row for row in _manifest(tmp_path / "out_manifest.parquet")}
    assert rows["someone/same.png"]["output_path"] == str(tmp_path / "out" / "someone" / "same.png")
    assert rows["someone/same.tif"]["output_path"] == str(tmp_path / "out" / "someone" / "same.tif.png")
    assert rows["other/x.tif.png"]["output_path"] == str(tmp_path / "out" / "other" / "x.tif.png")
    assert rows["other/x.tif"]["output_path"] == str(tmp_path / "out" / "other" / "x.tif~2.png")
    pairs = [("someone/same.png", *faces), ("someone/same.tif", *faces[::-1])]
    for key, face, other in [*pairs, ("other/x.tif", *faces), ("other/x.tif.png", *faces[::-1])]:
        assert rows[key]["status"] == "ok", rows[key]
        written = read_image_file(rows[key]["output_path"]).image.astype(int)
        assert np.abs(written - face).mean() < np.abs(written - other).mean() / 2  # its own face, masked


def test_every_file_is_a_row(tmp_path):
    """Files that are not images, or images we cannot decode, are rows with a status and a reason."""
    source = lfw_files(1, seed=12)[0]
    root = tmp_path / "in"
    (root / "id").mkdir(parents=True)
    shutil.copy(source, root / "id" / source.name)
    (root / "id" / "notes.txt").write_text("not a face")
    (root / "README").write_text("no suffix")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "id" / "phone.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    (root / "id" / "junk.heic").write_bytes(b"neither heic nor anything")
    with open(os.path.join(os.fsencode(root / "id"), b"caf\xe9.jpg"), "wb") as fh:  # a Latin-1 name
        fh.write(source.read_bytes())
    result = _mask(root, tmp_path / "out", "--manifest-format", "csv")
    assert result.exit_code == 0, result.output
    assert "check: files in 7 = rows out 7: OK" in result.output and re.search(r"skipped +3\n", result.output)
    import csv

    with (tmp_path / "out_manifest.csv").open() as fh:
        rows = {row["key"]: row for row in csv.DictReader(fh)}
    assert rows[f"id/{source.name}"]["status"] == "ok" and rows["id/caf\\xe9.jpg"]["status"] == "ok"
    assert {k: rows[k]["status"] for k in ("id/notes.txt", "README", ".DS_Store")} == dict.fromkeys(
        ("id/notes.txt", "README", ".DS_Store"), "skipped"
    )
    assert "suffix '.txt'" in rows["id/notes.txt"]["reason"] and "no file suffix" in rows["README"]["reason"]
    for key in ("id/phone.HEIC", "id/junk.heic"):
        assert rows[key]["status"] == "unsupported" and "HEIC" in rows[key]["reason"], rows[key]
    written = sorted(os.listdir(os.fsencode(tmp_path / "out" / "id")))
    assert written == sorted([b"caf\xe9.jpg", os.fsencode(source.name)])


def test_output_over_or_inside_the_input_is_refused(tmp_path):
    """`mfr mask d d` would overwrite the originals: refused unless --in-place, which then does it."""
    root = tmp_path / "d"
    (root / "id").mkdir(parents=True)
    source = lfw_files(1, seed=13)[0]
    shutil.copy(source, root / "id" / source.name)
    original = source.read_bytes()
    for output in (root, root / "masked", tmp_path / "d" / ".." / "d"):
        result = _mask(root, output)
        assert result.exit_code == 2 and "--in-place" in result.output, result.output
    single = root / "id" / source.name
    for output in (single, root / "id"):  # the same file, named or as the output folder
        result = _mask(single, output)
        assert result.exit_code == 2 and "--in-place" in result.output, result.output
    assert (root / "id" / source.name).read_bytes() == original and not (
        tmp_path / "d_manifest.parquet"
    ).exists()
    assert {p.name for p in root.rglob("*")} == {"id", source.name}

    result = _mask(root, root / "masked", "--in-place", "--seed", "4")
    assert result.exit_code == 0, result.output
    rows = _manifest(root / "masked_manifest.parquet")  # this run's own files are not read as inputs
    assert [(row["key"], row["status"]) for row in rows] == [(f"id/{source.name}", "ok")]
    assert (root / "id" / source.name).read_bytes() == original

    result = _mask(root, root, "--in-place", "--seed", "4")
    assert result.exit_code == 0, result.output
    assert (root / "id" / source.name).read_bytes() != original  # asked for, so overwritten


def test_symlinks_are_not_followed_out_of_the_input(tmp_path):
    inside, outside = lfw_files(2, seed=14)
    root = tmp_path / "in"
    (root / "id").mkdir(parents=True)
    shutil.copy(inside, root / "id" / "face.jpg")
    (tmp_path / "secret").mkdir()
    shutil.copy(outside, tmp_path / "secret" / "other.jpg")
    (root / "id" / "outside.jpg").symlink_to(tmp_path / "secret" / "other.jpg")
    (root / "outside_dir").symlink_to(tmp_path / "secret", target_is_directory=True)
    (root / "id" / "again.jpg").symlink_to(root / "id" / "face.jpg")
    (root / "loop").symlink_to(root, target_is_directory=True)

    result = _mask(root, tmp_path / "out", "--seed", "5")
    assert result.exit_code == 0, result.output
    rows = {row["key"]: row for row in _manifest(tmp_path / "out_manifest.parquet")}
    assert rows.pop("id/face.jpg")["status"] == "ok"
    assert set(rows) == {"id/outside.jpg", "outside_dir", "id/again.jpg", "loop"}
    for row in rows.values():
        assert row["status"] == "skipped" and row["reason"].startswith("symlink not followed"), row
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.jpg")) == ["face.jpg"]

    result = _mask(root, tmp_path / "out2", "--seed", "5", "--follow-symlinks")
    assert result.exit_code == 0, result.output
    rows = {row["key"]: row for row in _manifest(tmp_path / "out2_manifest.parquet")}
    assert rows["id/again.jpg"]["status"] == "ok"  # a link inside the input is read
    for key in ("id/outside.jpg", "outside_dir"):
        assert rows[key]["status"] == "skipped" and "outside the input" in rows[key]["reason"], rows[key]
    assert rows["loop"]["status"] == "skipped" and "loop" in rows["loop"]["reason"]
    assert len(rows) == 5 and not (tmp_path / "out2" / "outside_dir").exists()


def test_rerun_into_an_earlier_manifest_refuses_or_starts_clean(tmp_path):
    source, lost = lfw_files(2, seed=15)
    (tmp_path / "in").mkdir()
    shutil.copy(source, tmp_path / "in" / source.name)
    shutil.copy(lost, tmp_path / "in" / lost.name)
    assert _mask(tmp_path / "in", tmp_path / "out").exit_code == 0
    (tmp_path / "out" / lost.name).unlink()  # a done row whose image is gone is redone by --resume
    result = _mask(tmp_path / "in", tmp_path / "out", "--resume")
    assert result.exit_code == 0 and "resume: 1 of 2 files done" in result.output, result.output
    assert read_image_file(tmp_path / "out" / lost.name).ok
    (tmp_path / "in" / lost.name).unlink()
    journal = tmp_path / "out_manifest.jsonl"
    before = journal.read_bytes()
    result = _mask(tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 2 and "--resume" in result.output and "--overwrite" in result.output
    assert journal.read_bytes() == before
    result = _mask(tmp_path / "in", tmp_path / "out", "--overwrite")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert "options" in lines[0] and [row["key"] for row in lines[1:]] == [source.name]
    assert len(_manifest(tmp_path / "out_manifest.parquet")) == 1
    assert os.path.getsize(journal) > 0


def test_polygon_type_is_drawn_as_its_registered_spec_says(tmp_path):
    """`--mask-type polygon` is looked up in the MASK_TYPES registry, whose spec says how it is drawn: the
    landmark outline (checked against the face's own landmarks) filled with a palette colour, front view,
    no pattern, every masked pixel that colour. A spec that contradicts itself is refused."""
    from mfr_ray.masking import MaskEngine, MaskingConfig
    from mfr_ray.masking.render import polygon_outline
    from mfr_ray.masking.templates import MaskTypeSpec
    from mfr_ray.registry import MASK_TYPES

    spec = MASK_TYPES.get("polygon")
    assert spec.drawing == "polygon" and spec.build is None
    assert {name for name, s in MASK_TYPES.items() if s.drawing == "polygon"} == {"polygon"}
    source = lfw_files(1, seed=12)[0]
    result = _mask(source, tmp_path / "out", "--mask-type", "polygon", "--seed", "2")
    assert result.exit_code == 0, result.output
    (row,) = _manifest(tmp_path / "out_manifest.parquet")
    assert row["status"] == "ok" and row["mask_type"] == "polygon" and row["pattern"] is None
    assert row["color"] in spec.palette and row["template_view"] == "front"

    engine = MaskEngine(MaskingConfig(preload_templates=False))
    face = read_image_file(source).image
    grey = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    (box,) = engine.locator.landmarker.detect(face, grey)
    outline = polygon_outline(engine.locator.landmarker.fit(grey, box))
    assert np.abs(np.array(row["polygon"]) - outline).max() < 0.01
    written = read_image_file(row["output_path"]).image.astype(int)
    inside = np.zeros(face.shape[:2], np.uint8)
    cv2.fillPoly(inside, [np.round(outline).astype(np.int32)], 1)
    inside = cv2.erode(inside, np.ones((5, 5), np.uint8)).astype(bool)  # JPEG edges left out
    colour = np.array([int(row["color"][i : i + 2], 16) for i in (1, 3, 5)])
    assert np.abs(written[inside] - colour).mean() < 12

    with pytest.raises(ValueError, match="polygon one has none"):
        MaskTypeSpec("#000000", build=lambda color: None, drawing="polygon", palette=("#000000",))
    with pytest.raises(ValueError, match="needs `build`"):
        MaskTypeSpec("#000000")
