"""Crash and resume for real: kill -9 the job driver midway, rerun (CLI form), and check that every input
ends up exactly once; a third run must find nothing to do and write nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.prepare_inputs import (
    done_markers,
    job_command,
    job_env,
    make_face_tree,
    output_files,
    prepare_config,
    read_variant,
    stop_session,
    wait_for_done_shards,
    write_config,
)

pytestmark = pytest.mark.slow


def test_kill_driver_midway_then_resume(tmp_path, lfw_dir):
    keys = make_face_tree(lfw_dir, tmp_path / "in", count=119)  # + the broken file = 120 inputs
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "prepare.yaml",
        prepare_config(str(tmp_path / "in"), str(out), compute={"num_actors": 2, "io_retry_s": 30}),
    )
    num_shards = len(keys) // 8

    job = subprocess.Popen(job_command(config), env=job_env(), cwd=tmp_path, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_done_shards(job, out, 3, timeout=240)
        os.kill(job.pid, signal.SIGKILL)  # the driver only, like a crashed or preempted head process
        job.wait(30)
    finally:
        stop_session(job)  # then whatever local Ray processes the dead driver leaves behind
    finished_before = len(done_markers(out))
    assert 3 <= finished_before < num_shards, "the kill should land midway"
    assert not list((out / "data").rglob("*.tmp*")), "no half-written shard may be visible"

    resumed = subprocess.run(
        [str(Path(sys.executable).parent / "mfr"), "prepare", str(config), "--no-progress"],
        env=job_env(), cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{num_shards - finished_before} shards ({finished_before} shards already done)" in resumed.stdout
    assert "check: images in 120 = unmasked rows out 120" in resumed.stdout

    unmasked = Counter(read_variant(out, "unmasked")["source_key"].to_pylist())
    assert sorted(unmasked) == keys and set(unmasked.values()) == {1}
    masked = Counter(read_variant(out, "masked")["source_key"].to_pylist())
    assert set(masked.values()) == {1} and len(masked) == len(keys) - 1  # every decodable image, once
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["counts"]["inputs"] == 120 and card["counts"]["rows"]["unmasked"] == 120

    before = output_files(out)
    again = subprocess.run(job_command(config), env=job_env(), cwd=tmp_path, capture_output=True, text=True, check=False,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this run 0 images in 0 shards" in again.stdout
    assert output_files(out) == before
