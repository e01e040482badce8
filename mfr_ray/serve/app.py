"""`mfr serve`: the recogniser as a Ray Serve application.

Three deployments: `Frontend` (HTTP: auth, rate and size limits, parsing, the decisions; cheap, scales with
`frontend_replicas`), `Embedder` (the network behind `ModelPackage.embed_images`, continuous request batching
(`serve.batching`), `num_replicas` or autoscaling) and `GalleryKeeper` (one replica: the single writer of the
Parquet gallery and the owner of its search index, so every frontend sees every enrolment).

Endpoints (JSON out; images as base64 in a JSON body, or as the raw body where one image is sent):
  POST /verify    {"a": B64, "b": B64, "far": 0.001}                     -> same / different, score, threshold
  POST /identify  {"image": B64, "k": 5, "far": 0.001}, or raw body ?k=&far= -> match / unknown, top-k
  POST /enrol     {"identity": NAME, "image": B64}, or raw body + X-Identity header -> the template row
  GET  /healthz   -> {"status": "ok"} (model and gallery details for authorised callers)
Bad input is a 4xx with {"error": ..., "reason": ...} (`parsing`); a replica that is restarting answers 503
with Retry-After; anything unexpected is a 500 that names a request id and nothing else (the traceback goes
to the replica's log). The JSON of /verify and /identify is `dataclasses.asdict` of `recognise.VerifyResult`
/ `IdentifyResult`, as `mfr verify` / `mfr identify` print. /enrol has its own key and is off without one.
The package is resolved once, in `build_app`: every replica refuses to start with another `package_id`.
(No `from __future__ import annotations` here: FastAPI reads the route annotations at import.)
"""

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import threading
import time
import urllib.parse
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator
from ray import serve

from mfr_ray.config.base import ConfigError, StrictModel
from mfr_ray.config.common import LOOPBACK, RayConfig
from mfr_ray.raycluster import init_ray
from mfr_ray.registry import RUNTIMES
from mfr_ray.serve.auth import (
    UNSTATED_HOST,
    KeyDigest,
    RateLimiter,
    client_address,
    is_loopback,
    load_enrol_digest,
    presented_key,
    require_key,
    resolve_auth,
)
from mfr_ray.serve.batching import ContinuousBatcher
from mfr_ray.serve.parsing import (
    RequestError,
    decode_images,
    parse_far,
    parse_identity,
    parse_json_object,
    parse_k,
)
from mfr_ray.serve.synthetic import SyntheticMasks

_logger = logging.getLogger("mfr_ray.serve")

APP_NAME = "mfr-recogniser"
# ModelPackage.embed_images statuses -> HTTP status of the refusal.
IMAGE_STATUS_CODES = {"too_large": 413, "unsupported": 415, "decode_error": 422, "no_face": 422}
API_SOURCE_PREFIX = "api-"
IDENTITY_HEADER = "x-identity"
RETRY_AFTER_S = 2  # what a 503 asks a client to wait while a replica restarts
# Ray Serve's own settings for a lean request path, set on every replica (`ServeConfig.lean_request_path`):
# its "throughput optimized" set less direct ingress (which would give every ingress replica an HTTP port of
# its own). Handles call replicas over gRPC, user code and the router run on the replica's event loop, and
# the per-request access line stays in the replica's log file instead of also crossing Ray's log monitor.
# Measured on 2 cores, idle: /identify p50 51 -> 44-47 ms, 4 clients +15-20% req/s (README).
LEAN_REQUEST_PATH = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                     "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0", "RAY_SERVE_LOG_TO_STDERR": "0"}


class BatchingConfig(StrictModel):
    """Continuous batching on the network (`serve.batching.ContinuousBatcher`): the requests that arrive while
    a forward pass runs share the next one, up to `max_batch_size` requests (a request's images always go
    together); off, each request is embedded alone."""

    enabled: bool = True
    max_batch_size: int = Field(8, ge=1, le=256)
    wait_timeout_s: float = Field(0.0, ge=0, le=5, description="how long a pass that starts on an idle network "
                                  "waits for company (0: none; under load batches fill while a pass runs)")


class AutoscalingConfig(StrictModel):
    """Serve autoscaling of the Embedder: replicas follow the ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class LimitsConfig(StrictModel):
    """Per-request limits: the body (checked before anything is decoded), the pixels of an image (checked
    from its header), `k`, and a token-bucket rate per client address and frontend replica."""

    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="request body, base64 included")
    max_pixels: int = Field(16_000_000, ge=10_000, description="a camera frame is a few megapixels; each decoded "
                            "pixel costs about 3 bytes per copy, and decoding makes several")
    max_k: int = Field(50, ge=1)
    rate_per_s: float = Field(50.0, gt=0, description="sustained requests/s per client address, per API key "
                              "and per frontend replica")
    burst: int = Field(100, ge=1)
    trusted_proxies: list[str] = Field(default_factory=list, description="addresses of load balancers whose "
                                       "X-Forwarded-For names the client (else the peer address counts)")


class TLSConfig(StrictModel):
    """HTTPS at Serve's proxy (a certificate and its key, PEM files on every node that runs a proxy)."""

    certfile: str
    keyfile: str


