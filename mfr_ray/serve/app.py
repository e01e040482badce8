"""`mfr serve`: the recogniser as a Ray Serve application.

Three deployments: `Frontend` (HTTP: auth, rate and size limits, parsing, the decisions; cheap, scales with
`frontend_replicas`), `Embedder` (the network behind `ModelPackage.embed_images`, `@serve.batch` request
batching, `num_replicas` or autoscaling) and `GalleryKeeper` (one replica: the single writer of the Parquet
gallery and the owner of its search index, so every frontend sees every enrolment).

Endpoints (JSON out; images as base64 in a JSON body, or as the raw body where one image is sent):
  POST /verify    {"a": B64, "b": B64, "far": 0.001}                     -> same / different, score, threshold
  POST /identify  {"image": B64, "k": 5, "far": 0.001}, or raw body ?k=&far= -> match / unknown, top-k
  POST /enrol     {"identity": NAME, "image": B64}, or raw body ?identity=   -> the template row stored
  GET  /healthz   -> {"status": "ok"} (model and gallery details for authorised callers)
Bad input is a 4xx with {"error": ..., "reason": ...}, never a 500. The JSON of /verify and /identify is
`dataclasses.asdict` of `recognise.VerifyResult` / `IdentifyResult`, as `mfr verify` / `mfr identify` print.
(No `from __future__ import annotations` here: FastAPI reads the route annotations at import.)
"""

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator
from ray import serve

from mfr_ray.config.base import StrictModel
from mfr_ray.config.common import LOOPBACK, RayConfig
from mfr_ray.raycluster import init_ray
from mfr_ray.registry import RUNTIMES
from mfr_ray.serve.auth import KeyDigest, RateLimiter, is_loopback, presented_key, resolve_auth

APP_NAME = "mfr-recogniser"
# ModelPackage.embed_images statuses -> HTTP status of the refusal.
IMAGE_STATUS_CODES = {"too_large": 413, "unsupported": 415, "decode_error": 422, "no_face": 422}
API_SOURCE_PREFIX = "api-"


class BatchingConfig(StrictModel):
    """`@serve.batch` on the network: requests arriving within `wait_timeout_s` of each other share one
    forward pass of up to `max_batch_size` images; off, each image is embedded alone."""

    enabled: bool = True
    max_batch_size: int = Field(8, ge=1, le=256)
    wait_timeout_s: float = Field(0.01, ge=0, le=5)


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
    max_pixels: int = Field(40_000_000, ge=10_000)
    max_k: int = Field(50, ge=1)
    rate_per_s: float = Field(50.0, gt=0, description="sustained requests/s per client and frontend replica")
    burst: int = Field(100, ge=1)


class ServeConfig(StrictModel):
    """Everything `mfr serve` needs; `run()` takes these fields as keyword arguments."""

    package: str = Field(description="model package from `mfr export` (folder, s3://, models:/)")
    gallery: str = Field(description="gallery folder or s3:// prefix; created for the package if missing")
    host: str = Field(LOOPBACK, description="HTTP bind address; anything but loopback requires an API key")
    port: int = Field(8000, ge=1, le=65535)
    api_key_file: str | None = Field(None, description="file holding the API key (else "
                                     "$MFR_SERVE_API_KEY_FILE or $MFR_SERVE_API_KEY); enforced whenever set")
    far: float = Field(1e-3, gt=0, lt=1, description="default FAR of decisions (one of the package's)")
    top_k: int = Field(5, ge=1)
    num_replicas: int = Field(1, ge=1, description="Embedder replicas when autoscaling is off")
    autoscaling: AutoscalingConfig | None = None
    frontend_replicas: int = Field(1, ge=1)
    embedder_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per Embedder replica")
    torch_threads: int = Field(1, ge=1, description="intra-op threads of each Embedder replica")
    runtime: RUNTIMES.name_type | None = Field(
        None, description="what runs the network: openvino | onnxruntime | torch; None: the package's choice"
    )
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    ray: RayConfig = RayConfig()


