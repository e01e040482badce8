"""Dataset preparation end to end on real LFW faces in a local folder: index, align, mask, write,
images in = rows out, card, idempotent rerun, MLflow dataset run, and the readers."""

from __future__ import annotations

import io
import json

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mfr_ray.config import load_config
from mfr_ray.data import load_label_map, paired_dataset, read_prepared
from mfr_ray.data.config import PrepareConfig
from mfr_ray.data.index import index_images, load_index
from mfr_ray.data.job import run_prepare
from mfr_ray.data.layout import DatasetLayout
from mfr_ray.data.process import OUTPUT_SCHEMA
from tests.prepare_inputs import (
    BAD_KEY,
    make_face_tree,
    output_files,
    prepare_config,
    read_variant,
    write_config,
)


def _config(tmp_path, **sections) -> PrepareConfig:
    path = write_config(tmp_path / "prepare.yaml", prepare_config(**sections))
    return load_config(path, expected=PrepareConfig)


def test_prepare_and_evaluation_share_one_read_decode_align_path(tmp_path, lfw_dir):
    """A real face, the same face as grey JPEG, a grey non-face, a truncated JPEG and a file gone since
    listing: prepare's `read_decode_align` gives each its status, reason (decode note first, then the
    aligner's) and method, and evaluation's FolderCropper gives the same rows and crops."""
    from mfr_ray.evaluation.config import ImageSourceConfig
    from mfr_ray.evaluation.sources import FolderCropper
    from mfr_ray.faces.aligner import RESCUE_MISS, FaceAligner
    from mfr_ray.faces.config import AlignConfig
    from mfr_ray.faces.reading import read_decode_align

    root = tmp_path / "in"
    face_key, *_ = make_face_tree(lfw_dir, root, count=1, per_identity=1)
    grey_face, grey_blank, gone = "Grey/Grey_0001.jpg", "Grey/Grey_0002.png", "Gone/Gone_0001.jpg"
    (root / "Grey").mkdir()
    Image.open(root / face_key).convert("L").save(root / grey_face)
    Image.fromarray(np.full((120, 120), 128, np.uint8)).save(root / grey_blank)
    keys = [face_key, grey_face, grey_blank, BAD_KEY, gone]
    align = AlignConfig(crop="112x96", fallbacks=["center"])

    def read(key):
        path = root / key
        return (path.read_bytes(), "", "") if path.exists() else (None, "decode_error", "file disappeared")

    crops = dict(zip(keys, read_decode_align(keys, read, FaceAligner(align)), strict=True))
    assert (crops[face_key].status, crops[face_key].reason, crops[face_key].method) == ("ok", "", "mtcnn")
    assert crops[face_key].aligned.crop.shape == (112, 96, 3)
    assert (crops[grey_face].status, crops[grey_face].reason) == ("ok", "converted from L")
    assert crops[grey_blank].status == "ok_fallback" and crops[grey_blank].method == "center"
    assert crops[grey_blank].reason == f"converted from L; mtcnn found no face; {RESCUE_MISS}; centre box guessed"
    for key in (BAD_KEY, gone):
        assert (crops[key].status, crops[key].method, crops[key].aligned) == ("decode_error", "none", None)
    assert crops[BAD_KEY].reason and crops[gone].reason == "file disappeared"

    folder = FolderCropper(ImageSourceConfig(uri=str(root), align=align))({"key": np.array(keys)})
    assert folder["status"].tolist() == [crops[k].status for k in keys]
    assert folder["method"].tolist() == [crops[k].method for k in keys]
    assert folder["reason"].tolist()[:-1] == [crops[k].reason for k in keys[:-1]]  # gone: storage's words
    for i, key in enumerate(keys):
        expected = crops[key].aligned.crop if crops[key].aligned is not None else 0
        assert (folder["crop"][i] == expected).all(), key


def test_index_streams_shards_and_labels_by_folder(tmp_path, lfw_dir):
    keys = make_face_tree(lfw_dir, tmp_path / "in", count=10, per_identity=2)
    cfg = _config(tmp_path, input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"),
                  index={"shard_size": 4})
    layout = DatasetLayout(cfg.output.uri, cfg.storage)
    index = index_images(cfg, layout)
    assert index.num_images == len(keys) == 11
    assert index.shard_sizes == [4, 4, 3]
    assert index.unlabelled == 1  # loose.jpg; notes.txt is not an image
    assert index.identities == sorted({k.split("/")[0] for k in keys})
    listed = [k for s in index.shard_ids for k in pq.read_table(layout.index_path(s))["source_key"].to_pylist()]
    assert sorted(listed) == keys
    assert load_index(cfg, layout) == index

    limited = _config(tmp_path, input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out2"),
                      index={"shard_size": 4, "limit": 5})
    assert index_images(limited, DatasetLayout(limited.output.uri, limited.storage)).shard_sizes == [4, 1]

    chosen = [keys[0], keys[3], keys[-1], "Nobody/Nobody_0001.jpg"]
    (tmp_path / "keys.txt").write_text("\n".join(chosen) + "\n")
    included = _config(tmp_path, input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out3"),
                       index={"shard_size": 4, "include": str(tmp_path / "keys.txt")})
    layout3 = DatasetLayout(included.output.uri, included.storage)
    index3 = index_images(included, layout3)
    listed3 = [k for s in index3.shard_ids for k in pq.read_table(layout3.index_path(s))["source_key"].to_pylist()]
    assert listed3 == sorted(chosen[:3]) and index3.num_images == 3


