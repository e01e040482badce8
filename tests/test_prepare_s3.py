"""The same job on a real S3 server (SeaweedFS on loopback), input and output both in the bucket, with
the endpoint restarted mid-job: the job completes or fails with a clear message, and a rerun completes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from mfr_ray.storage import boto3_client, iter_files, join_uri, write_bytes
from tests.prepare_inputs import job_command, job_env, lfw_keys, prepare_config, stop_session, write_config

pytestmark = pytest.mark.slow


def _objects(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def test_s3_job_survives_endpoint_restart(tmp_path, lfw_dir, s3_server):
    storage = s3_server.storage
    source = f"s3://{s3_server.bucket}/faces"
    output = f"s3://{s3_server.bucket}/prepared"
    keys = lfw_keys(lfw_dir, 64)
    for key in keys:
        write_bytes(join_uri(source, key), (lfw_dir / key).read_bytes(), storage)
    assert [k for k, _ in iter_files(source, storage)] == keys

    config = write_config(
        tmp_path / "prepare.yaml",
        prepare_config(source, output, compute={"num_actors": 1, "io_retry_s": 60}),
    )
    client = boto3_client(storage)
    env = job_env(**s3_server.env)
    job = subprocess.Popen(job_command(config), env=env, cwd=tmp_path, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not _objects(client, s3_server.bucket, "prepared/_done/"):
            assert job.poll() is None, f"job ended early: {job.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.3)
        s3_server.restart(down_for=3)
        first_output, _ = job.communicate(timeout=300)
    finally:
        stop_session(job)
    print(f"run during the restart: exit {job.returncode}\n{first_output[-1500:]}")
    # either it rode out the outage, or it stopped with a message that says what to do
    assert job.returncode == 0 or (
        job.returncode == 1 and "rerun the same command to continue" in first_output
    ), first_output[-3000:]

    rerun = subprocess.run(job_command(config), env=env, cwd=tmp_path, capture_output=True, text=True, check=False,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "check: images in 64 = unmasked rows out 64" in rerun.stdout

    shards = _objects(client, s3_server.bucket, "prepared/data/unmasked/")
    assert len(shards) == 8
    seen = Counter()
    for key in shards:
        body = client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
        table = pq.read_table(io.BytesIO(body))
        seen.update(table["source_key"].to_pylist())
        assert set(table["status"].to_pylist()) == {"ok"}
    assert sorted(seen) == keys and set(seen.values()) == {1}
    card = json.loads(client.get_object(Bucket=s3_server.bucket, Key="prepared/dataset_card.json")["Body"].read())
    assert card["counts"]["rows"]["unmasked"] == 64 and card["counts"]["rows"]["masked"] == 64
    assert not _objects(client, s3_server.bucket, "prepared/_tmp/")


def test_s3_output_lock_refuses_a_second_run(s3_server):
    """The lock on S3 (written, then read back): a second holder is refused with the owner named, and the
    lock is gone once the first lets go, failure included."""
    from mfr_ray.data.layout import LOCK_JSON, DatasetLayout, OutputLocked, output_lock

    output = f"s3://{s3_server.bucket}/locked"
    layout = DatasetLayout(output, s3_server.storage)
    client = boto3_client(s3_server.storage)
    refused = f"output {output} is locked by .* pid {os.getpid()}"
    with pytest.raises(RuntimeError, match="the run fails"), output_lock(layout):
        assert _objects(client, s3_server.bucket, "locked/") == [f"locked/{LOCK_JSON}"]
        with pytest.raises(OutputLocked, match=refused), output_lock(DatasetLayout(output, s3_server.storage)):
            pass
        raise RuntimeError("the run fails")
    assert f"locked/{LOCK_JSON}" not in _objects(client, s3_server.bucket, "locked/")
