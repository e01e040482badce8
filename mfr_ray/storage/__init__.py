"""One way to address data everywhere: plain paths, `file://` and `s3://bucket/prefix`.

Reads and writes go through pyarrow filesystems (what Ray Data uses too); listing an S3 prefix and
creating buckets go through boto3, whose paginator streams keys instead of materialising them.
Credentials come from `StorageConfig` or the standard AWS environment and never appear in messages.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from mfr_ray.config.common import StorageConfig
from mfr_ray.config.secrets import redact

__all__ = [
    "StorageConfig",
    "StorageError",
    "boto3_client",
    "ensure_bucket",
    "exists",
    "file_version",
    "filesystem_for",
    "is_s3",
    "iter_files",
    "join_uri",
    "read_bytes",
    "write_bytes",
]


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI, never the credentials."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join_uri(uri: str, *parts: str) -> str:
    """Join path parts with `/` for S3 and the OS separator for local paths."""
    uri = str(uri)
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *[p.strip("/") for p in parts])
    return str(Path(_local_path(uri), *parts))


def local_target(folder: str | Path, key: str) -> Path:
    """Where an object listed under a prefix lands inside `folder`. A key that is absolute, holds `..` or a
    backslash, or would resolve outside `folder` is refused: anyone who can write to the bucket must not
    get file writes elsewhere on the machine that downloads it."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("..", ".") for p in parts) or "\x00" in key:
        raise StorageError(f"object key {key!r} is not a plain relative path; refused")
    root = Path(folder).resolve()
    target = (root / key).resolve()
    if not target.is_relative_to(root) or target == root:
        raise StorageError(f"object key {key!r} resolves outside {root}; refused")
    return target


def _local_path(uri: str) -> str:
    return urlparse(uri).path if uri.startswith("file://") else os.path.expanduser(uri)


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if "@" in parsed.netloc:
        raise StorageError(f"{redact(uri)} holds credentials: give them as storage.access_key_id / "
                           "secret_access_key or the AWS_* environment, never in the URI")
    if not parsed.netloc:
        raise StorageError(f"{uri!r} has no bucket (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.lstrip("/")


def _s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    creds = cfg.credentials()
    endpoint = cfg.resolved_endpoint()
    kwargs: dict = {
        "region": cfg.resolved_region(),
        "connect_timeout": cfg.connect_timeout_s,
        "request_timeout": cfg.request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if "access_key_id" in creds and "secret_access_key" in creds:
        kwargs["access_key"] = creds["access_key_id"]
        kwargs["secret_key"] = creds["secret_access_key"]
        if "session_token" in creds:
            kwargs["session_token"] = creds["session_token"]
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for `uri` (what `ray.data.read_*(filesystem=)` takes)."""
    cfg = cfg or StorageConfig()
    uri = str(uri)
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return _s3_filesystem(cfg), posixpath.join(bucket, key) if key else bucket
    return pafs.LocalFileSystem(), os.path.abspath(_local_path(uri))


def boto3_client(cfg: StorageConfig | None = None):
    """A boto3 S3 client with the same endpoint, region, credentials and retry budget as the pyarrow side."""
    import boto3
    from botocore.config import Config

    cfg = cfg or StorageConfig()
    creds = cfg.credentials()
    return boto3.client(
        "s3",
        endpoint_url=cfg.resolved_endpoint(),
        region_name=cfg.resolved_region(),
        aws_access_key_id=creds.get("access_key_id"),
        aws_secret_access_key=creds.get("secret_access_key"),
        aws_session_token=creds.get("session_token"),
        config=Config(
            retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.request_timeout_s,
        ),
    )


def _wrap(action: str, uri: str, cfg: StorageConfig | None, exc: Exception) -> StorageError:
    return StorageError(redact(f"{action} {uri} failed: {type(exc).__name__}: {exc}", cfg))


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    fs, path = filesystem_for(uri, cfg)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except Exception as exc:  # noqa: BLE001 - every failure leaves as a redacted StorageError
        raise _wrap("reading", uri, cfg, exc) from None


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write a whole object; local writes go to a temp name first so readers never see half a file."""
    fs, path = filesystem_for(uri, cfg)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as stream:
                stream.write(data)
    except Exception as exc:  # noqa: BLE001 - every failure leaves as a redacted StorageError
        raise _wrap("writing", uri, cfg, exc) from None


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem_for(uri, cfg)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as exc:  # noqa: BLE001 - every failure leaves as a redacted StorageError
        raise _wrap("checking", uri, cfg, exc) from None


def file_version(uri: str, cfg: StorageConfig | None = None) -> list | None:
    """What tells one version of a file from another, for cache keys: [size, ETag] of an S3 object (its
    modification time where the store sends no ETag), [size, mtime in ns] of a local file; None if missing."""
    if not is_s3(uri):
        path = _local_path(uri)
        if not os.path.exists(path):
            return None
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]
    bucket, key = _split_s3(uri)
    try:
        head = boto3_client(cfg).head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - every failure leaves as a redacted StorageError
        if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _wrap("checking", uri, cfg, exc) from None
    return [int(head["ContentLength"]), head.get("ETag", "").strip('"') or head["LastModified"].isoformat()]


def iter_files(
    uri: str, cfg: StorageConfig | None = None, suffixes: tuple[str, ...] | None = None
) -> Iterator[tuple[str, int]]:
    """Yield `(key relative to uri, size)` for every file below `uri`, in sorted order per folder,
    one page at a time (S3) or one directory at a time (local), so millions of keys never sit in memory."""
    lowered = tuple(s.lower() for s in suffixes) if suffixes else None

    def wanted(name: str) -> bool:
        base = posixpath.basename(name)
        return not base.startswith(".") and (lowered is None or base.lower().endswith(lowered))

    if is_s3(uri):
        bucket, prefix = _split_s3(uri)
        prefix = f"{prefix.rstrip('/')}/" if prefix else ""
        client = boto3_client(cfg)
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):]
                    if rel and not rel.endswith("/") and wanted(rel):
                        yield rel, int(obj["Size"])
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a redacted StorageError
            raise _wrap("listing", uri, cfg, exc) from None
        return
    root = _local_path(uri)
    if not os.path.isdir(root):
        raise StorageError(f"listing {uri} failed: not a directory")
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if wanted(name):
                full = os.path.join(folder, name)
                yield os.path.relpath(full, root).replace(os.sep, "/"), os.path.getsize(full)


def ensure_bucket(uri: str, cfg: StorageConfig | None = None) -> None:
    """Create the bucket of an `s3://` URI if it does not exist (no-op for local paths)."""
    if not is_s3(uri):
        os.makedirs(_local_path(uri), exist_ok=True)
        return
    bucket, _ = _split_s3(uri)
    client = boto3_client(cfg)
    try:
        client.head_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - missing or not ours: creating it says which
        try:
            client.create_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a redacted StorageError
            raise _wrap("creating bucket for", uri, cfg, exc) from None