class RequestError(Exception):
    """A client error: HTTP status, a short machine-readable error and a reason for a person."""

    def __init__(self, status: int, error: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.error, self.reason, self.headers = status, error, reason, headers or {}


def _embed_result(wire: dict):
    from mfr_ray.serve.package import EmbedResult

    return EmbedResult(wire["status"], wire["reason"], wire["embedding"], wire["align_method"])


def _wire(result) -> dict:
    """An EmbedResult as plain data for the trip between replicas."""
    emb = None if result.embedding is None else np.asarray(result.embedding, dtype=np.float32)
    return {"status": result.status, "reason": result.reason, "embedding": emb,
            "align_method": result.align_method}


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

    def __init__(self, package: str, batching: dict, max_pixels: int, torch_threads: int = 1,
                 runtime: str | None = None):
        from mfr_ray.serve.package import load_package

        keep_replica_server_on_loopback()
        self.package = load_package(package, num_threads=torch_threads).use_runtime(runtime)
        self.batching = BatchingConfig.model_validate(batching)
        self.max_pixels = max_pixels
        self._one_at_a_time = asyncio.Lock()
        self._batched.set_max_batch_size(self.batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.batching.wait_timeout_s)
        self.package.embed_images([])  # loads MTCNN, dlib and the network before the first request

    def _embed(self, images: list[bytes]) -> list[dict]:
        return [_wire(r) for r in self.package.embed_images(images, max_pixels=self.max_pixels)]

    async def embed(self, image: bytes) -> dict:
        if self.batching.enabled:
            return await self._batched(image)
        async with self._one_at_a_time:
            return (await asyncio.to_thread(self._embed, [image]))[0]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, images: list[bytes]) -> list[dict]:
        return await asyncio.to_thread(self._embed, images)


# --------------------------------------------------------------------------------------------- GalleryKeeper
@serve.deployment(name="GalleryKeeper", num_replicas=1, ray_actor_options={"num_cpus": 0})
class GalleryKeeper:
    """The gallery's only writer and searcher. Methods are `async` without awaits inside, so they run one
    at a time on the replica's event loop: a search never sees half an enrolment."""

    def __init__(self, package: str, gallery: str):
        from mfr_ray.serve.gallery import Gallery
        from mfr_ray.serve.package import load_package

        keep_replica_server_on_loopback()
        self.package = load_package(package)
        self.gallery = Gallery.create_or_open(gallery, self.package, package_uri=package)

    async def search_identities(self, embedding: np.ndarray, k: int) -> list[dict]:
        return [dataclasses.asdict(m) for m in self.gallery.search_identities(embedding, k)]

    async def enrol(self, identity: str, source_key: str, wire: dict) -> dict:
        """Store one image's row (failed ones too: every input is a row); an image already enrolled ok for
        this identity is not stored twice."""
        from mfr_ray.serve.gallery import _utc_now, result_row, template_id

        tid = template_id(identity, source_key)
        templates = self.gallery.templates()
        if tid in set(templates.column("template_id").to_pylist()):
            return {"template_id": tid, "identity": identity, "source_key": source_key, "status": "ok",
                    "reason": "already enrolled", "align_method": wire["align_method"], "stored": False}
        row = result_row(identity, source_key, wire["status"], wire["reason"], wire["align_method"],
                         wire["embedding"], _utc_now())
        self.gallery.add_rows([row])
        fields = ("template_id", "identity", "source_key", "status", "reason", "align_method")
        return {k: row[k] for k in fields} | {"stored": True}

    async def stats(self) -> dict:
        templates = self.gallery.templates()
        return {"uri": self.gallery.uri, "templates": templates.num_rows,
                "identities": len(set(templates.column("identity").to_pylist()))}


