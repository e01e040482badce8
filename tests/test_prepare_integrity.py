"""Data integrity of `mfr prepare` and of what training reads, on real faces, real Ray, real files:
fallback and conversion rows keep their status and reason, training leaves fallbacks out and refuses an
unfinished dataset, oversized files are never read, a rerun redoes a truncated shard, local writes are
fsynced before the marker, an image that kills its actor becomes a `crashed` row, a SIGKILLed actor
loses nothing, and a second run into the same output is refused by the lock."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mfr_ray.config import load_config
from mfr_ray.config.common import StorageConfig
from mfr_ray.data import IncompleteDataset, paired_dataset, read_variant_table
from mfr_ray.data.config import PrepareConfig
from mfr_ray.data.index import IndexMismatch
from mfr_ray.data.job import prepare_and_report, run_prepare
from mfr_ray.data.layout import LOCK_JSON, DatasetLayout, OutputLocked
from mfr_ray.data.process import EXIT_ON_KEY_ENV
from mfr_ray.train.config import TrainDataConfig
from mfr_ray.train.data import label_count, training_dataset
from tests.prepare_inputs import (
    done_markers,
    job_command,
    job_env,
    lfw_keys,
    make_face_tree,
    prepare_config,
    read_variant,
    stop_session,
    wait_for_done_shards,
    write_config,
)

GREY_KEY = "Zz_Not_A_Face/grey.png"
NOISE_KEY = "Zz_Not_A_Face/noise.png"
BIG_KEY = "Zz_Not_A_Face/big.png"
MAX_FILE_BYTES = 1_000_000


def _copy_faces(lfw_dir: Path, root: Path, keys: list[str]) -> None:
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes((lfw_dir / key).read_bytes())


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _cfg(tmp_path: Path, input_uri: str, output_uri: str, **sections) -> PrepareConfig:
    config = prepare_config(input_uri, output_uri, **sections)
    path = write_config(tmp_path / f"prepare-{time.monotonic_ns()}.yaml", config)
    return load_config(path, expected=PrepareConfig)


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory, lfw_dir) -> tuple[Path, str]:
    """12 real faces, a real face saved as 8-bit grey (a conversion), a blank grey image and a noise
    image (no face: the centre fallback), and a 1.5 MB noise PNG over the file cap: 16 inputs, 2 shards."""
    root = tmp_path_factory.mktemp("odd") / "in"
    keys = lfw_keys(lfw_dir, 12, per_identity=4)
    _copy_faces(lfw_dir, root, keys)
    grey_face = f"{keys[0].split('/')[0]}/grey_copy.png"
    _save(root / grey_face, np.asarray(Image.open(lfw_dir / keys[0]).convert("L")))
    rng = np.random.default_rng(0)
    _save(root / GREY_KEY, np.full((200, 200, 3), 128, np.uint8))
    _save(root / NOISE_KEY, rng.integers(0, 256, (250, 250, 3), dtype=np.uint8))
    _save(root / BIG_KEY, rng.integers(0, 256, (720, 720, 3), dtype=np.uint8))
    assert (root / BIG_KEY).stat().st_size > MAX_FILE_BYTES > max((root / k).stat().st_size for k in keys)
    return root, grey_face


def _odd_cfg(tmp_path: Path, root: Path, out: Path) -> PrepareConfig:
    return _cfg(tmp_path, str(root), str(out), index={"max_file_bytes": MAX_FILE_BYTES},
                align={"fallbacks": ["dlib", "center"]})


@pytest.fixture(scope="module")
def odd_prepared(tmp_path_factory, odd_tree, ray_local):
    """The odd tree prepared once by the real pipeline; returns (output, config, printed summary)."""
    root, _ = odd_tree
    work = tmp_path_factory.mktemp("odd-out")
    cfg = _odd_cfg(work, root, work / "out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = run_prepare(cfg, progress=False)
    assert summary.complete and summary.num_images == 16
    return work / "out", cfg, printed.getvalue()


@pytest.mark.slow
def test_fallback_conversion_and_oversize_rows_keep_status_and_reason(odd_prepared, odd_tree):
    out, _, printed = odd_prepared
    _, grey_face = odd_tree
    unmasked = {r["source_key"]: r for r in read_variant(out, "unmasked").to_pylist()}
    assert len(unmasked) == 16

    converted = unmasked[grey_face]  # a real face: detected, and the conversion is said
    assert converted["status"] == "ok" and converted["align_method"] == "mtcnn"
    assert "converted from L" in converted["reason"]

    for key in (GREY_KEY, NOISE_KEY):  # no face: never a plain ok row
        assert unmasked[key]["status"] != "ok", unmasked[key]
        assert unmasked[key]["reason"], unmasked[key]
    fallback = unmasked[GREY_KEY]
    assert fallback["status"] == "ok_fallback" and fallback["align_method"] == "center"
    assert fallback["image"] is not None
    masked = [r for r in read_variant(out, "masked").to_pylist() if r["source_key"] == GREY_KEY]
    assert masked and all(r["status"] != "ok" for r in masked)  # its masked copy is no face either
    assert all(r["reason"] for r in masked)

    big = unmasked[BIG_KEY]
    assert big["status"] == "too_large" and big["image"] is None and "max_file_bytes" in big["reason"]

    fallbacks = sum(r["status"] == "ok_fallback" for r in unmasked.values())
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["fallback_crops"] == fallbacks == card["counts"]["status"]["unmasked"]["ok_fallback"]
    assert card["counts"]["status"]["unmasked"]["too_large"] == 1
    assert f"{fallbacks} fallback crops" in (out / "dataset_card.md").read_text()
    assert f"ok_fallback {fallbacks} + failed" in printed
    assert "check: images in 16 = unmasked rows out 16" in printed


@pytest.mark.slow
def test_training_leaves_fallbacks_out_unless_asked_evaluation_keeps_them(odd_prepared, ray_local):
    out, _, _ = odd_prepared
    unmasked = read_variant(out, "unmasked").to_pylist()
    not_a_face = {r["identity_id"] for r in unmasked if r["source_key"] == GREY_KEY}
    masked = read_variant(out, "masked").to_pylist()
    usable_masked = {r["source_key"] for r in masked if r["image"] is not None}
    ok_keys = {r["source_key"] for r in unmasked if r["status"] == "ok"} & usable_masked
    fallback_keys = {r["source_key"] for r in unmasked if r["status"] == "ok_fallback"} & usable_masked
    assert fallback_keys, "the fallback crops need a masked copy for this test"

    default = TrainDataConfig(uri=str(out), val_identities=0)
    rows, count = training_dataset(default, StorageConfig(), held_out=[])
    assert count == len(ok_keys)
    assert not set(rows.to_pandas()["identity_id"]) & not_a_face

    keep = TrainDataConfig(uri=str(out), val_identities=0, keep_fallback=True)
    assert training_dataset(keep, StorageConfig(), held_out=[])[1] == len(ok_keys) + len(fallback_keys)

    # the reader's default is unchanged, and evaluation's table still holds every row with its crop
    assert {p["source_key"] for p in paired_dataset(str(out)).take_all()} == ok_keys
    table = read_variant_table(str(out), "unmasked").to_pylist()
    assert len(table) == 16
    assert all(r["image"] is not None for r in table if r["status"] == "ok_fallback")


@pytest.mark.slow
def test_training_refuses_an_unfinished_dataset(odd_prepared, tmp_path, ray_local):
    source, _, _ = odd_prepared
    out = tmp_path / "partial"
    shutil.copytree(source, out)
    (out / "_done" / "shard-00001.json").unlink()  # as if the prepare had stopped before the last shard

    data = TrainDataConfig(uri=str(out), val_identities=0)
    with pytest.raises(IncompleteDataset) as refused:
        label_count(data, StorageConfig())
    message = str(refused.value)
    assert str(out) in message and "1/2 shards done" in message
    assert "mfr prepare" in message and "data.allow_incomplete=true" in message
    with pytest.raises(IncompleteDataset):
        training_dataset(data, StorageConfig(), held_out=[])

    allowed = data.model_copy(update={"allow_incomplete": True})
    assert label_count(allowed, StorageConfig()) > 0
    first_shard = pq.read_table(out / "data" / "unmasked" / "shard-00000.parquet").to_pylist()
    masked_rows = pq.read_table(out / "data" / "masked" / "shard-00000.parquet").to_pylist()
    masked = {r["source_key"] for r in masked_rows if r["status"] == "ok"}
    expected = sum(r["status"] == "ok" and r["source_key"] in masked for r in first_shard)
    assert training_dataset(allowed, StorageConfig(), held_out=[])[1] == expected  # finished shards only


@pytest.mark.slow
def test_rerun_redoes_a_truncated_shard(odd_prepared, odd_tree, tmp_path, ray_local):
    source, _, _ = odd_prepared
    out = tmp_path / "truncated"
    shutil.copytree(source, out)
    victim = out / "data" / "masked" / "shard-00000.parquet"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a power loss behind the marker

    summary = run_prepare(_odd_cfg(tmp_path, odd_tree[0], out), progress=False)
    assert summary.complete and summary.processed_shards == 1 and summary.skipped_shards == 1
    assert pq.read_metadata(victim).num_rows == 8
    assert sorted(Counter(read_variant(out, "unmasked")["source_key"].to_pylist()).values()) == [1] * 16


def test_local_writes_are_fsynced_before_they_appear(tmp_path, monkeypatch):
    layout = DatasetLayout(str(tmp_path / "out"), StorageConfig())
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        renamed = os.path.exists(layout.data_path("unmasked", 0))
        synced.append(target + ("" if renamed else " (before rename)"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    layout.write_table(layout.data_path("unmasked", 0), pa.table({"a": [1, 2, 3]}))
    folder = str(tmp_path / "out" / "data" / "unmasked")
    assert len(synced) == 2
    assert synced[0].startswith(str(tmp_path / "out" / "_tmp")) and synced[0].endswith(" (before rename)")
    assert synced[1] == folder  # the rename itself made durable
    synced.clear()
    layout.write_json(layout.attempts_path(0), {"in_progress": []}, durable=False)
    assert synced == []


def _unmasked_job(tmp_path: Path, source: Path, out: Path) -> Path:
    return write_config(tmp_path / "prepare.yaml", prepare_config(str(source), str(out), variants=[]))


def _run_job(config: Path, cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(job_command(config), env=job_env(**env), cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=timeout)


@pytest.mark.slow
def test_image_that_kills_its_actor_becomes_a_crashed_row(tmp_path, lfw_dir):
    keys = make_face_tree(lfw_dir, tmp_path / "in", count=15, broken=False)
    poison = keys[3]  # in the first group of 8: blamed with its group once, then alone
    out = tmp_path / "out"
    config = _unmasked_job(tmp_path, tmp_path / "in", out)

    job = _run_job(config, tmp_path, 420, **{EXIT_ON_KEY_ENV: poison})
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    rows = read_variant(out, "unmasked").to_pylist()
    assert sorted(r["source_key"] for r in rows) == keys  # images in = rows out, each once
    by_key = {r["source_key"]: r for r in rows}
    assert by_key[poison]["status"] == "crashed" and by_key[poison]["image"] is None
    assert "killed its worker 2 times" in by_key[poison]["reason"]
    assert all(by_key[k]["status"] == "ok" for k in keys if k != poison)
    assert "check: images in 15 = unmasked rows out 15" in job.stdout
    assert not list((out / "_attempts").glob("*.json"))  # the record goes with the finished shard


@pytest.mark.slow
def test_sigkill_a_prepare_actor_midway_loses_nothing(tmp_path, lfw_dir):
    keys = make_face_tree(lfw_dir, tmp_path / "in", count=199)  # + the broken file = 200 inputs
    out = tmp_path / "out"
    config = _unmasked_job(tmp_path, tmp_path / "in", out)
    job = subprocess.Popen(job_command(config), env=job_env(), cwd=tmp_path, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        markers = wait_for_done_shards(job, out, 3, timeout=300)
        actor = json.loads(markers[-1].read_text())["pid"]  # its writer, now on the next shard
        os.kill(actor, signal.SIGKILL)
        killed_at = len(done_markers(out))
        output, _ = job.communicate(timeout=420)
    finally:
        stop_session(job)
    assert job.returncode == 0, output[-4000:]
    assert killed_at < len(keys) // 8, "the kill should land midway"
    unmasked = Counter(read_variant(out, "unmasked")["source_key"].to_pylist())
    assert sorted(unmasked) == keys and set(unmasked.values()) == {1}  # each input exactly once
    assert "check: images in 200 = unmasked rows out 200" in output
    pids = {json.loads(p.read_text())["pid"] for p in done_markers(out)}
    assert actor in pids and len(pids) >= 2  # a restarted actor finished the shards after the kill


@pytest.mark.slow
def test_second_run_into_the_same_output_is_refused(tmp_path, lfw_dir):
    keys = make_face_tree(lfw_dir, tmp_path / "in", count=39)
    out = tmp_path / "out"
    config = prepare_config(str(tmp_path / "in"), str(out), variants=[])

    def into_out(**sections) -> PrepareConfig:
        return _cfg(tmp_path, str(tmp_path / "in"), str(out), variants=[], **sections)

    first = subprocess.Popen(job_command(write_config(tmp_path / "first.yaml", config)), env=job_env(),
                             cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "_index" / "_manifest.json").exists():
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lock = json.loads((out / LOCK_JSON).read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
        index_before = sorted(p.name for p in (out / "_index").iterdir())

        second = into_out()
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            assert prepare_and_report(second, progress=False) == 1
        message = stderr.getvalue()
        assert f"output {out} is locked by {socket.gethostname()} pid {first.pid}" in message
        assert f"delete {out}/{LOCK_JSON}" in message and "output.force_unlock=true" in message
        assert sorted(p.name for p in (out / "_index").iterdir()) == index_before  # the first's index kept

        output, _ = first.communicate(timeout=420)
    finally:
        stop_session(first)
    assert first.returncode == 0, output[-4000:]
    assert sorted(read_variant(out, "unmasked")["source_key"].to_pylist()) == keys
    assert not (out / LOCK_JSON).exists()  # released at the end

    # released on failure too: a run with other settings is refused by the index, and leaves no lock
    with pytest.raises(IndexMismatch):
        run_prepare(into_out(align={"crop": "112x112"}), progress=False)
    assert not (out / LOCK_JSON).exists()

    # a lock of a dead process on this host is taken over; another host's is not, unless forced
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_JSON).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "run_id": "x"}))
    assert run_prepare(into_out(), progress=False).processed_images == 0
    (out / LOCK_JSON).write_text(json.dumps({"host": "elsewhere", "pid": 1, "run_id": "y", "since_utc": "T"}))
    with pytest.raises(OutputLocked, match="locked by elsewhere pid 1 .* since T"):
        run_prepare(into_out(), progress=False)
    forced = into_out(output={"force_unlock": True})
    assert run_prepare(forced, progress=False).processed_images == 0
    assert not (out / LOCK_JSON).exists()


def test_actor_restarts_must_cover_the_image_attempts(tmp_path):
    """Ray's restarts are bounded, but never below what it takes to write a poison image off."""
    with pytest.raises(ValueError, match=r"max_actor_restarts \(1\) must be >= max_image_attempts \(2\)"):
        _cfg(tmp_path, "in", "out", compute={"max_actor_restarts": 1})
    assert _cfg(tmp_path, "in", "out").compute.max_actor_restarts == 4
