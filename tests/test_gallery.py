"""`mfr enrol` into a Parquet gallery on real Ray Data with real LFW identities: several templates per
identity, one row per file (a non-image, a background patch without a face and a file outside any identity
folder included), incremental enrolment, removal, and identification with open-set rejection."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mfr_ray.config.common import TrackingConfig
from mfr_ray.serve.enrolment import enrol
from mfr_ray.serve.export import export_package
from mfr_ray.serve.gallery import GALLERY_JSON, TEMPLATES_DIR, Gallery
from mfr_ray.serve.package import PackageError, load_package
from mfr_ray.serve.recognise import MATCH, NO_DECISION, UNKNOWN, identify

A, B, C, STRANGER = "Colin_Powell", "Tony_Blair", "Serena_Williams", "AJ_Cook"


def lfw_image(lfw_dir: Path, identity: str, index: int) -> Path:
    return lfw_dir / identity / f"{identity}_{index:04d}.jpg"


def background_patch(lfw_dir: Path) -> bytes:
    """The top-left corner of an LFW photo blown up to 250 px: a real photo with no face in it."""
    image = Image.open(lfw_image(lfw_dir, A, 1)).convert("RGB").crop((0, 0, 60, 60)).resize((250, 250))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.slow
def test_enrol_increment_remove_identify(calibrated, lfw_dir, tmp_path, ray_local):
    root, out = tmp_path / "people", str(tmp_path / "gallery")
    for identity, indices in ((A, (1, 2, 3)), (B, (1, 2))):
        (root / identity).mkdir(parents=True)
        for i in indices:
            shutil.copy(lfw_image(lfw_dir, identity, i), root / identity)
    (root / A / "notes.jpg").write_text("not an image")
    (root / B / "corner.jpg").write_bytes(background_patch(lfw_dir))
    (root / "loose.jpg").write_bytes(lfw_image(lfw_dir, A, 4).read_bytes())

    first = enrol(calibrated["package"], str(root), out, progress=False)
    assert (first.files, first.rows_written, first.already_enrolled) == (8, 8, 0)
    assert first.status_counts == {"ok": 5, "decode_error": 1, "no_face": 1, "unsupported": 1}
    gallery = Gallery(out)
    rows = {r["source_key"]: r for r in gallery.table.to_pylist()}
    assert rows[f"{A}/notes.jpg"]["reason"] == "not an image (unrecognised content)"
    assert rows[f"{B}/corner.jpg"]["reason"].startswith("no face found")
    assert rows[f"{B}/corner.jpg"]["embedding"] is None and rows["loose.jpg"]["status"] == "unsupported"
    assert len(rows[f"{A}/{A}_0001.jpg"]["embedding"]) == 128
    assert gallery.identities() == [A, B] and gallery.templates().num_rows == 5
    assert len({r["template_id"] for r in rows.values()}) == 8

    package = load_package(calibrated["package"])
    probe = lfw_image(lfw_dir, A, 10).read_bytes()
    found = identify(package, gallery, probe, far=0.1, k=2)
    assert found.decision == MATCH and found.identity == A and found.score >= found.threshold
    assert [c.identity for c in found.candidates] == [A, B] and found.image.align_method == "mtcnn"
    stranger = identify(package, gallery, lfw_image(lfw_dir, STRANGER, 1).read_bytes(), far=1e-3, k=2)
    assert stranger.decision == UNKNOWN and stranger.identity is None and stranger.score < stranger.threshold
    no_face = identify(package, gallery, background_patch(lfw_dir), far=0.1)
    assert no_face.decision == NO_DECISION and no_face.image.status == "no_face" and not no_face.candidates

    # incremental: a new identity and one more image of A; what is enrolled already is not redone
    (root / C).mkdir()
    for i in (1, 2):
        shutil.copy(lfw_image(lfw_dir, C, i), root / C)
    shutil.copy(lfw_image(lfw_dir, A, 5), root / A)
    second = enrol(calibrated["package"], str(root), out, progress=False)
    assert (second.files, second.rows_written, second.already_enrolled) == (11, 3, 8)
    gallery.refresh()
    assert gallery.identities() == sorted([A, B, C]) and gallery.templates().num_rows == 8
    assert len(gallery.manifest["parts"]) == 2
    assert identify(package, gallery, lfw_image(lfw_dir, C, 3).read_bytes(), far=0.1).identity == C

    # removal: every row of A goes (templates and its failed row), the gallery still answers for the rest
    assert gallery.remove(A) == 5
    reopened = Gallery(out)
    assert reopened.identities() == sorted([B, C]) and A not in reopened.table.column("identity").to_pylist()
    assert reopened.table.num_rows == 6
    parts = sorted(p.name for p in (Path(out) / TEMPLATES_DIR).iterdir())
    assert parts == sorted(reopened.manifest["parts"])  # rewritten parts replaced, none left behind
    assert sum(pq.read_table(Path(out) / TEMPLATES_DIR / p).num_rows for p in parts) == 6
    after = identify(package, reopened, probe, far=0.1, k=3)
    assert after.identity != A and A not in [c.identity for c in after.candidates]


def test_api_enrolment_persists_and_a_gallery_refuses_another_package(calibrated, tmp_path, lfw_dir):
    no_mlflow = TrackingConfig(enabled=False)
    package = load_package(calibrated["package"])
    gallery = Gallery.create_or_open(str(tmp_path / "g"), package)
    rows = gallery.enrol_images(package, B, [("api/b1.jpg", lfw_image(lfw_dir, B, 1).read_bytes()),
                                             ("api/empty.jpg", b"")])
    assert [r["status"] for r in rows] == ["ok", "decode_error"]
    assert Gallery(str(tmp_path / "g")).table.num_rows == 2  # persisted on return
    assert (tmp_path / "g" / GALLERY_JSON).is_file()
    # the same weights and preprocessing are the same package; other weights are not
    same = export_package(str(package.folder / "weights.pt"), tmp_path / "same", tracking=no_mlflow)
    assert load_package(same.path).package_id == package.package_id
    other = package.model_spec().load()
    with torch.no_grad():
        next(other.parameters()).mul_(0.5)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    retrained = export_package(str(tmp_path / "other.pt"), tmp_path / "other", tracking=no_mlflow)
    with pytest.raises(PackageError, match="holds embeddings of package"):
        Gallery.create_or_open(str(tmp_path / "g"), load_package(retrained.path))


@pytest.mark.slow
def test_enrol_from_and_into_s3(calibrated, lfw_dir, s3_server, ray_local):
    """Package, images and gallery all in a real S3 server: the enrolment and a removal land there."""
    from mfr_ray.storage import iter_files, join_uri, write_bytes

    storage, bucket = s3_server.storage, f"s3://{s3_server.bucket}"
    package_uri = f"{bucket}/packages/lfw"
    for key, _ in iter_files(calibrated["package"]):
        write_bytes(join_uri(package_uri, key), (Path(calibrated["package"]) / key).read_bytes(), storage)
    for identity, index in ((A, 1), (A, 2), (B, 1)):
        path = lfw_image(lfw_dir, identity, index)
        write_bytes(f"{bucket}/people/{identity}/{path.name}", path.read_bytes(), storage)
    write_bytes(f"{bucket}/people/{B}/empty.jpg", b"", storage)
    summary = enrol(package_uri, f"{bucket}/people", f"{bucket}/gallery", storage=storage, progress=False)
    assert (summary.files, summary.rows_written) == (4, 4)
    assert summary.status_counts == {"ok": 3, "decode_error": 1}
    gallery = Gallery(f"{bucket}/gallery", storage)
    assert gallery.identities() == [A, B] and gallery.package_uri == package_uri
    package = load_package(package_uri, storage)
    assert identify(package, gallery, lfw_image(lfw_dir, B, 5).read_bytes(), far=0.1).identity == B
    assert gallery.remove(B) == 2
    assert Gallery(f"{bucket}/gallery", storage).identities() == [A]


@pytest.fixture(scope="module")
def casia_package(tmp_path_factory, shared):
    out = tmp_path_factory.mktemp("synthetic") / "package"
    export_package(str(shared / "weights" / "mobilefacenet_casia.ckpt"), out, tracking=TrackingConfig(enabled=False))
    return load_package(out)


def test_synthetic_mask_templates_are_extra_rows_of_the_photo(casia_package, lfw_dir, tmp_path):
    """K masked copies of an enrolment photo: drawn the same way every time (seeded by the photo), judged
    masked by the presence classifier, stored as `synthetic:<type>` rows beside the one `photo` row of the
    file, found by a masked probe, and removed with the identity."""
    from mfr_ray.serve.gallery import _utc_now, rows_of
    from mfr_ray.serve.synthetic import SyntheticMasks

    photo = lfw_image(lfw_dir, A, 1).read_bytes()
    cfg = SyntheticMasks(count=3)
    (first,), (again,) = casia_package.embed_images([photo], synthetic=cfg), casia_package.embed_images([photo], synthetic=cfg)
    assert first.ok and len(first.synthetic) >= 2 and first.mask_probability < 0.5
    for a, b in zip(first.synthetic, again.synthetic, strict=True):
        assert a.kind == b.kind and a.kind.startswith("synthetic:") and np.allclose(a.embedding, b.embedding)
        assert a.mask_probability > 0.5 and abs(np.linalg.norm(a.embedding) - 1) < 1e-4
    rows = rows_of(A, f"{A}/{A}_0001.jpg", first, _utc_now())
    assert rows[0]["template_kind"] == "photo" and len({r["template_id"] for r in rows}) == len(rows)
    gallery = Gallery.create_or_open(str(tmp_path / "g"), casia_package)
    gallery.add_rows(rows + rows_of(B, f"{B}/{B}_0001.jpg", casia_package.embed_images(
        [lfw_image(lfw_dir, B, 1).read_bytes()], synthetic=cfg)[0], _utc_now()))
    assert gallery.source_keys() == {f"{A}/{A}_0001.jpg", f"{B}/{B}_0001.jpg"}  # files, not templates
    masked_probe = casia_package.embed_images([lfw_image(lfw_dir, A, 2).read_bytes()], synthetic=cfg)[0].synthetic[0]
    best = gallery.search_identities(masked_probe.embedding, 1)[0]
    assert best.identity == A
    assert gallery.remove(A) == len(rows) and A not in Gallery(str(tmp_path / "g")).identities()


def test_a_gallery_written_before_template_kinds_still_loads(tmp_path):
    """Parts without `template_kind` / `mask_probability` read as photo templates."""
    import json

    import pyarrow as pa

    old = pa.table({"identity": ["X"], "template_id": ["t1"], "embedding": [[1.0, 0.0]], "source_key": ["X/1.jpg"],
                    "enrolled_at": pa.array([0], pa.timestamp("ms", tz="UTC")), "status": ["ok"], "reason": [""],
                    "align_method": ["mtcnn"]})
    (tmp_path / TEMPLATES_DIR).mkdir()
    pq.write_table(old, tmp_path / TEMPLATES_DIR / "part-old.parquet")
    (tmp_path / GALLERY_JSON).write_text(json.dumps({"format": "mfr-ray/gallery/1", "package_id": "p",
                                                     "embedding_size": 2, "parts": ["part-old.parquet"]}))
    gallery = Gallery(str(tmp_path))
    assert gallery.table.column("template_kind").to_pylist() == ["photo"]
    assert gallery.search_identities(np.array([1.0, 0.0], np.float32), 1)[0].template_kind == "photo"
