"""`sdrt serve`: a FastAPI app over the batching service (runtime/service.py), one Service per process.

    app = create_app(ServeConfig(engine_dir="sd15-fp16"))       # engines load on a background thread
    serve(ServeConfig(...), host="127.0.0.1", port=7860)         # uvicorn, graceful SIGTERM, exit 0

Routes (request and response shapes: serve/http_api.py):
    POST /v1/images/generations        OpenAI Images (+ SD fields); Accept: image/png (n = 1) → the raw image
    POST /sdapi/v1/txt2img, /img2img   AUTOMATIC1111's shapes; GET /sdapi/v1/samplers, /schedulers, /sd-models
    GET  /v1/models                    what the engine directory can do
    GET  /healthz (alive), /readyz (engines loaded and warmed), /metrics (Prometheus), /docs (OpenAPI)

Errors are `{"error": {"type", "field", "message"}}`: 422 invalid input (the field named as the route's clients
spell it), 413 body over the limit (from Content-Length and while reading), 401 without the API key when one is
set, 404 unknown route, 429 + Retry-After when the queue is full, 504 past the per-request deadline, 503 while
loading or shutting down, 500 only when an engine fails. A client that disconnects cancels its request: the
handler polls `request.is_disconnected()` while it awaits the service's future and sets the request's CancelToken.

Thin like cli/: no sampling logic here; the service validates (runtime/validate.py) and generates.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdrt.runtime import image_io
from sdrt.runtime.lora import adapters as lora
from sdrt.runtime.samplers import registry as sampler_registry
from sdrt.runtime.errors import UserError
from sdrt.runtime.limits import Limits
from sdrt.runtime.loader import open_dir
from sdrt.runtime.samplers.schedules import SIGMA_SCHEDULES
from sdrt.runtime.service import (BatchReport, Cancelled, CancelToken, DeadlineExceeded, QueueFull, Service,
    ServiceClosed)
from sdrt.runtime.fields import InvalidRequest

from sdrt.serve import http_api
from sdrt.serve.http_api import HttpError, ModelContext, Plan, error_body
from sdrt.serve.metrics import Metrics

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
GENERATE_PATHS = frozenset({"/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"})
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class ServeConfig:
    engine_dir: Path
    max_batch: int = 4  # images per engine batch (the service also caps it at limits.max_batch)
    max_wait_ms: float = 10.0  # how long the first queued request waits for batch-mates
    queue_size: int = 64  # queued requests; more get 429
    timeout_s: float | None = 300.0  # per-request deadline (queue wait + generation); 504 past it
    api_key: str | None = None  # when set, every route but health and docs needs `Authorization: Bearer KEY`
    max_body_bytes: int = 32 * 2 ** 20
    max_prompt_chars: int = 10_000
    backend: str = "auto"
    limits: Limits = field(default_factory=Limits)
    warmup: bool = True
    model_name: str | None = None  # default: the engine directory's name
    lora_dir: Path | None = None  # LoRAs requests may name (`loras`, `<lora:NAME:SCALE>`), by file stem only
    embeddings_dir: Path | None = None  # textual inversions every prompt may use (its files' stems are the triggers)
    poll_s: float = 0.1  # how often a waiting request checks whether its client went away

    def __post_init__(self):
        if self.max_body_bytes < 1 or self.max_prompt_chars < 1 or self.poll_s <= 0:
            raise UserError("max_body_bytes and max_prompt_chars must be at least 1 and poll_s above 0")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise UserError(f"the request timeout must be above 0 seconds (got {self.timeout_s})")


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
            has_tiny_vae=(self.dir.path / "vae_decoder_tiny" / "model.onnx").is_file())
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
            pipeline_or_dir = _inject_unet_fault(pipeline_or_dir, self._fault)
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
                                      embeddings_dir=c.embeddings_dir))
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
        if self.draining:
            raise HttpError(503, "shutting_down", "the server is shutting down and takes no new requests",
                            headers={"Retry-After": "10"})
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


# ---- the test-only fault -------------------------------------------------------------------------------------

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


def _inject_unet_fault(pipeline_or_dir, marker: str):
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


# ---- the edge: auth, draining, metrics ---------------------------------------------------------------------------

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
                await _send_error(send_status, refusal)
            else:
                await self.app(scope, receive, send_status)
        finally:
            metrics.inflight.dec()
            metrics.requests.labels(route, method if method in METHODS else "other", str(status)).inc()
            metrics.duration.labels(route).observe(time.perf_counter() - started)

    def _refusal(self, scope, path: str) -> HttpError | None:
        key = self.state.config.api_key
        if key and path not in OPEN_PATHS:
            given = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization":
                    given = value
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode()):
                return HttpError(401, "unauthorized", "send the API key as `Authorization: Bearer KEY`",
                                 headers={"WWW-Authenticate": "Bearer"})
        if self.state.draining and path in GENERATE_PATHS:
            return HttpError(503, "shutting_down", "the server is shutting down and takes no new requests",
                             headers={"Retry-After": "10"})
        return None


async def _send_error(send, error: HttpError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(error: HttpError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes: from Content-Length first, then while reading."""
    too_large = f"the request body is over the limit of {limit:,} bytes"
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise HttpError(413, "too_large", f"{too_large} (Content-Length {int(length):,})", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, "too_large", too_large, "body")
        chunks.append(chunk)
    return b"".join(chunks)