# --------------------------------------------------------------------------------------------- Frontend
http_app = FastAPI(title="mfr-ray recogniser", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="Frontend", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(http_app)
class Frontend:
    """HTTP in, JSON out: auth, limits, parsing, and the verify / identify decisions on the embeddings."""

    def __init__(self, embedder, keeper, settings: dict, key_digest: KeyDigest | None):
        from mfr_ray.serve.package import load_package

        keep_replica_server_on_loopback()
        self.embedder, self.keeper = embedder, keeper
        self.cfg = ServeConfig.model_validate(settings)
        self.key_digest = key_digest
        self.package = load_package(self.cfg.package)  # thresholds and score; the network loads in Embedder
        self.limiter = RateLimiter(self.cfg.limits.rate_per_s, self.cfg.limits.burst)

    # -- request plumbing ------------------------------------------------------------------------------
    async def _guard(self, request: Request, open_route: bool = False) -> bool:
        """Rate limit, then auth; returns whether the caller is authorised (open routes let others in)."""
        client = request.client.host if request.client else "unknown"
        allowed, retry_after = self.limiter.allow(client)
        if not allowed:
            raise RequestError(429, "rate_limited", f"more than {self.cfg.limits.rate_per_s:g} requests/s "
                               f"from {client}; retry in {retry_after:.2f} s",
                               {"Retry-After": f"{max(1, round(retry_after))}"})
        if self.key_digest is None:
            return True
        if self.key_digest.matches(presented_key(request.headers)):
            return True
        if open_route:
            return False
        raise RequestError(401, "unauthorized", "missing or wrong API key: send `Authorization: Bearer KEY` "
                           "or `X-API-Key: KEY`", {"WWW-Authenticate": "Bearer"})

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
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, "bad_json", f"the body is not valid JSON: {err}") from None
        if not isinstance(doc, dict):
            raise RequestError(400, "bad_json", "the body must be a JSON object")
        images = {}
        for name in image_fields:
            value = doc.pop(name, None)
            if not isinstance(value, str):
                raise RequestError(400, "missing_image", f"field {name!r} (base64 image) is missing")
            try:
                images[name] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(400, "bad_base64", f"field {name!r} is not valid base64") from None
        return params | doc, images

    def _far(self, params: dict):
        from mfr_ray.serve.package import PackageError

        try:
            far = float(params.get("far", self.cfg.far))
            return far, self.package.operating_point(far)
        except (TypeError, ValueError) as err:
            if isinstance(err, PackageError):
                raise RequestError(400, "unknown_far", str(err)) from None
            raise RequestError(400, "bad_far", f"far must be a number, got {params.get('far')!r}") from None

    def _k(self, params: dict) -> int:
        try:
            k = int(params.get("k", self.cfg.top_k))
        except (TypeError, ValueError):
            raise RequestError(400, "bad_k", f"k must be an integer, got {params.get('k')!r}") from None
        if not 1 <= k <= self.cfg.limits.max_k:
            raise RequestError(400, "bad_k", f"k must be between 1 and {self.cfg.limits.max_k}")
        return k

    async def _embed(self, images: list[bytes]) -> list:
        empty = [i for i, data in enumerate(images) if not data]
        results = await asyncio.gather(*[self.embedder.embed.remote(data) for data in images if data])
        it = iter(results)
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
        return await self._answer(self._healthz(request))

    async def _healthz(self, request: Request) -> dict:
        authorised = await self._guard(request, open_route=True)
        out: dict[str, Any] = {"status": "ok"}
        if authorised:
            out |= {"package_id": self.package.package_id, "default_far": self.cfg.far,
                    "fars": [p.far_target for p in self.package.operating_points],
                    "gallery": await self.keeper.stats.remote(), "batching": self.cfg.batching.model_dump()}
        return out

    @http_app.post("/verify")
    async def verify(self, request: Request):
        return await self._answer(self._verify(request))

    async def _faces(self, request: Request, names: tuple[str, ...]):
        """A decision request's common part: auth, the parsed body, the FAR's operating point and the
        embedded images (a 4xx when one has no usable face)."""
        await self._guard(request)
        params, images = await self._payload(request, names)
        far, point = self._far(params)
        embedded = await self._embed([images[name] for name in names])
        self._refuse_images(embedded, names)
        return params, far, point, embedded

    async def _verify(self, request: Request) -> dict:
        from mfr_ray.serve.recognise import verify_decision

        _, far, point, (a, b) = await self._faces(request, ("a", "b"))
        return dataclasses.asdict(verify_decision(self.package, point, far, a, b))

    @http_app.post("/identify")
    async def identify(self, request: Request):
        return await self._answer(self._identify(request))

    async def _identify(self, request: Request) -> dict:
        from mfr_ray.serve.recognise import Candidate, identify_decision

        params, far, point, (probe,) = await self._faces(request, ("image",))
        matches = await self.keeper.search_identities.remote(probe.embedding, self._k(params))
        candidates = [Candidate(**m) for m in matches]  # gallery.Match fields, by name
        return dataclasses.asdict(identify_decision(point, far, probe, candidates))

    @http_app.post("/enrol")
    async def enrol(self, request: Request):
        return await self._answer(self._enrol(request))

    async def _enrol(self, request: Request) -> dict:
        await self._guard(request)
        params, images = await self._payload(request, ("image",))
        identity = str(params.get("identity") or "").strip()
        if not identity or "/" in identity or len(identity) > 200:
            raise RequestError(400, "bad_identity",
                               "identity must be a non-empty name (no '/', at most 200 characters)")
        data = images["image"]
        source_key = f"{identity}/{API_SOURCE_PREFIX}{hashlib.sha256(data).hexdigest()[:16]}"
        (result,) = await self._embed([data])
        row = await self.keeper.enrol.remote(identity, source_key, _wire(result))
        self._refuse_images([result], ("image",))  # the failed row is stored all the same
        return row

    async def _answer(self, work) -> JSONResponse:
        """Every route's answer: its JSON, or a 4xx for a client error."""
        try:
            return JSONResponse(await work)
        except RequestError as err:
            return JSONResponse({"error": err.error, "reason": err.reason}, status_code=err.status,
                                headers=err.headers)


