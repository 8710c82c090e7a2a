"""The edge of `sdrt serve`: its configuration, the state all routes share (the service, its metrics, the serving
flags), what sits in front of every route (API key, refusals while draining, per-route metrics, the error shape for
whatever a route raises) and the operations routes.

    state = ServerState(config)    # engines load on a background thread; /readyz says when they are ready
    edge.add_routes(app, state)    # the operations routes
    edge.install(app, state)       # error handlers and the middleware, once every route is added

401 without the API key when one is set (health and docs stay open), 503 + Retry-After for generation requests
while shutting down; /healthz (alive), /readyz (engines loaded and warmed), /metrics (Prometheus).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdrt.runtime.errors import UserError
from sdrt.runtime.limits import Limits
from sdrt.runtime.loader import open_dir
from sdrt.runtime.service import BatchReport, Service
from sdrt.serve.errors import HttpError, rendered
from sdrt.serve.fields import ModelContext
from sdrt.serve.metrics import Metrics

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/"})
OPEN_PREFIXES = ("/playground/", "/static-offline-docs/")  # the page's and the docs' own files (no data in them)
GENERATE_PATHS = frozenset({"/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/sdapi/v1/txt2img",
                            "/sdapi/v1/img2img"})
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


# ---- the configuration and the shared state ------------------------------------------------------------------

@dataclass(frozen=True)
class ServeConfig:
    engine_dir: Path
    max_batch: int = 4  # images per engine batch (the service also caps it at limits.max_batch)
    max_wait_ms: float = 10.0  # how long the first queued request waits for batch-mates
    queue_size: int = 64  # queued requests; more get 429
    timeout_s: float | None = 300.0  # per-request deadline (queue wait + generation); 504 past it
    api_key: str | None = None  # when set, every route but health and docs needs `Authorization: Bearer KEY`
    # AUTOMATIC1111's --api-auth: ((user, password), …) for HTTP Basic; with a key too, either one lets a request in
    api_auth: tuple[tuple[str, str], ...] = ()
    max_body_bytes: int = 32 * 2 ** 20
    max_prompt_chars: int = 10_000
    backend: str = "auto"
    limits: Limits = field(default_factory=Limits)
    warmup: bool = True
    model_name: str | None = None  # default: the engine directory's name
    lora_dir: Path | None = None  # LoRAs requests may name (`loras`, `<lora:NAME:SCALE>`), by file stem only
    embeddings_dir: Path | None = None  # textual inversions every prompt may use (its files' stems are the triggers)
    face_models: Path | None = None  # insightface's ONNX models: faces read from photos (never a request's path)
    poll_s: float = 0.1  # how often a waiting request checks whether its client went away

    def __post_init__(self):
        if self.max_body_bytes < 1 or self.max_prompt_chars < 1 or self.poll_s <= 0:
            raise UserError("max_body_bytes and max_prompt_chars must be at least 1 and poll_s above 0")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise UserError(f"the request timeout must be above 0 seconds (got {self.timeout_s})")


def parse_api_auth(text: str) -> tuple[tuple[str, str], ...]:
    """AUTOMATIC1111's `--api-auth` value, "user:password[,user2:password2]" → ((user, password), …)."""
    pairs = []
    for item in text.split(","):
        user, colon, password = item.strip().partition(":")
        if not colon or not user or not password:
            raise UserError(f"api auth entries are user:password, separated by commas (got {item.strip()!r})")
        pairs.append((user, password))
    return tuple(pairs)


def _authorized(header: bytes, config: ServeConfig) -> bool:
    """`Authorization: Bearer KEY` with the API key, or `Basic base64(user:password)` with one of the api_auth pairs;
    compared in constant time."""
    scheme, _, token = header.partition(b" ")
    token = token.strip()
    if scheme.lower() == b"bearer" and config.api_key:
        return hmac.compare_digest(token, config.api_key.encode())
    if scheme.lower() == b"basic" and config.api_auth:
        try:
            given = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            return False
        return any(hmac.compare_digest(given, f"{user}:{password}".encode()) for user, password in config.api_auth)
    return False