# ---- the app ---------------------------------------------------------------------------------------------------

_OPENAI_SCHEMA = {"type": "object", "required": ["prompt"], "properties": {
    "prompt": {"type": "string"}, "n": {"type": "integer", "default": 1},
    "size": {"type": "string", "example": "512x512", "description": "WIDTHxHEIGHT or auto (the model's default)"},
    "response_format": {"type": "string", "enum": ["b64_json"]},
    "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"], "default": "png"},
    "output_compression": {"type": "integer", "minimum": 0, "maximum": 100},
    "model": {"type": "string"}, "user": {"type": "string"}, "stream": {"type": "boolean", "default": False},
    "partial_images": {"type": "integer", "minimum": 0, "maximum": 3, "description": "with stream: progress images "
                       "decoded by the tiny VAE"},
    "negative_prompt": {"type": "string"}, "steps": {"type": "integer", "default": 30},
    "num_inference_steps": {"type": "integer", "description": "same as steps"},
    "guidance_scale": {"type": "number", "default": 7.5}, "guidance_rescale": {"type": "number", "default": 0},
    "seed": {"type": "integer", "description": "image i uses seed + i; absent or -1: random (returned)"},
    "sampler": {"type": "string", "example": "DPM++ 2M Karras"},
    "schedule": {"type": "string", "enum": list(SIGMA_SCHEDULES)}}}


def _a1111_schema(img2img: bool) -> dict:
    props = {"prompt": {"type": "string"}, "negative_prompt": {"type": "string"},
             "seed": {"type": "integer", "default": -1}, "sampler_name": {"type": "string", "default": "Euler"},
             "sampler_index": {"type": "string"}, "scheduler": {"type": "string", "default": "Automatic"},
             "batch_size": {"type": "integer", "default": 1}, "n_iter": {"type": "integer", "default": 1},
             "steps": {"type": "integer", "default": 50}, "cfg_scale": {"type": "number", "default": 7.0},
             "width": {"type": "integer"}, "height": {"type": "integer"},
             "send_images": {"type": "boolean", "default": True}}
    if img2img:
        props |= {"init_images": {"type": "array", "items": {"type": "string"}, "maxItems": 1, "minItems": 1},
                  "denoising_strength": {"type": "number", "default": 0.75}, "mask": {"type": "string"},
                  "inpainting_mask_invert": {"type": "integer", "enum": [0, 1]},
                  "include_init_images": {"type": "boolean"},
                  "outpaint": {"type": "object", "description": "sdrt extension: extend the canvas by these margins "
                               "(pixels, multiples of 8) and inpaint the new area; inpainting_fill 0/1/2 picks the "
                               "fill (blur/edge/noise), mask_blur the soft border",
                               "properties": {k: {"type": "integer", "default": 0}
                                              for k in ("left", "right", "top", "bottom")}}}
    return {"type": "object", "properties": props, "additionalProperties": True}


