"""API-key auth for `mfr serve` when it listens beyond loopback, and a per-client rate limit.

The key comes from a file (`--api-key-file`, `$MFR_SERVE_API_KEY_FILE`: a mounted secret) or from
`$MFR_SERVE_API_KEY`. Only its SHA-256 digest goes to the Serve replicas, so the key itself is in no
deployment argument, Ray object, log or error; requests are checked by comparing digests in constant time."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mfr_ray.config.base import ConfigError

API_KEY_ENV = "MFR_SERVE_API_KEY"
API_KEY_FILE_ENV = "MFR_SERVE_API_KEY_FILE"
ENROL_KEY_ENV = "MFR_SERVE_ENROL_KEY"
ENROL_KEY_FILE_ENV = "MFR_SERVE_ENROL_KEY_FILE"
MIN_KEY_LENGTH = 16
API_KEY_HEADER = "x-api-key"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; the wildcard and every other address are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class KeyDigest:
    """SHA-256 of the API key: what the replicas hold and compare against."""

    hexdigest: str = field(repr=False)

    def __repr__(self) -> str:
        return "KeyDigest(***)"

    @property
    def key_id(self) -> str:
        """Names the key in audit lines without revealing it (a prefix of a hash of its digest)."""
        return hashlib.sha256(self.hexdigest.encode()).hexdigest()[:12]

    def matches(self, presented: str | None) -> bool:
        if not presented:
            return False
        candidate = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest()
        return hmac.compare_digest(candidate, self.hexdigest)


def _digest(key: str, source: str) -> KeyDigest:
    key = key.strip()
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"the API key from {source} is shorter than {MIN_KEY_LENGTH} characters")
    return KeyDigest(hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest())


def load_key_digest(key_file: str | Path | None = None, file_env: str = API_KEY_FILE_ENV,
                    key_env: str = API_KEY_ENV) -> KeyDigest | None:
    """The API key's digest from `key_file`, else $<file_env>, else $<key_env>; None if none is set. A key
    taken from the environment is removed from it once hashed, so Ray workers started later do not inherit
    it. Errors name the source, never the key."""
    path = key_file or os.environ.get(file_env)
    if path:
        try:
            text = Path(path).expanduser().read_text()
        except OSError as err:
            raise ConfigError(f"cannot read the API key file {path}: {err.strerror}") from None
        return _digest(text, f"file {path}")
    if os.environ.get(key_env):
        return _digest(os.environ.pop(key_env), f"${key_env}")
    return None


def load_enrol_digest(key_file: str | Path | None = None, identify: KeyDigest | None = None) -> KeyDigest | None:
    """The enrolment key's digest (`--enrol-key-file`, $MFR_SERVE_ENROL_KEY_FILE, $MFR_SERVE_ENROL_KEY), or
    None: enrolment over HTTP is then off. It must differ from the identification key, else anyone who may
    identify could enrol under any name."""
    digest = load_key_digest(key_file, ENROL_KEY_FILE_ENV, ENROL_KEY_ENV)
    if digest is not None and identify is not None and hmac.compare_digest(digest.hexdigest, identify.hexdigest):
        raise ConfigError("the enrolment key equals the identification key: give enrolment a key of its own")
    return digest


UNSTATED_HOST = "an address not stated to this process"  # a Serve config's proxy, when its host is not known


def require_key(host: str, digest: KeyDigest | None, require: bool | None = None) -> None:
    """Refuse a bind beyond loopback (or `require=True`) without a key: a configuration error naming the host."""
    needed = (not is_loopback(host)) if require is None else require
    if needed and digest is None:
        raise ConfigError(
            f"serving on {host} needs an API key: put one (>= {MIN_KEY_LENGTH} characters) in a file and "
            f"pass --api-key-file FILE or set ${API_KEY_FILE_ENV} (or ${API_KEY_ENV})"
        )


def resolve_auth(host: str, key_file: str | Path | None = None,
                 require: bool | None = None) -> KeyDigest | None:
    """The digest the app must check, or None for no auth. Auth is required when the HTTP server binds
    beyond loopback (or `require=True`), and then a missing key is a configuration error; a configured key is
    enforced on loopback too."""
    digest = load_key_digest(key_file)
    require_key(host, digest, require)
    return digest


def presented_key(headers) -> str | None:
    """The key a request carries: `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get(API_KEY_HEADER) or None


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies: list[str]) -> str:
    """The caller's address: the connection's peer, or, when that peer is a trusted proxy (a load
    balancer in front of the service), the last address it appended to X-Forwarded-For."""
    peer = peer or "unknown"
    if forwarded_for and peer in trusted_proxies:
        return forwarded_for.split(",")[-1].strip() or peer
    return peer


class RateLimiter:
    """Token bucket per client: `rate` requests/s sustained, `burst` at once. The service keeps one bucket
    per client address and one per API key, so clients behind one load balancer are told apart by their
    keys. Per replica: with N replicas a client gets up to N times the rate. Thread-safe; idle clients are
    forgotten after a minute."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = float(rate), int(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._last_sweep = time.monotonic()

    MAX_CLIENTS = 50_000  # buckets kept at most: a flood of new addresses cannot grow the table without end

    def _sweep(self, now: float) -> None:
        """Forget idle clients; past MAX_CLIENTS, the least recently seen half too."""
        kept = {c: (t, s) for c, (t, s) in self._buckets.items() if now - s < 60}
        if len(kept) > self.MAX_CLIENTS:
            kept = dict(sorted(kept.items(), key=lambda item: item[1][1])[len(kept) // 2:])
        self._buckets, self._last_sweep = kept, now

    def allow(self, client: str) -> tuple[bool, float]:
        """(allowed, seconds until the next request would be allowed)."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[client] = (tokens, now)
            if now - self._last_sweep > 60 or len(self._buckets) > self.MAX_CLIENTS:
                self._sweep(now)
        return allowed, 0.0 if allowed else (1.0 - tokens) / self.rate
