"""Inputs and read-backs shared by the dataset-preparation tests: small trees of real LFW faces, job
configs written as YAML, and the rows a job wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
BAD_KEY = "Broken_Person/Broken_Person_0001.jpg"


def lfw_keys(lfw_dir: Path, count: int, per_identity: int = 4) -> list[str]:
    """`count` keys `<identity>/<file>` of LFW identities with at least `per_identity` images."""
    keys: list[str] = []
    for folder in sorted(p for p in lfw_dir.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.jpg"))
        if len(files) >= per_identity:
            keys += [f"{folder.name}/{f.name}" for f in files[:per_identity]]
        if len(keys) >= count:
            return keys[:count]
    return keys


def make_face_tree(lfw_dir: Path, root: Path, count: int, per_identity: int = 4, broken: bool = True) -> list[str]:
    """Copy real faces into `root/<identity>/`, plus one corrupt JPEG (an input that must become a
    decode_error row), one image lying outside any identity folder and one non-image file (both ignored).
    Returns the keys that should be indexed."""
    keys = lfw_keys(lfw_dir, count, per_identity)
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes((lfw_dir / key).read_bytes())
    (root / keys[0]).with_name("notes.txt").write_text("not an image")
    (root / "loose.jpg").write_bytes((lfw_dir / keys[0]).read_bytes())
    if broken:
        (root / BAD_KEY).parent.mkdir(parents=True, exist_ok=True)
        (root / BAD_KEY).write_bytes((lfw_dir / keys[0]).read_bytes()[:300])  # truncated JPEG
        keys = sorted([*keys, BAD_KEY])
    return keys


def prepare_config(input_uri: str, output_uri: str, **sections) -> dict:
    """A small `kind: prepare` config: 112x96 crops, a mixture copy per image, one actor."""
    config = {
        "kind": "prepare",
        "name": "test",
        "index": {"uri": input_uri, "shard_size": 8},
        "align": {"crop": "112x96", "batch_size": 8},
        "masking": {"mix": {"surgical_blue": 1, "N95": 1, "cloth": 1}, "seed": 0},
        "variants": [{"name": "masked", "copies": 1}],
        "output": {"uri": output_uri},
        "compute": {"num_actors": 1, "io_retry_s": 60},
        "tracking": {"enabled": False},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_variant(out_root: Path, variant: str) -> pa.Table:
    files = sorted((out_root / "data" / variant).glob("shard-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def output_files(out_root: Path) -> dict[str, float]:
    """Every file under the output with its modification time (to prove a rerun wrote nothing)."""
    return {str(p.relative_to(out_root)): p.stat().st_mtime for p in out_root.rglob("*") if p.is_file()}


def job_command(config_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "prepare_dataset.py"), "--config", str(config_path),
            "--no-progress", *overrides]


def done_markers(out_root: Path) -> list[Path]:
    """The `_done/shard-*.json` markers of the shards a prepare has finished, in shard order."""
    done = out_root / "_done"
    return sorted(done.glob("shard-*.json")) if done.is_dir() else []


def wait_for_done_shards(job: subprocess.Popen, out_root: Path, count: int, timeout: float) -> list[Path]:
    """Block until a running prepare `job` has finished `count` shards (its done markers); fail if the job
    ends first (showing the end of its output) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while len(markers := done_markers(out_root)) < count:
        if job.poll() is not None:
            output = job.stdout.read() if job.stdout else ""
            text = output.decode(errors="replace") if isinstance(output, bytes) else output
            raise AssertionError(f"job ended before {count} shards were done: {text[-3000:]}")
        assert time.monotonic() < deadline, f"{count} shards were not done within {timeout} s"
        time.sleep(0.1)
    return markers


def job_env(**extra: str) -> dict[str, str]:
    """Environment of a job subprocess: no cluster from the parent, Ray limited to this machine's 2 CPUs."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def session_pids(session_id: int) -> list[int]:
    """Processes in the session a `start_new_session=True` child leads: it and everything it spawned
    (Ray workers take their own process group, but stay in the session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":  # fields: state ppid pgrp session ...
            pids.append(int(stat.parent.name))
    return pids


def stop_session(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL, by pid, every live process of the session we started (the job driver, the local Ray it
    spawned and its workers) and wait until none is left."""
    deadline = time.monotonic() + timeout
    while pids := session_pids(proc.pid):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.wait(5)
        assert time.monotonic() < deadline, f"processes {pids} of session {proc.pid} would not stop"
        time.sleep(0.2)