class ServeConfig(StrictModel):
    """Everything `mfr serve` needs; `run()` takes these fields as keyword arguments."""

    package: str = Field(description="model package from `mfr export` (folder, s3://, models:/)")
    gallery: str = Field(description="gallery folder or s3:// prefix; created for the package if missing")
    host: str = Field(LOOPBACK, description="HTTP bind address; anything but loopback requires an API key")
    port: int = Field(8000, ge=1, le=65535)
    api_key_file: str | None = Field(None, description="file holding the API key (else "
                                     "$MFR_SERVE_API_KEY_FILE or $MFR_SERVE_API_KEY); enforced whenever set")
    enrol_key_file: str | None = Field(None, description="file holding the key /enrol requires (else "
                                       "$MFR_SERVE_ENROL_KEY_FILE or $MFR_SERVE_ENROL_KEY); none: /enrol is off")
    tls: TLSConfig | None = Field(None, description="HTTPS at the proxy; a non-loopback bind needs it or "
                                  "behind_tls_proxy")
    behind_tls_proxy: bool = Field(False, description="a TLS-terminating proxy is in front: plain HTTP is "
                                   "allowed on a non-loopback bind")
    audit_log: str | None = Field("default", description="audit file (JSON lines); 'default': "
                                  "<gallery>/audit.jsonl for a local gallery, none on S3; null: logger only")
    gallery_poll_s: float = Field(2.0, gt=0, le=60, description="how often the gallery keeper looks for "
                                  "changes made outside the service (mfr unenrol, mfr enrol): answers are at "
                                  "most this stale")
    package_id: str | None = Field(None, description="set by build_app: the package every replica must load")
    disclose_candidates: bool = Field(False, description="/identify answers list the top-k identities with their "
                                      "scores and template sources (an operator's console); off, a caller "
                                      "learns the match and nothing about who else is enrolled")
    synthetic_masks: SyntheticMasks = Field(default_factory=SyntheticMasks, description="masked copies of each "
                                            "/enrol photo stored as synthetic:<type> templates")
    far: float = Field(1e-3, gt=0, lt=1, description="default FAR of decisions (one of the package's)")
    fpir: float | None = Field(None, gt=0, lt=1, description="default per-search false-positive identification "
                               "rate of /identify (the package needs search calibration); None: /identify "
                               "decides at `far` per comparison unless a request asks for an fpir")
    allowed_fpirs: list[float] = Field([0.01, 0.001], description="the per-search rates an /identify request may "
                                       "ask for besides `fpir` (the operator's floor: no looser one)")
    allowed_fars: list[float] | None = Field(None, description="the FARs a request may ask for (the operator's "
                                             "floor: a caller cannot pick a looser one); None: every calibrated FAR")
    top_k: int = Field(5, ge=1)
    num_replicas: int = Field(1, ge=1, description="Embedder replicas when autoscaling is off")
    autoscaling: AutoscalingConfig | None = None
    frontend_replicas: int = Field(1, ge=1)
    embedder_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per Embedder replica")
    torch_threads: int = Field(1, ge=1, description="intra-op threads of each Embedder replica (2 for a single "
                               "replica on a 2-core machine: /identify p50 -4 to -7 ms, README)")
    lean_request_path: bool = Field(True, description="Serve's lean replica settings (LEAN_REQUEST_PATH): gRPC "
                                    "between deployments, user code on the replica's event loop, access lines "
                                    "in the replica's log file only")
    runtime: RUNTIMES.name_type | None = Field(
        None, description="what runs the network: openvino | onnxruntime | torch; None: the package's choice"
    )
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    ray: RayConfig = RayConfig()

    def request_fpirs(self) -> list[float]:
        """The per-search rates an /identify request may name: the operator's list and the default."""
        return sorted({*self.allowed_fpirs, *([self.fpir] if self.fpir is not None else [])})

    def audit_path(self) -> str | None:
        from mfr_ray.serve.audit import default_audit_path

        return default_audit_path(self.gallery) if self.audit_log == "default" else self.audit_log

    def check_transport(self, host: str, tls: bool) -> None:
        """A bind beyond loopback carries biometric data: refuse plain HTTP unless the proxy has TLS or the
        operator says a TLS-terminating proxy is in front."""
        if not is_loopback(host) and not tls and not self.behind_tls_proxy:
            raise ConfigError(f"serving on {host} over plain HTTP: configure tls (certfile, keyfile) or, when a "
                              "TLS-terminating proxy is in front, behind_tls_proxy=true (docs/deploy.md)")


