"""A real `mfr mask` process killed midway (SIGKILL) loses no row, and `--resume` redoes nothing that was
done: every input appears exactly once in the manifest."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from mfr_ray.cli import app
from mfr_ray.masking.quality import lfw_files

COUNT = 48


def _command(*args) -> list[str]:
    return [sys.executable, "-c", "from mfr_ray.cli import main; main()", "mask", *map(str, args)]


def _complete_rows(journal) -> list[dict]:
    if not journal.exists():
        return []
    lines = journal.read_text(encoding="utf-8").splitlines(keepends=True)
    return [row for row in map(json.loads, filter(lambda line: line.endswith("\n"), lines)) if "key" in row]


def test_killed_run_resumes_without_loss_or_rework(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    for path in lfw_files(COUNT, seed=16):
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / path.parent.name / path.name)
    (root / "notes.txt").write_text("not an image")
    files_in = COUNT + 1
    journal = tmp_path / "out_manifest.jsonl"

    proc = subprocess.Popen(
        _command(root, out, "--seed", "6"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while len(_complete_rows(journal)) < 8:
        assert proc.poll() is None, (
            f"mfr mask ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
        )
        assert time.monotonic() < deadline, "no rows appeared in the journal"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    proc.stderr.close()
    done = _complete_rows(journal)
    assert 8 <= len(done) < files_in, "the kill must land midway"
    assert not (tmp_path / "out_manifest.parquet").exists()
    with journal.open("a", encoding="utf-8") as fh:  # the row a kill cut in half
        fh.write('{"input_path": "' + str(root))
    mtimes = {row["key"]: Path(row["output_path"]).stat().st_mtime_ns for row in done if row["output_path"]}
    assert mtimes, "some masked images were written before the kill"

    rerun = CliRunner().invoke(app, ["mask", str(root), str(out), "--seed", "6"])
    assert rerun.exit_code == 2 and "--resume" in rerun.output  # no silent second run over the first

    changed = CliRunner().invoke(app, ["mask", str(root), str(out), "--seed", "7", "--resume"])
    assert changed.exit_code == 2 and "(seed differ)" in changed.output  # no manifest of mixed options

    resumed = CliRunner().invoke(app, ["mask", str(root), str(out), "--seed", "6", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resume: {len(done)} of {files_in} files done" in resumed.output
    assert "1 unreadable journal lines dropped" in resumed.output
    assert re.search(rf"this run: {files_in - len(done)} files processed", resumed.output), resumed.output
    assert f"check: files in {files_in} = rows out {files_in}: OK" in resumed.output
    for key, mtime in mtimes.items():  # nothing done is redone
        assert (out / key).stat().st_mtime_ns == mtime, key

    expected = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    for rows in (_complete_rows(journal), pq.read_table(tmp_path / "out_manifest.parquet").to_pylist()):
        assert sorted(row["key"] for row in rows) == expected  # every input exactly once
    final = {row["key"]: row for row in pq.read_table(tmp_path / "out_manifest.parquet").to_pylist()}
    assert final["notes.txt"]["status"] == "skipped"
    assert all(
        final[row["key"]] == row for row in done
    )  # the rows written before the kill are kept as they were