class ServerState:
    """The service, its metrics and the serving flags of one app."""

    def __init__(self, config: ServeConfig, pipeline=None, test_fault_prompt: str | None = None):
        self.config = config
        self.metrics = Metrics()
        self.dir = open_dir(config.engine_dir)  # fails now for a folder that is no engine directory
        self.model_name = config.model_name or Path(config.engine_dir).resolve().name
        self.ctx = ModelContext(
            name=self.model_name, default_size=self.dir.default_size,
            size_multiple=self.dir.vae_scale_factor * self.dir.latent_multiple,
            max_prompt_chars=config.max_prompt_chars, max_iterations=min(config.limits.max_batch, config.queue_size),
            max_image_pixels=config.limits.max_pixels, lora_dir=config.lora_dir,
            has_tiny_vae=self.dir.has("vae_decoder_tiny"))
        self.service: Service | None = None
        self.load_error: str | None = None
        self.draining = False
        self.on_load_failed: Callable[[], None] | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._batch_seconds: deque[float] = deque(maxlen=32)
        self._fault = test_fault_prompt
        self.metrics.bind(lambda: self.service.queue_depth if self.service is not None else 0, lambda: self.ready)
        self._loader: threading.Thread | None = None
        if pipeline is not None:
            self._start(pipeline)
        else:
            self._loader = threading.Thread(target=self._load, name="sdrt-serve-loader", daemon=True)
            self._loader.start()

    def _start(self, pipeline_or_dir) -> None:
        if self._fault is not None:
            pipeline_or_dir = inject_unet_fault(pipeline_or_dir, self._fault)
        c = self.config
        service = Service(pipeline_or_dir, limits=c.limits, max_batch=c.max_batch, max_wait_ms=c.max_wait_ms,
                          queue_size=c.queue_size, backend=c.backend, warmup=c.warmup, on_batch=self._on_batch)
        with self._lock:
            closed = self._closed
            if not closed:
                self.service = service
        if closed:
            service.close(drain=False)

    def _load(self) -> None:
        try:
            from sdrt.runtime.pipeline import Pipeline

            c = self.config
            self._start(Pipeline.load(c.engine_dir, backend=c.backend, limits=c.limits, lora_dir=c.lora_dir,
                                      embeddings_dir=c.embeddings_dir, face_models=c.face_models))
        except Exception as e:  # noqa: BLE001 — reported by /readyz and on stderr; the server then exits
            self.load_error = f"{type(e).__name__}: {e}"
            print(f"error: loading {self.config.engine_dir} failed: {' '.join(str(e).split())}", file=sys.stderr,
                  flush=True)
            if self.on_load_failed is not None:
                self.on_load_failed()

    def _on_batch(self, report: BatchReport) -> None:
        self.metrics.on_batch(report)
        if not report.failed:
            self._batch_seconds.append(report.encode + report.steps + report.decode)

    @property
    def ready(self) -> bool:
        return self.service is not None and self.service.ready and not self.draining

    def require_service(self) -> Service:
        # No draining check here: the edge refuses generation requests that arrive after the drain began
        # (_Edge._refusal), and one admitted before it is in flight and is served (a check here raced SIGTERM:
        # a request still parsing its body when the drain began answered 503). A closed service answers 503 itself.
        if self.service is None:
            if self.load_error is not None:
                raise HttpError(503, "load_failed", f"the engines failed to load: {self.load_error}")
            raise HttpError(503, "loading", "the engines are still loading; GET /readyz says when they are ready",
                            headers={"Retry-After": "5"})
        return self.service

    def retry_after(self) -> int:
        """Seconds until the queue has room, estimated from recent batch times."""
        service = self.service
        per_batch = statistics.median(self._batch_seconds) if self._batch_seconds else 1.0
        depth = service.queue_depth if service is not None else 0
        batches = depth / max(1, service.max_batch if service is not None else 1) + 1
        return max(1, min(120, math.ceil(batches * per_batch)))

    def begin_drain(self) -> None:
        self.draining = True

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish the queued ones, stop the worker."""
        self.draining = True
        with self._lock:
            self._closed = True
            service = self.service
        if service is not None:
            service.close(drain=True, timeout=timeout)


# ---- the edge: auth, draining, metrics, the error shape ------------------------------------------------------

class _Edge:
    """Pure ASGI middleware (keeps `receive` untouched, so disconnects reach the handlers)."""

    def __init__(self, app, state: ServerState, routes: frozenset[str]):
        self.app, self.state, self.routes = app, state, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        route = path if path in self.routes else "unmatched"
        metrics = self.state.metrics
        status = 500
        started = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.inflight.inc()
        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await _send_error(send_status, refusal, path)
            else:
                await self.app(scope, receive, send_status)
        finally:
            metrics.inflight.dec()
            metrics.requests.labels(route, method if method in METHODS else "other", str(status)).inc()
            metrics.duration.labels(route).observe(time.perf_counter() - started)

    def _refusal(self, scope, path: str) -> HttpError | None:
        config = self.state.config
        if (config.api_key or config.api_auth) and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            given = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization":
                    given = value
            if not _authorized(given, config):
                ways = ([] if not config.api_key else ["the API key as `Authorization: Bearer KEY`"]) + \
                       ([] if not config.api_auth else ["a user and password with HTTP Basic"])
                schemes = ", ".join((["Bearer"] if config.api_key else []) + (['Basic realm="sdrt"'] if config.api_auth
                                                                               else []))
                return HttpError(401, "unauthorized", "send " + " or ".join(ways),
                                 headers={"WWW-Authenticate": schemes})
        if self.state.draining and path in GENERATE_PATHS:
            return HttpError(503, "shutting_down", "the server is shutting down and takes no new requests",
                             headers={"Retry-After": "10"})
        return None


async def _send_error(send, error: HttpError, path: str) -> None:
    status, content = rendered(error, path)  # OpenAI's error object under /v1/ (serve/errors.py)
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(error: HttpError, path: str = "") -> JSONResponse:
    status, body = rendered(error, path)
    return JSONResponse(body, status_code=status, headers=error.headers)


def install(app: FastAPI, state: ServerState) -> None:
    """Put the edge in front of `app`: the one error shape for HttpError, Starlette's 404/405 and any crash, and the
    middleware. Call it once the routes are added: metrics label requests by the routes `app` has then (any other
    path is "unmatched")."""

    @app.exception_handler(HttpError)
    async def on_http_error(request: Request, e: HttpError):
        return _error_response(e, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        message = (f"no route {request.method} {request.url.path}; GET /docs lists the routes"
                   if e.status_code == 404 else str(e.detail))
        return _error_response(HttpError(e.status_code, kind, message, headers=getattr(e, "headers", None)),
                               request.url.path)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, e: Exception):
        return _error_response(HttpError(500, "internal", f"internal error: {type(e).__name__}"), request.url.path)

    routes = frozenset(getattr(r, "path", "") for r in app.routes)
    app.add_middleware(_Edge, state=state, routes=routes)


# ---- operations ----------------------------------------------------------------------------------------------

def add_routes(app: FastAPI, state: ServerState) -> None:
    """/healthz (alive), /readyz (engines loaded and warmed), /metrics (Prometheus)."""

    @app.get("/healthz", tags=["operations"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz():
        if state.ready:
            return {"status": "ready", "model": state.model_name}
        if state.draining:
            error = HttpError(503, "shutting_down", "the server is shutting down")
        elif state.load_error is not None:
            error = HttpError(503, "load_failed", f"the engines failed to load: {state.load_error}")
        else:
            error = HttpError(503, "loading", "loading and warming the engines")
        return _error_response(error)

    @app.get("/metrics", tags=["operations"])
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)


# ---- test hook: the fault create_app(test_fault_prompt=…) injects --------------------------------------------

class _FaultyUnet:
    """TEST ONLY: the UNet engine, raising while armed (as an engine does on a driver or shape error)."""

    def __init__(self, engine):
        self.engine, self.armed = engine, False
        self.inputs, self.outputs = engine.inputs, engine.outputs
        self.device = getattr(engine, "device", "cpu")

    def __call__(self, feed):
        if self.armed:
            raise RuntimeError("UNet engine failure (injected by the test-only fault option)")
        return self.engine(feed)


def inject_unet_fault(pipeline_or_dir, marker: str):
    """TEST ONLY (create_app(test_fault_prompt=…)): a pipeline whose UNet raises for batches holding `marker` in a
    prompt. The original pipeline is left untouched."""
    from sdrt.runtime.pipeline import Pipeline

    base = Pipeline.load(pipeline_or_dir) if isinstance(pipeline_or_dir, (str, Path)) else pipeline_or_dir
    unet = _FaultyUnet(base.engines["unet"])

    class FaultyPipeline(Pipeline):
        def prepare(self, job):
            unet.armed = any(marker in p for p in job.prompt)
            return super().prepare(job)

    return FaultyPipeline(base.dir, {**base.engines, "unet": unet}, base.tokenizers, base.limits)