def _embed_result(wire: dict):
    from mfr_ray.serve.package import EmbedResult
    from mfr_ray.serve.synthetic import SyntheticTemplate

    synthetic = [SyntheticTemplate(t["kind"], t["embedding"], t["mask_probability"]) for t in wire.get("synthetic", [])]
    return EmbedResult(wire["status"], wire["reason"], wire["embedding"], wire["align_method"],
                       wire.get("mask_probability"), synthetic)


def _wire(result) -> dict:
    """An EmbedResult as plain data for the trip between replicas."""
    emb = None if result.embedding is None else np.asarray(result.embedding, dtype=np.float32)
    return {"status": result.status, "reason": result.reason, "embedding": emb,
            "align_method": result.align_method, "mask_probability": result.mask_probability,
            "synthetic": [dataclasses.asdict(t) for t in result.synthetic]}


def keep_replica_server_on_loopback() -> None:
    """Ray Serve 2.60 starts every replica's inter-deployment gRPC server on [::]:0 (all interfaces), just
    after the deployment's constructor, whatever the node's address. On a loopback node (a local Ray from
    `init_ray`) bind it to 127.0.0.1 instead: called first in each constructor, it wraps the function the
    replica binds with (this replica process only)."""
    import ray
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "loopback_only", False) or not is_loopback(ray.util.get_node_ip_address()):
        return

    def bind_loopback(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address[len("[::]:"):]
        return original(server, address)

    bind_loopback.loopback_only = True
    replica.add_port_to_grpc_server = bind_loopback


# --------------------------------------------------------------------------------------------- Embedder
@serve.deployment(name="Embedder")
class Embedder:
    """The package's network, loaded once per replica. Batched: concurrent requests share a forward pass;
    unbatched: one image at a time. The forward pass runs off the event loop so the next batch can gather."""

    def __init__(self, package: str, package_id: str, batching: dict, max_pixels: int, torch_threads: int = 1,
                 synthetic: dict | None = None, runtime: str | None = None):
        from mfr_ray.serve.package import load_package
        from mfr_ray.serve.synthetic import SyntheticMasks

        keep_replica_server_on_loopback()
        self.package = load_package(package, num_threads=torch_threads, expect_id=package_id).use_runtime(runtime)
        self.synthetic = SyntheticMasks.model_validate(synthetic or {})
        self.batching = BatchingConfig.model_validate(batching)
        self.max_pixels = max_pixels
        self._package_lock = threading.Lock()  # one call into the package (detector, runtime session) at a time
        self._batcher = ContinuousBatcher(self._embed_requests, self.batching.max_batch_size,
                                          self.batching.wait_timeout_s)
        self.package.embed_images([])  # loads MTCNN, dlib and the network before the first request

    def _embed(self, images: list[bytes], synthetic=None) -> list[dict]:
        """The package's path for these images, never beside another call: the batched, unbatched and
        enrolment paths each run in a worker thread, and a runtime session is not safe to share."""
        with self._package_lock:
            return [_wire(r) for r in self.package.embed_images(images, max_pixels=self.max_pixels,
                                                                 synthetic=synthetic)]

    async def embed_enrolment(self, image: bytes) -> dict:
        """An enrolment photo: its embedding and those of its synthetic-mask copies (unbatched: rare)."""
        return (await asyncio.to_thread(self._embed, [image], self.synthetic))[0]

    def _embed_requests(self, requests: list[list[bytes]]) -> list[list[dict]]:
        """One pass over the images of several requests; each request gets its own images' results."""
        flat, answers = self._embed([image for images in requests for image in images]), []
        for images in requests:
            answers.append(flat[: len(images)])
            del flat[: len(images)]
        return answers

    async def embed(self, images: list[bytes]) -> list[dict]:
        """A request's images, in one pass (a lone /verify pair is embedded together, as `mfr verify` does)."""
        if self.batching.enabled:
            return await self._batcher.submit(images)
        return await asyncio.to_thread(self._embed, images)


# --------------------------------------------------------------------------------------------- GalleryKeeper
@serve.deployment(name="GalleryKeeper", num_replicas=1)
class GalleryKeeper:
    """The gallery's only writer in the service and its searcher. Writes and the poll for outside changes
    run in threads, off the event loop, so a search never waits for storage; each builds a new
    `GalleryState` and swaps it in whole, so a search never sees half an enrolment or removal."""

    MAX_PARTS = 32  # parts merged in the background beyond this (each enrolment appends one)

    def __init__(self, package: str, package_id: str, gallery: str, poll_s: float = 2.0):
        from mfr_ray.serve.gallery import Gallery
        from mfr_ray.serve.package import load_package
        from mfr_ray.serve.search_calibration import SearchCalibration

        keep_replica_server_on_loopback()
        self.package = load_package(package, expect_id=package_id)
        self.gallery = Gallery.create_or_open(gallery, self.package, package_uri=package)
        self._enrolling = threading.Lock()
        self._compacting = threading.Lock()
        self._calibration = SearchCalibration.load(self.package.folder)  # None: no per-search rates
        self._search_points: dict = {}  # fpir -> per-search thresholds, for the gallery version in the key
        threading.Thread(target=self._poll, args=(poll_s,), daemon=True, name="gallery-poll").start()

    def _poll(self, every_s: float) -> None:
        """Notice changes made outside the service (`mfr unenrol`, `mfr enrol`) within `every_s`."""
        while True:
            time.sleep(every_s)
            try:
                if self.gallery.refresh_if_changed():
                    _logger.info("gallery %s changed outside the service: reloaded", self.gallery.uri)
            except Exception:  # storage hiccups must not end the poll; the next one retries
                _logger.warning("gallery poll failed", exc_info=True)

    async def search_identities(self, embedding: np.ndarray, k: int) -> list[dict]:
        return [dataclasses.asdict(m) for m in self.gallery.search_identities(embedding, k)]

    async def search_points(self, fpir: float) -> dict:
        """Per-search thresholds at `fpir` for the gallery as it is (recomputed when it changes, off the event
        loop), or {"error": why} for a package without search calibration."""
        from mfr_ray.serve.search_calibration import gallery_points, no_calibration_error, points_as_dict

        if self._calibration is None:
            return {"error": str(no_calibration_error(self.package))}
        key = (self.gallery.state.change_key, fpir)
        if key not in self._search_points:
            points, identities = await asyncio.to_thread(gallery_points, self._calibration, self.gallery, fpir)
            fresh = {k: v for k, v in self._search_points.items() if k[0] == key[0]}  # other rates, same gallery
            self._search_points = fresh | {key: {"points": points_as_dict(points), "identities": identities}}
        return self._search_points[key]

    async def enrol(self, identity: str, source_key: str, wire: dict) -> dict:
        """Store one image's row (failed ones too: every input is a row); an image already enrolled ok for
        this identity is not stored twice. A gallery locked by another writer answers `gallery_locked`."""
        from mfr_ray.data.layout import OutputLocked

        try:
            row = await asyncio.to_thread(self._enrol, identity, source_key, wire)
        except OutputLocked as exc:  # the details (host, pid, storage path) stay in this replica's log
            _logger.warning("enrolment refused: %s", exc)
            wait = exc.retry_after_s or 5.0
            return {"error": "gallery_locked", "reason": f"another writer is changing the gallery; its lease "
                    f"ends within {wait:.0f} s: retry then", "retry_after_s": wait}
        if len(self.gallery.manifest.get("parts", [])) > self.MAX_PARTS and not self._compacting.locked():
            threading.Thread(target=self._compact, daemon=True, name="gallery-compact").start()
        return row

    def _enrol(self, identity: str, source_key: str, wire: dict) -> dict:
        import pyarrow.compute as pc

        from mfr_ray.serve.gallery import _utc_now, rows_of, template_id

        fields = ("template_id", "identity", "source_key", "status", "reason", "align_method")
        with self._enrolling:
            tid = template_id(identity, source_key)
            known = self.gallery.table.filter(pc.equal(self.gallery.table.column("template_id"), tid))
            if known.num_rows:  # an image already enrolled, or already refused, is not stored twice
                row = known.to_pylist()[0]
                return {k: row[k] for k in fields} | {"stored": False, "synthetic_templates": 0,
                                                      "reason": row["reason"] or "already enrolled"}
            rows = rows_of(identity, source_key, _embed_result(wire), _utc_now())
            self.gallery.add_rows(rows)  # the photo and its synthetic templates: one part, all or nothing
        return {k: rows[0][k] for k in fields} | {"stored": True, "synthetic_templates": len(rows) - 1}

    def _compact(self) -> None:
        with self._compacting:
            try:
                self.gallery.compact(self.MAX_PARTS)
            except Exception:  # a later enrolment tries again
                _logger.warning("gallery compaction failed", exc_info=True)

    async def stats(self) -> dict:
        state = self.gallery.state
        return {"uri": self.gallery.uri, "templates": state.templates.num_rows,
                "identities": len(set(state.templates.column("identity").to_pylist())),
                "version": state.manifest.get("version", 0)}


# --------------------------------------------------------------------------------------------- Frontend
http_app = FastAPI(title="mfr-ray recogniser", docs_url=None, redoc_url=None, openapi_url=None)


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """What a call to a replica raises while that replica is dead or restarting."""
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    return (ray_errors.RayActorError, ray_errors.ActorUnavailableError, serve_errors.BackPressureError,
            serve_errors.DeploymentUnavailableError)


def disclosed(result, candidates: bool) -> dict:
    """An identify answer as a caller may see it: without candidates (who else is enrolled, their scores
    and template sources) and without the best score of a probe nobody matched, unless the operator asks."""
    out = dataclasses.asdict(result)
    if not candidates:
        out["candidates"] = []
        if result.decision != "match":
            out["score"] = None
            out["reason"] = "no enrolled identity reaches the threshold" if result.candidates else out["reason"]
    return out


async def answer(work) -> JSONResponse:
    """Every route's answer: its JSON; a 4xx for a client error; 503 with Retry-After while a replica
    restarts; and for anything else a 500 naming a request id, the details only in the replica's log (no
    traceback, path or message reaches the client)."""
    try:
        return JSONResponse(await work)
    except RequestError as err:
        return JSONResponse({"error": err.error, "reason": err.reason}, status_code=err.status, headers=err.headers)
    except _unavailable_errors():
        _logger.warning("a replica is unavailable", exc_info=True)
        return JSONResponse({"error": "unavailable", "reason": f"the service is restarting a replica; retry in "
                             f"{RETRY_AFTER_S} s"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    except Exception:  # the promise: never a traceback to the client
        request_id = uuid.uuid4().hex[:12]
        _logger.exception("request %s failed", request_id)
        return JSONResponse({"error": "internal", "reason": f"internal error (request {request_id}); the "
                             "service log has the details"}, status_code=500)


@dataclasses.dataclass
class Asked:
    """What a decision request asked for, checked: the caller's key id, the FAR, and for /identify k, the
    per-search rate and its thresholds (None: decided per comparison); then the embedded faces."""

    key_id: str | None
    far: float | None  # None when /identify decides at a per-search rate
    k: int | None = None
    fpir: float | None = None
    search: dict | None = None
    faces: list = dataclasses.field(default_factory=list)


@serve.deployment(name="Frontend", max_ongoing_requests=64)
@serve.ingress(http_app)
class Frontend:
    """HTTP in, JSON out: auth, limits, parsing, and the verify / identify decisions on the embeddings."""

    def __init__(self, embedder, keeper, settings: dict, key_digest: KeyDigest | None,
                 enrol_digest: KeyDigest | None = None):
        from mfr_ray.serve.audit import AuditLog
        from mfr_ray.serve.package import load_package

        keep_replica_server_on_loopback()
        self.embedder, self.keeper = embedder, keeper
        self.cfg = ServeConfig.model_validate(settings)
        self.key_digest, self.enrol_digest = key_digest, enrol_digest
        # thresholds and score; the network loads in Embedder
        self.package = load_package(self.cfg.package, expect_id=self.cfg.package_id)
        self.limiter = RateLimiter(self.cfg.limits.rate_per_s, self.cfg.limits.burst)
        self.audit = AuditLog(self.cfg.audit_path())

    # -- request plumbing ------------------------------------------------------------------------------
    def _client(self, request: Request) -> str:
        peer = request.client.host if request.client else None
        forwarded = ",".join(request.headers.getlist("x-forwarded-for")) or None  # every header line, in order
        return client_address(peer, forwarded, self.cfg.limits.trusted_proxies)

    def _limit(self, bucket: str) -> None:
        allowed, retry_after = self.limiter.allow(bucket)
        if not allowed:
            raise RequestError(429, "rate_limited", f"more than {self.cfg.limits.rate_per_s:g} requests/s; retry "
                               f"in {retry_after:.2f} s", {"Retry-After": f"{max(1, round(retry_after))}"})

    async def _guard(self, request: Request, open_route: bool = False, enrol: bool = False) -> str | None:
        """Auth, then the rate limit of what the caller is: its API key's bucket when it presents the right
        key, else its address's (callers without a key drain only that one, never the key holders'). Returns
        the key id of an authorised caller ("none" where no key is configured), None for an unauthorised one
        on an open route; refusals are audited."""
        digest = self.enrol_digest if enrol else self.key_digest
        if enrol and digest is None:
            self._refused(request, "enrolment_off")
            raise RequestError(403, "enrolment_off", "enrolment over HTTP is off: start the service with an "
                               "enrolment key (--enrol-key-file), or enrol with `mfr enrol`")
        if digest is None:
            self._limit(f"ip:{self._client(request)}")
            return "none"
        if digest.matches(presented_key(request.headers)):
            self._limit(f"key:{digest.key_id}")
            return digest.key_id
        self._limit(f"anonymous:{self._client(request)}")
        if open_route:
            return None
        self._refused(request, "unauthorized")
        raise RequestError(401, "unauthorized", "missing or wrong API key: send `Authorization: Bearer KEY` "
                           "or `X-API-Key: KEY`", {"WWW-Authenticate": "Bearer"})

    def _refused(self, request: Request, why: str) -> None:
        self.audit.record("refused", key_id=None, client=self._client(request), route=request.url.path,
                          decision=why)

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "too_large", f"request body of {declared} bytes exceeds {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, "too_large", f"request body exceeds {limit} bytes")
        return bytes(body)

    async def _payload(self, request: Request, image_fields: tuple[str, ...]) -> tuple[dict, dict]:
        """(JSON fields + query parameters, decoded images). A non-JSON body is the one image itself."""
        body = await self._body(request)
        params: dict[str, Any] = dict(request.query_params)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            if len(image_fields) != 1:
                raise RequestError(415, "unsupported",
                                   f"send JSON with base64 fields {', '.join(image_fields)}")
            return params, {image_fields[0]: body}
        doc = parse_json_object(body)
        images = decode_images(doc, image_fields)
        return params | doc, images

    def _far(self, params: dict):
        from mfr_ray.serve.package import PackageError

        far = parse_far(params.get("far", self.cfg.far))
        allowed = self.cfg.allowed_fars
        if allowed is not None and far != self.cfg.far and not any(math.isclose(far, a) for a in allowed):
            raise RequestError(400, "far_not_allowed", f"this service decides at FAR {', '.join(map(str, allowed))}")
        try:
            return far, self.package.operating_point(far)
        except PackageError as err:
            raise RequestError(400, "unknown_far", str(err)) from None

    async def _embed(self, images: list[bytes]) -> list:
        empty = [i for i, data in enumerate(images) if not data]
        present = [data for data in images if data]
        it = iter(await self.embedder.embed.remote(present) if present else [])
        return [_embed_result({"status": "decode_error", "reason": "empty image (0 bytes)", "embedding": None,
                               "align_method": "none"}) if i in empty else _embed_result(next(it))
                for i in range(len(images))]

    @staticmethod
    def _refuse_images(results: list, labels: tuple[str, ...]) -> None:
        bad = [(label, r) for label, r in zip(labels, results, strict=True) if not r.ok]
        if bad:
            status = max(IMAGE_STATUS_CODES.get(r.status, 422) for _, r in bad)
            raise RequestError(status, bad[0][1].status, "; ".join(f"image {label}: {r.status} ({r.reason})"
                                                                   for label, r in bad),
                               {"X-Images": json.dumps({label: r.status for label, r in bad})})

    # -- routes ----------------------------------------------------------------------------------------
    @http_app.get("/healthz")
    async def healthz(self, request: Request):
        return await answer(self._healthz(request))

    async def _healthz(self, request: Request) -> dict:
        authorised = await self._guard(request, open_route=True)
        out: dict[str, Any] = {"status": "ok"}
        if authorised:
            out |= {"package_id": self.package.package_id, "default_far": self.cfg.far, "default_fpir": self.cfg.fpir,
                    "fpirs": self.cfg.request_fpirs(),
                    "search_calibration": self.package.spec.get("search_calibration", {}).get("faces"),
                    "fars": [p.far_target for p in self.package.operating_points],
                    "gallery": await self.keeper.stats.remote(), "batching": self.cfg.batching.model_dump(),
                    "gallery_poll_s": self.cfg.gallery_poll_s}
            if self.cfg.fpir is not None:  # the thresholds a search is decided at now, for the gallery as it is
                out["search_points"] = await self.keeper.search_points.remote(self.cfg.fpir)
        return out

    @http_app.post("/verify")
    async def verify(self, request: Request):
        return await answer(self._verify(request))

    async def _faces(self, request: Request, names: tuple[str, ...], identify: bool = False) -> Asked:
        """A decision request's common part: auth, the parsed body and its numbers (all checked before any
        image is embedded), the FAR's operating point (or, identifying at a per-search rate, the thresholds
        for the gallery as it is) and the embedded images (a 4xx when one has no usable face)."""
        key_id = await self._guard(request)
        params, images = await self._payload(request, names)
        asked = Asked(key_id, None, fpir=self._fpir(params) if identify else None)
        if asked.fpir is None:
            asked.far, _ = self._far(params)
        if identify:
            asked.k = parse_k(params.get("k", self.cfg.top_k), self.cfg.limits.max_k)
            asked.search = await self._search_points(asked.fpir) if asked.fpir is not None else None
        asked.faces = await self._embed([images[name] for name in names])
        self._refuse_images(asked.faces, names)
        return asked

    def _fpir(self, params: dict) -> float | None:
        """The per-search rate a request asks for (or the service's default when it names no far), within
        the operator's list."""
        if "fpir" not in params:
            return self.cfg.fpir if "far" not in params else None
        if "far" in params:
            raise RequestError(400, "far_and_fpir", "ask for one rate: far (per comparison) or fpir (per search)")
        fpir = parse_far(params["fpir"], "fpir")
        if not any(math.isclose(fpir, a) for a in self.cfg.request_fpirs()):
            raise RequestError(400, "fpir_not_allowed", f"this service decides searches at FPIR "
                               f"{', '.join(map(str, self.cfg.request_fpirs()))}")
        return fpir

    async def _search_points(self, fpir: float) -> dict:
        found = await self.keeper.search_points.remote(fpir)
        if "error" in found:
            raise RequestError(400, "no_search_calibration", found["error"])
        return found

    async def _verify(self, request: Request) -> dict:
        from mfr_ray.serve.recognise import verify_decision

        asked = await self._faces(request, ("a", "b"))
        return dataclasses.asdict(verify_decision(self.package, asked.far, *asked.faces))

    @http_app.post("/identify")
    async def identify(self, request: Request):
        return await answer(self._identify(request))

    async def _identify(self, request: Request) -> dict:
        from mfr_ray.serve.recognise import Candidate, identify_decision, search_decision
        from mfr_ray.serve.search_calibration import points_from_dict

        asked = await self._faces(request, ("image",), identify=True)
        (probe,) = asked.faces
        matches = await self.keeper.search_identities.remote(probe.embedding, asked.k)
        candidates = [Candidate(**m) for m in matches]  # gallery.Match fields, by name
        if asked.search is None:
            result = identify_decision(self.package, asked.far, probe, candidates)
        else:
            result = search_decision(points_from_dict(asked.search["points"]), asked.fpir, probe, candidates,
                                     asked.search["identities"])
        self.audit.record("identify", key_id=asked.key_id, client=self._client(request), decision=result.decision,
                          identity=result.identity, score=result.score, far=result.far, fpir=result.fpir,
                          kind=result.comparison_kind)
        return disclosed(result, self.cfg.disclose_candidates)

    @http_app.post("/enrol")
    async def enrol(self, request: Request):
        return await answer(self._enrol(request))

    async def _enrol(self, request: Request) -> dict:
        key_id = await self._guard(request, enrol=True)
        params, images = await self._payload(request, ("image",))
        header = request.headers.get(IDENTITY_HEADER)
        if "identity" in request.query_params:
            raise RequestError(400, "bad_identity", "send the identity in the JSON body or the X-Identity "
                               "header (percent-encoded UTF-8), not the query string: URLs land in access logs")
        if header is not None and "identity" in params:
            raise RequestError(400, "bad_identity", "send the identity once: in the JSON body or X-Identity")
        identity = parse_identity(params.get("identity") if header is None else urllib.parse.unquote(header))
        data = images["image"]
        source_key = f"{identity}/{API_SOURCE_PREFIX}{hashlib.sha256(data).hexdigest()[:16]}"
        result = _embed_result(await self.embedder.embed_enrolment.remote(data)) if data else \
            (await self._embed([data]))[0]
        row = await self.keeper.enrol.remote(identity, source_key, _wire(result))
        if "error" in row:
            raise RequestError(503, row["error"], row["reason"], {"Retry-After": f"{max(1, round(row['retry_after_s']))}"})
        self.audit.record("enrol", key_id=key_id, client=self._client(request), identity=identity,
                          decision=row["status"], template_id=row["template_id"], stored=row["stored"])
        self._refuse_images([result], ("image",))  # the failed row is stored all the same
        return row


# --------------------------------------------------------------------------------------------- build and run
def build_app(cfg: ServeConfig, key_digest: KeyDigest | None = None, enrol_digest: KeyDigest | None = None):
    """The bound application: Frontend -> (Embedder, GalleryKeeper). The package is resolved here, once
    (`models:/NAME@ALIAS` to its version now, any URI to its `package_id`), and every replica is told
    which package it must load."""
    from mfr_ray.serve.package import load_package, pin_package_uri
    from mfr_ray.serve.search_calibration import SearchCalibration

    pinned = pin_package_uri(cfg.package)
    package = load_package(pinned)
    if cfg.fpir is not None and SearchCalibration.load(package.folder) is None:
        raise ValueError(f"fpir={cfg.fpir:g}: package {package.package_id} has no search calibration; re-export it "
                         "with --search-calibration FOLDER, or decide per comparison with --far")
    cfg = cfg.model_copy(update={"package": pinned, "package_id": package.package_id})
    replicas: dict[str, Any] = {"num_replicas": cfg.num_replicas}
    if cfg.autoscaling:
        replicas = {"autoscaling_config": cfg.autoscaling.model_dump()}
    embedder = Embedder.options(
        ray_actor_options=_actor_options(cfg, cfg.embedder_num_cpus),
        max_ongoing_requests=max(16, 2 * cfg.batching.max_batch_size), **replicas,
    ).bind(cfg.package, cfg.package_id, cfg.batching.model_dump(), cfg.limits.max_pixels, cfg.torch_threads,
           cfg.synthetic_masks.model_dump(), cfg.runtime)
    keeper = GalleryKeeper.options(ray_actor_options=_actor_options(cfg, 0)).bind(
        cfg.package, cfg.package_id, cfg.gallery, cfg.gallery_poll_s)
    settings = cfg.model_dump(mode="json", exclude={"ray"})
    frontend = Frontend.options(num_replicas=cfg.frontend_replicas, ray_actor_options=_actor_options(cfg, 0))
    return frontend.bind(embedder, keeper, settings, key_digest, enrol_digest)


def _actor_options(cfg: ServeConfig, num_cpus: float) -> dict[str, Any]:
    """A deployment's actor options: its CPUs and, unless turned off, the lean request path's settings."""
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if cfg.lean_request_path:
        options["runtime_env"] = {"env_vars": LEAN_REQUEST_PATH}
    return options


def _auth(cfg: ServeConfig, host: str, tls: bool) -> tuple[KeyDigest | None, KeyDigest | None]:
    """(identification key, enrolment key) digests for a proxy bound to `host` (with TLS or not), read
    once (a key from the environment leaves it when read); refuses plain HTTP beyond loopback and a missing
    key there."""
    cfg.check_transport(host, tls)
    key_digest = resolve_auth(host, cfg.api_key_file)
    return key_digest, load_enrol_digest(cfg.enrol_key_file, key_digest)


def _proxy(default_host: str, default_tls: bool) -> tuple[str, bool]:
    """(host, TLS on) of Serve's HTTP proxy as it really runs: on a cluster where Serve already runs, or in
    a Serve config's build task, its controller's http_options, whatever this process asked for."""
    import ray

    if not ray.is_initialized():  # asking Serve would start a default Ray on every interface
        return default_host, default_tls
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client(raise_if_no_controller_running=True).http_config
        return http.host or default_host, bool(http.ssl_certfile)
    except Exception:  # noqa: BLE001 - no controller reachable: what was asked is what binds
        return default_host, default_tls


def app_builder(args: dict):
    """Serve's application builder (`import_path: mfr_ray.serve.app:app_builder` in a Serve config or a
    KubeRay RayService): `args` are ServeConfig fields. The proxy's real http_options decide (where the
    controller is reachable); else `args.host`, and without it the proxy is taken to listen beyond loopback,
    so the API key is required (from $MFR_SERVE_API_KEY_FILE, e.g. a mounted secret). TLS must be set in the
    Serve config's http_options (`args.tls` cannot configure a proxy that already runs)."""
    host, tls = _proxy(args.get("host", UNSTATED_HOST), False)
    cfg = ServeConfig.model_validate(args | {"host": host})
    return build_app(cfg, *_auth(cfg, host, tls))


def start(cfg: ServeConfig, route_prefix: str = "/"):
    """Start (or update) the application on this machine's Ray (`init_ray`: local on loopback unless
    configured) with Serve's HTTP proxy on cfg.host:cfg.port. Refuses before anything starts when the
    configuration asks for an insecure bind, and again when a Serve already running binds beyond what was
    asked. Returns (the Frontend handle, the key digests)."""
    digests = _auth(cfg, cfg.host, cfg.tls is not None)
    init_ray(cfg.ray)
    tls = {"ssl_certfile": cfg.tls.certfile, "ssl_keyfile": cfg.tls.keyfile} if cfg.tls else {}
    serve.start(http_options={"host": cfg.host, "port": cfg.port, **tls})
    host, tls_on = _proxy(cfg.host, cfg.tls is not None)  # a Serve already running keeps its own http_options
    cfg.check_transport(host, tls_on)
    require_key(host, digests[0])
    return serve.run(build_app(cfg, *digests), name=APP_NAME, route_prefix=route_prefix), digests


def run(package: str, gallery: str, host: str = LOOPBACK, port: int = 8000, blocking: bool = True, **options):
    """The `mfr serve` entry: start the application and, when `blocking`, serve until Ctrl-C, then shut Serve
    down. `options` are further ServeConfig fields (batching={...}, num_replicas=2, api_key_file=...)."""
    fields = {"package": package, "gallery": gallery, "host": host, "port": port, **options}
    cfg = ServeConfig.model_validate(fields)
    _, (key_digest, enrol_digest) = start(cfg)
    auth = "API key required" if key_digest else "no auth (loopback only)"
    enrol = "/enrol with its own key" if enrol_digest else "/enrol off (no enrolment key)"
    scheme = "https" if cfg.tls else "http"
    print(f"mfr serve: {scheme}://{cfg.host}:{cfg.port} ({auth}; {enrol}); /verify /identify /enrol /healthz; "
          f"gallery changes made outside the service are seen within {cfg.gallery_poll_s:g} s", flush=True)
    if not blocking:
        return cfg
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return cfg
