"""The audit trail of a biometric service: who enrolled, removed or searched for whom, and what was decided.

One JSON line per event (time, action, key id, client, identity, decision, score) to the `mfr_ray.audit`
logger (Ray keeps each replica's log) and, when configured, appended to a local file (`<gallery>/audit.jsonl`
for a local gallery). Never an image, an embedding or a key: the key id is the first 12 hex digits of the
key's SHA-256, which names a key without revealing it."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"
_logger = logging.getLogger("mfr_ray.audit")


def default_audit_path(gallery: str) -> str | None:
    """`<gallery>/audit.jsonl` for a local gallery; None on object storage (no appends there: the replica
    log keeps the trail)."""
    from mfr_ray.storage import is_s3

    return None if is_s3(gallery) else str(Path(gallery).expanduser() / AUDIT_FILE)


def _audit_logger() -> logging.Logger:
    """The `mfr_ray.audit` logger, at INFO with its own handler on stderr (a replica's log file): Ray does not
    configure the root logger, whose default level would drop these lines."""
    if not _logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s mfr_ray.audit %(message)s"))
        _logger.addHandler(handler)
        _logger.setLevel(logging.INFO)
        _logger.propagate = False
    return _logger


class AuditLog:
    """Appends events; one `write` per line (O_APPEND), so lines from several processes never interleave.
    `echo=False` keeps the lines off stderr when the file holds them (a command line enrolling thousands of
    people); a replica echoes always (Ray keeps its log), and so does anything without a file."""

    def __init__(self, path: str | None, echo: bool = True):
        self.path = path
        self._lock = threading.Lock()
        self._logger = _audit_logger() if echo or not path else None

    def record(self, action: str, **fields: Any) -> dict:
        event = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": action, **fields}
        line = json.dumps(event, ensure_ascii=False, sort_keys=True, default=str)
        if self._logger:
            self._logger.info(line)
        if self.path:
            with self._lock:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, (line + "\n").encode())
                finally:
                    os.close(fd)
        return event


def read_events(path: str) -> list[dict]:
    """Every event of an audit file, oldest first."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