# --------------------------------------------------------------------------------------------- build and run
def build_app(cfg: ServeConfig, key_digest: KeyDigest | None = None):
    """The bound application: Frontend -> (Embedder, GalleryKeeper)."""
    replicas: dict[str, Any] = {"num_replicas": cfg.num_replicas}
    if cfg.autoscaling:
        replicas = {"autoscaling_config": cfg.autoscaling.model_dump()}
    embedder = Embedder.options(
        ray_actor_options={"num_cpus": cfg.embedder_num_cpus},
        max_ongoing_requests=max(16, 2 * cfg.batching.max_batch_size), **replicas,
    ).bind(cfg.package, cfg.batching.model_dump(), cfg.limits.max_pixels, cfg.torch_threads, cfg.runtime)
    keeper = GalleryKeeper.bind(cfg.package, cfg.gallery)
    settings = cfg.model_dump(mode="json", exclude={"ray"})
    return Frontend.options(num_replicas=cfg.frontend_replicas).bind(embedder, keeper, settings, key_digest)


def app_builder(args: dict):
    """Serve's application builder (`import_path: mfr_ray.serve.app:app_builder` in a Serve config or a
    KubeRay RayService): `args` are ServeConfig fields; `host` should be the proxy's http_options host, so a
    cluster-wide bind requires the API key (from $MFR_SERVE_API_KEY_FILE, e.g. a mounted secret)."""
    cfg = ServeConfig.model_validate(args)
    return build_app(cfg, resolve_auth(cfg.host, cfg.api_key_file))


def start(cfg: ServeConfig, route_prefix: str = "/"):
    """Start (or update) the application on this machine's Ray (`init_ray`: local on loopback unless
    configured) with Serve's HTTP proxy on cfg.host:cfg.port; returns the Frontend handle."""
    key_digest = resolve_auth(cfg.host, cfg.api_key_file)
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(build_app(cfg, key_digest), name=APP_NAME, route_prefix=route_prefix)


def run(package: str, gallery: str, host: str = LOOPBACK, port: int = 8000, blocking: bool = True, **options):
    """The `mfr serve` entry: start the application and, when `blocking`, serve until Ctrl-C, then shut Serve
    down. `options` are further ServeConfig fields (batching={...}, num_replicas=2, api_key_file=...)."""
    fields = {"package": package, "gallery": gallery, "host": host, "port": port, **options}
    cfg = ServeConfig.model_validate(fields)
    start(cfg)
    auth = "API key required" if resolve_auth(cfg.host, cfg.api_key_file) else "no auth (loopback only)"
    print(f"mfr serve: http://{cfg.host}:{cfg.port} ({auth}); /verify /identify /enrol /healthz", flush=True)
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