def _neutral_doc(img2img: bool) -> str:
    rows = "\n".join(f"- `{k}`: {n.accepts}" for k, n in http_api.a1111_neutral("MODEL", img2img).items())
    return ("AUTOMATIC1111's request and response shapes. Fields sent with neutral defaults are accepted only with "
            "values whose behaviour sdrt already has; other values are refused with 422 naming the field:\n\n" + rows)


def _retrieve(future: asyncio.Future) -> None:
    """Mark a gather we gave up on as seen (asyncio logs unretrieved exceptions)."""
    if not future.cancelled():
        future.exception()


def _check_steps(service: Service, job) -> None:
    """img2img: a strength that leaves no denoising step is the request's fault (422), found before queueing."""
    try:
        steps = service.pipeline.steps_to_run(job)
        message = f"{job.steps} steps at this strength leave no denoising step; raise the steps or the strength"
    except UserError as e:
        steps, message = 0, " ".join(str(e).split())
    if steps < 1:
        raise InvalidRequest("strength" if job.strength is not None else "steps", message)


def create_app(config: ServeConfig, pipeline=None, *, test_fault_prompt: str | None = None) -> FastAPI:
    """The ASGI app. With `pipeline` (a loaded Pipeline) the service starts at once; else the engines load on a
    background thread (/readyz says when). `test_fault_prompt` is for tests only: the UNet then raises for batches
    holding that text in a prompt."""
    state = ServerState(config, pipeline, test_fault_prompt)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(state.close, (config.timeout_s or 600) + 30)

    app = FastAPI(title="sdrt", summary="Stable Diffusion over ONNX Runtime / TensorRT engines",
                  description=f"Serving `{state.model_name}` ({state.dir.info.family.value}). Errors: "
                              '`{"error": {"type", "field", "message"}}`.', lifespan=lifespan)
    app.state.sdrt = state

    @app.exception_handler(HttpError)
    async def on_http_error(request: Request, e: HttpError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        message = (f"no route {request.method} {request.url.path}; GET /docs lists the routes"
                   if e.status_code == 404 else str(e.detail))
        return JSONResponse(error_body(kind, message), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, e: Exception):
        return JSONResponse(error_body("internal", f"internal error: {type(e).__name__}"), status_code=500)

    # ---- generation -----------------------------------------------------------------------------------------
    def validated(service: Service, plan: Plan) -> list:
        """The plan's Requests as Jobs (InvalidRequest → 422 named as the route names the field)."""
        jobs = []
        for r in plan.requests:
            try:
                job = service.validate(r)
                _check_steps(service, job)
            except InvalidRequest as e:
                state.metrics.outcome("invalid")
                raise plan.invalid(e) from None
            except UserError as e:
                state.metrics.outcome("invalid")
                raise http_api.invalid(None, str(e)) from None
            jobs.append(job)
        return jobs

    def submitted(service: Service, jobs: list, token: CancelToken, **preview) -> list:
        """The jobs queued (429 when the queue is full, 503 while closing)."""
        try:
            return [service.submit(job, timeout=config.timeout_s, cancel=token, **preview) for job in jobs]
        except QueueFull as e:
            token.cancel()
            state.metrics.outcome("queue_full")
            raise HttpError(429, "queue_full", str(e), headers={"Retry-After": str(state.retry_after())}) from None
        except ServiceClosed as e:
            token.cancel()
            state.metrics.outcome("closed")
            raise HttpError(503, "shutting_down", str(e), headers={"Retry-After": "10"}) from None

    def failure(e: BaseException, plan: Plan) -> HttpError:
        """What a request that failed after it was queued answers, its outcome counted."""
        metrics = state.metrics
        if isinstance(e, HttpError):
            return e
        if isinstance(e, DeadlineExceeded):
            metrics.outcome("deadline")
            return HttpError(504, "timeout", f"the request did not finish within {config.timeout_s:g} s "
                                             "(the server's per-request timeout)")
        if isinstance(e, Cancelled):
            metrics.outcome("cancelled")
            return HttpError(499, "client_closed", str(e))
        if isinstance(e, ServiceClosed):
            metrics.outcome("closed")
            return HttpError(503, "shutting_down", str(e), headers={"Retry-After": "10"})
        if isinstance(e, InvalidRequest):
            metrics.outcome("invalid")
            return plan.invalid(e)
        if isinstance(e, UserError):
            metrics.outcome("invalid")
            return http_api.invalid(None, str(e))
        metrics.outcome("error")  # an engine failed: this request fails, the server goes on
        return HttpError(500, "engine_error", f"generation failed: {type(e).__name__}: {e}")

    async def generate(request: Request, plan: Plan) -> list:
        service = state.require_service()
        metrics = state.metrics
        jobs = await asyncio.to_thread(validated, service, plan)  # image decoding and schedules: off the loop
        token = CancelToken()
        futures = submitted(service, jobs, token)
        loop = asyncio.get_running_loop()
        waiter = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        give_up = None if config.timeout_s is None else loop.time() + config.timeout_s + 1.0
        finished = False
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=config.poll_s)
                if done:
                    results = waiter.result()
                    finished = True
                    break
                if await request.is_disconnected():
                    metrics.outcome("cancelled")
                    raise HttpError(499, "client_closed", "the client went away; its request was cancelled")
                if give_up is not None and loop.time() > give_up:
                    raise DeadlineExceeded("the request's deadline passed before it finished")
        except Exception as e:  # noqa: BLE001 — mapped to its answer (an engine failure: 500, the server goes on)
            raise failure(e, plan) from None
        finally:
            if not finished:
                token.cancel()
                waiter.cancel()
                waiter.add_done_callback(_retrieve)
        metrics.outcome("ok")
        for r in results:
            metrics.on_result(r)
        return results

    async def plan_of(request: Request, make: Callable[[dict], Plan]) -> Plan:
        """Read the body, then parse it and build the plan on a thread (a 32 MB body must not stall the loop)."""
        body = await read_body(request, config.max_body_bytes)
        return await asyncio.to_thread(lambda: make(http_api.parse_json(body)))

    async def stream(request: Request, plan: Plan) -> StreamingResponse:
        """OpenAI image streaming: `partial_images` progress images (tiny VAE, runtime/service.preview_steps), then
        the finished image, as server-sent events. Errors before the first byte are ordinary answers; after it, an
        `error` event. A client that goes away cancels the request, as in `generate`."""
        service = state.require_service()
        jobs = await asyncio.to_thread(validated, service, plan)
        loop = asyncio.get_running_loop()
        previews: asyncio.Queue = asyncio.Queue()
        token = CancelToken()
        future, = submitted(service, jobs, token, previews=plan.partial_images,
                            on_preview=lambda done, total, images: loop.call_soon_threadsafe(previews.put_nowait,
                                                                                            images[0]))
        size = (jobs[0].width, jobs[0].height)

        async def events():
            waiter = asyncio.wrap_future(future)
            give_up = None if config.timeout_s is None else loop.time() + config.timeout_s + 1.0
            index, finished = 0, False
            try:
                while True:
                    while not previews.empty():  # in step order, before the result they precede
                        data = await asyncio.to_thread(image_io.image_bytes, previews.get_nowait(), None,
                                                       plan.output_format, plan.quality)
                        yield http_api.stream_event("partial_image", plan, data, size, index)
                        index += 1
                    if waiter.done():
                        break
                    await asyncio.wait({waiter}, timeout=config.poll_s)
                    if not waiter.done() and await request.is_disconnected():
                        state.metrics.outcome("cancelled")
                        return
                    if give_up is not None and loop.time() > give_up:
                        raise DeadlineExceeded("the request's deadline passed before it finished")
                result = waiter.result()
                encoded = await asyncio.to_thread(http_api.encode_results, plan, [result], state.model_name)
                finished = True
                state.metrics.outcome("ok")
                state.metrics.on_result(result)
                yield http_api.stream_event("completed", plan, encoded[0][0], size,
                                            extra={"seed": result.seeds[0], "partial_images_sent": index})
            except Exception as e:  # noqa: BLE001 — the status line is gone: an error event instead
                yield http_api.stream_error(failure(e, plan))
            finally:
                if not finished:
                    token.cancel()
                    waiter.cancel()
                    waiter.add_done_callback(_retrieve)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Seed": str(jobs[0].seeds[0])})

    @app.post("/v1/images/generations", tags=["OpenAI"], summary="Generate images (OpenAI Images API + SD fields)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": _OPENAI_SCHEMA}}}},
              responses={200: {"content": {"application/json": {}, "image/png": {}, "image/jpeg": {},
                                           "image/webp": {}}}})
    async def images_generations(request: Request):
        accept = request.headers.get("accept")
        plan = await plan_of(request, lambda body: http_api.openai_plan(body, state.ctx, accept))
        if plan.stream:
            return await stream(request, plan)
        results = await generate(request, plan)
        encoded = await asyncio.to_thread(http_api.encode_results, plan, results, state.model_name)
        if plan.raw:
            r = results[0]
            return Response(encoded[0][0], media_type=f"image/{plan.output_format}",
                            headers={"X-Seed": str(r.seeds[0]), "X-Batch-Size": str(r.batch_size)})
        return JSONResponse(http_api.openai_response(plan, results, encoded))

    async def a1111(request: Request, img2img: bool):
        plan = await plan_of(request, lambda body: http_api.a1111_plan(body, state.ctx, img2img))
        results = await generate(request, plan)
        encoded = await asyncio.to_thread(http_api.encode_results, plan, results, state.model_name)
        return JSONResponse(http_api.a1111_response(plan, results, encoded, state.model_name))

    @app.post("/sdapi/v1/txt2img", tags=["AUTOMATIC1111"], summary="txt2img (AUTOMATIC1111)",
              description=_neutral_doc(False),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": _a1111_schema(False)}}}})
    async def txt2img(request: Request):
        return await a1111(request, img2img=False)

    @app.post("/sdapi/v1/img2img", tags=["AUTOMATIC1111"], summary="img2img and inpainting (AUTOMATIC1111)",
              description=_neutral_doc(True),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": _a1111_schema(True)}}}})
    async def img2img(request: Request):
        return await a1111(request, img2img=True)

    # ---- what the server can do -----------------------------------------------------------------------------
    @app.get("/sdapi/v1/samplers", tags=["AUTOMATIC1111"])
    async def samplers():
        return http_api.a1111_samplers()

    @app.get("/sdapi/v1/schedulers", tags=["AUTOMATIC1111"])
    async def schedulers():
        return http_api.a1111_schedulers()

    @app.get("/sdapi/v1/sd-models", tags=["AUTOMATIC1111"])
    async def sd_models():
        source = (state.dir.manifest or {}).get("source") or {}
        sha = source.get("sha256") if isinstance(source, dict) else None
        short = sha[:10] if isinstance(sha, str) else None
        return [{"title": f"{state.model_name} [{short}]" if short else state.model_name,
                 "model_name": state.model_name, "hash": short, "sha256": sha,
                 "filename": str(Path(config.engine_dir).resolve()), "config": None}]

    @app.get("/sdapi/v1/loras", tags=["AUTOMATIC1111"], summary="The LoRAs requests may name")
    async def loras():
        folder = config.lora_dir
        return [{"name": name, "alias": name, "path": str(path.relative_to(Path(folder).absolute())), "metadata": {}}
                for name, path in sorted(lora.available(folder.absolute() if folder else None).items())]

    @app.post("/sdapi/v1/refresh-loras", tags=["AUTOMATIC1111"], summary="Re-read the LoRA folder (always current)")
    async def refresh_loras():
        return None

    @app.get("/sdapi/v1/embeddings", tags=["AUTOMATIC1111"], summary="The textual inversions prompts may use")
    async def embeddings():
        from sdrt.runtime.prompts import embeddings as ti

        if config.embeddings_dir is None:
            return {"loaded": {}, "skipped": {}}
        loaded = ti.resolve((), config.embeddings_dir, ti.slots_for(state.dir))
        return {"loaded": {e.name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                    "shape": int(e.vectors[0].shape[-1]), "vectors": int(e.vectors[0].shape[0])}
                           for e in loaded}, "skipped": {}}

    @app.get("/v1/models", tags=["OpenAI"], summary="The served model and what it can do")
    async def models():
        d, limits = state.dir, config.limits
        manifest = d.manifest or {}
        service = state.service
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "owned_by": "sdrt",
            "created": int((Path(config.engine_dir) / "model_index.json").stat().st_mtime),
            "family": d.info.family.value, "inpaint": d.info.inpaint, "prediction_type": d.info.prediction_type,
            "precision": manifest.get("precision"), "default_size": d.default_size,
            "size_multiple": state.ctx.size_multiple,
            "img2img": (Path(config.engine_dir) / "vae_encoder" / "model.onnx").exists(),
            "default_sampler": sampler_registry.default_for(d.scheduler_config),
            "samplers": list(sampler_registry.REGISTRY),
            "a1111_samplers": [s["name"] for s in http_api.a1111_samplers()],
            "schedules": list(SIGMA_SCHEDULES),
            "limits": {"max_pixels": limits.max_pixels, "max_images_per_request": limits.max_batch,
                       "max_steps": limits.max_steps, "max_prompt_chars": config.max_prompt_chars,
                       "max_body_bytes": config.max_body_bytes, "timeout_s": config.timeout_s,
                       "max_n_iter": state.ctx.max_iterations},
            "batching": {"max_batch": service.max_batch if service else min(config.max_batch, limits.max_batch),
                         "max_wait_ms": config.max_wait_ms, "queue_size": config.queue_size},
            "ready": state.ready,
        }]}

    # ---- operations ---------------------------------------------------------------------------------------------
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

    routes = frozenset(getattr(r, "path", "") for r in app.routes)
    app.add_middleware(_Edge, state=state, routes=routes)
    return app


# ---- running it ------------------------------------------------------------------------------------------------

def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info",
          announce: Callable[[str], None] = print) -> int:
    """Bind, announce the URL, run uvicorn until SIGTERM/SIGINT (graceful: in-flight requests finish, the queue
    drains), and return the exit status: 0, or 2 when the engines failed to load."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    app = create_app(config)
    state: ServerState = app.state.sdrt
    uv = uvicorn.Config(app, log_level=log_level, lifespan="on",
                        timeout_graceful_shutdown=None if config.timeout_s is None else config.timeout_s + 30)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.begin_drain()  # /readyz and new generation requests answer 503 from now on
            super().handle_exit(sig, frame)

    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: listening on {host} without an API key (--api-key-env): anyone who can reach this port "
              "can generate", file=sys.stderr, flush=True)
    server = Server(uv)
    state.on_load_failed = lambda: setattr(server, "should_exit", True)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
    announce(f"sdrt serve: {state.model_name} on http://{shown}:{bound_port} "
             f"(docs: http://{shown}:{bound_port}/docs)")
    # uvicorn re-raises the signal that stopped it once it is done; these no-op handlers make that a clean exit 0
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    return 0 if state.load_error is None else 2
