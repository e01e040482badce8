"""Storage layer round trips on local disk and on a real S3 server (SeaweedFS on loopback)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mfr_ray.config.common import StorageConfig
from mfr_ray.storage import (
    StorageError,
    ensure_bucket,
    exists,
    file_version,
    filesystem_for,
    iter_files,
    join_uri,
    read_bytes,
    write_bytes,
)


def test_local_round_trip_and_listing(tmp_path, lfw_dir):
    root = str(tmp_path / "out")
    face = (lfw_dir / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg").read_bytes()
    write_bytes(join_uri(root, "Aaron_Peirsol", "a.jpg"), face)
    write_bytes(join_uri(f"file://{root}", "Zed", "b.png"), b"x")
    write_bytes(join_uri(root, "Zed", "notes.txt"), b"y")
    assert read_bytes(join_uri(root, "Aaron_Peirsol", "a.jpg")) == face
    assert list(iter_files(root, suffixes=(".jpg", ".png"))) == [("Aaron_Peirsol/a.jpg", len(face)), ("Zed/b.png", 1)]
    assert exists(join_uri(root, "Zed", "b.png")) and not exists(join_uri(root, "Zed", "c.png"))
    assert not list(tmp_path.rglob("*.tmp-*")), "atomic write left a temp file"


def test_s3_round_trip_listing_and_parquet(s3_server, lfw_dir):
    cfg = s3_server.storage
    base = f"s3://{s3_server.bucket}/roundtrip"
    faces = sorted((lfw_dir / "Abel_Pacheco").glob("*.jpg"))
    for path in faces:
        write_bytes(join_uri(base, "Abel_Pacheco", path.name), path.read_bytes(), cfg)
    listed = list(iter_files(base, cfg, suffixes=(".jpg",)))
    assert [key for key, _ in listed] == [f"Abel_Pacheco/{p.name}" for p in faces]
    assert [size for _, size in listed] == [p.stat().st_size for p in faces]
    assert read_bytes(join_uri(base, listed[0][0]), cfg) == faces[0].read_bytes()

    fs, path = filesystem_for(join_uri(base, "table.parquet"), cfg)
    pq.write_table(pa.table({"key": [k for k, _ in listed]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("key").to_pylist() == [k for k, _ in listed]


def test_file_version_follows_the_bytes(tmp_path, s3_server):
    """What cache keys read: None for a missing file, the same answer while the bytes stay, a new one after a
    rewrite (on S3 with the same size: only the ETag tells the versions apart)."""
    cfg = s3_server.storage
    for uri, rewrite in ((str(tmp_path / "w.bin"), b"second"), (f"s3://{s3_server.bucket}/versions/w.bin", b"fir5t")):
        assert file_version(uri, cfg) is None
        write_bytes(uri, b"first", cfg)
        first = file_version(uri, cfg)
        assert first[0] == 5 and file_version(uri, cfg) == first
        write_bytes(uri, rewrite, cfg)
        assert file_version(uri, cfg) not in (None, first)


def test_s3_new_bucket_and_env_credentials(s3_server, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    uri = "s3://mfr-env-bucket/x/y.bin"
    ensure_bucket(uri)
    write_bytes(uri, b"payload")
    assert read_bytes(uri) == b"payload"


def test_s3_errors_do_not_leak_credentials(s3_server):
    """Errors that do carry a secret (a key path that repeats the configured secret, credentials pasted into
    the URI) come out of the real read/list paths with the secret replaced, the rest of the message kept."""
    secret = "wrong-secret-value-xyz"
    wrong = StorageConfig(
        endpoint_url=s3_server.endpoint_url,
        access_key_id="AKIAWRONGKEY123",
        secret_access_key=secret,
        max_attempts=1,
    )
    uri = f"s3://{s3_server.bucket}/{secret}/missing.bin"
    with pytest.raises(StorageError) as err:
        read_bytes(uri, wrong)
    message = str(err.value)
    assert secret not in message and "AKIAWRONGKEY123" not in message
    assert f"s3://{s3_server.bucket}/***/missing.bin" in message
    with pytest.raises(StorageError) as listing:
        list(iter_files(f"s3://{s3_server.bucket}/{secret}/", wrong))
    assert secret not in str(listing.value) and "***" in str(listing.value)

    pasted = f"s3://AKIAPASTED:pasted-secret-123@{s3_server.bucket}/x.bin"  # userinfo in an S3 URI
    with pytest.raises(StorageError) as err:
        read_bytes(pasted, s3_server.storage)
    assert "pasted-secret-123" not in str(err.value) and f"s3://***@{s3_server.bucket}/x.bin holds credentials" in str(
        err.value)