@pytest.mark.slow
def test_prepare_local_end_to_end_and_rerun(tmp_path, lfw_dir, ray_local, tmp_tracking_uri):
    keys = make_face_tree(lfw_dir, tmp_path / "in", count=12)
    out = tmp_path / "out"
    cfg = _config(
        tmp_path, input_uri=str(tmp_path / "in"), output_uri=str(out),
        variants=[{"name": "masked", "copies": 2}], tracking={"enabled": True, "experiment": "prepare-test"},
    )
    summary = run_prepare(cfg, progress=False)
    assert summary.complete and summary.processed_images == len(keys) == 13

    unmasked = read_variant(out, "unmasked")
    masked = read_variant(out, "masked")
    assert unmasked.schema == OUTPUT_SCHEMA
    # images in = rows out: each input exactly once in the unmasked variant, ok or with a status
    assert sorted(unmasked["source_key"].to_pylist()) == keys
    rows = {r["source_key"]: r for r in unmasked.to_pylist()}
    assert rows[BAD_KEY]["status"] == "decode_error" and rows[BAD_KEY]["image"] is None
    assert rows[BAD_KEY]["reason"]
    good = [k for k in keys if k != BAD_KEY]
    assert all(rows[k]["status"] == "ok" for k in good)
    assert {rows[k]["align_method"] for k in good} <= {"mtcnn", "dlib", "center"}
    assert "mtcnn" in {rows[k]["align_method"] for k in good}

    identities = load_label_map(str(out))
    assert identities == sorted({k.split("/")[0] for k in keys})
    assert all(identities[r["identity_id"]] == r["identity"] for r in rows.values())

    # two masked copies per aligned face, with their mask type from the mixture
    masked_rows = masked.to_pylist()
    assert sorted((r["source_key"], r["copy_index"]) for r in masked_rows) == sorted(
        (k, i) for k in good for i in (0, 1)
    )
    ok_masked = [r for r in masked_rows if r["status"] == "ok"]
    assert len(ok_masked) >= len(masked_rows) * 0.8
    assert {r["mask_type"] for r in ok_masked} <= {"surgical_blue", "N95", "cloth"}

    # the mask covers the lower face of the aligned 112x96 crop and leaves the eyes alone
    for row in ok_masked[:6]:
        plain = np.asarray(Image.open(io.BytesIO(rows[row["source_key"]]["image"])), dtype=np.float32)
        covered = np.asarray(Image.open(io.BytesIO(row["image"])), dtype=np.float32)
        assert plain.shape == covered.shape == (112, 96, 3)
        change = np.abs(plain - covered).mean(axis=2)
        assert change[70:105].mean() > 4 * change[:40].mean() + 5

    card = json.loads((out / "dataset_card.json").read_text())
    assert card["num_images"] == 13 and card["counts"]["rows"]["masked"] == 2 * len(good)
    assert card["counts"]["status"]["unmasked"] == {"ok": len(good), "decode_error": 1}
    assert sum(card["counts"]["identities_ok"].values()) == len(good)
    assert (out / "dataset_card.md").read_text().startswith("# Dataset card")

    run = mlflow.get_run(summary.run_id)
    assert run.data.metrics["num_images"] == 13 and run.data.tags["mfr.run_type"] == "dataset"
    assert run.data.params["variants"]  # the config is logged
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["test"]

    # rerunning a finished job processes nothing and writes nothing
    before = output_files(out)
    again = run_prepare(cfg, progress=False)
    assert again.processed_images == 0 and again.skipped_shards == 2 and again.run_id is None
    assert output_files(out) == before

    # readers: ok rows of chosen variants, and (unmasked, masked) pairs of the same image
    assert read_prepared(str(out), variants=["unmasked"]).count() == len(good)
    assert read_prepared(str(out), variants=["unmasked"], statuses=None).count() == 13
    pairs = paired_dataset(str(out)).take_all()
    assert sorted(p["source_key"] for p in pairs) == sorted({r["source_key"] for r in ok_masked})
    assert all(p["image_masked"] != p["image_unmasked"] for p in pairs)
    assert all(identities[p["identity_id"]] == p["source_key"].split("/")[0] for p in pairs)
