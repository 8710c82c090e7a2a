"""`sdrt serve`: a FastAPI app over the batching service (runtime/service.py), one Service per process.

    from sdrt.serve.app import create_app, serve
    from sdrt.serve.edge import ServeConfig

    app = create_app(ServeConfig(engine_dir="sd15-fp16"))       # engines load on a background thread
    serve(ServeConfig(...), host="127.0.0.1", port=7860)         # uvicorn, graceful SIGTERM, exit 0

Routes (request and response shapes: serve/openai.py, serve/a1111.py):
    POST /v1/images/generations        OpenAI Images (+ SD fields); Accept: image/png (n = 1) → the raw image
    POST /v1/images/edits, /variations OpenAI's multipart edits (img2img, inpainting) and unCLIP variations
    POST /sdapi/v1/txt2img, /img2img   AUTOMATIC1111's shapes; GET /sdapi/v1/samplers, /schedulers, /sd-models
    GET  /v1/models                    what the engine directory can do
    GET  /healthz (alive), /readyz (engines loaded and warmed), /metrics (Prometheus), /docs and /redoc (OpenAPI,
         their files served from the package), / (the playground page, serve/playground.py, for browsers)

Errors are `{"error": {"type", "field", "message"}}` (under /v1/ OpenAI's `{"message", "type", "param", "code"}`,
400 for 422: serve/errors.py): 422 invalid input (the field named as the route's clients
spell it), 413 body over the limit (from Content-Length and while reading), 401 without the API key when one is
set, 404 unknown route, 429 + Retry-After when the queue is full, 504 past the per-request deadline, 503 while
loading or shutting down, 500 only when an engine fails. A client that disconnects cancels its request: the
handler polls `request.is_disconnected()` while it awaits the service's future and sets the request's CancelToken.

The modules, each importing only those listed after it: openai.py (OpenAI Images; its /v1/models lists a1111's
sampler names) and a1111.py (AUTOMATIC1111), each its body → a Plan, its answers and its routes; jobs.py (read,
validate, submit, await, cancel: what both dialects do with a request); edge.py (ServeConfig, the shared state,
API key, draining, metrics middleware, error handlers, operations routes); fields.py (the body fields both
dialects parse, the Plan); errors.py (the error body, failure → status).

Thin like cli/: no sampling logic here; the service validates (runtime/validate.py) and generates.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from sdrt.runtime.errors import UserError
from sdrt.serve import a1111, edge, openai, playground
from sdrt.serve.edge import ServeConfig, ServerState


def create_app(config: ServeConfig, pipeline=None, *, test_fault_prompt: str | None = None) -> FastAPI:
    """The ASGI app. With `pipeline` (a loaded Pipeline) the service starts at once; else the engines load on a
    background thread (/readyz says when). `test_fault_prompt` is for tests only (serve/edge.py inject_unet_fault):
    the UNet then raises for batches holding that text in a prompt."""
    state = ServerState(config, pipeline, test_fault_prompt)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(state.close, (config.timeout_s or 600) + 30)

    # /docs and /redoc with Swagger UI's and ReDoc's files from the fastapi-offline package: no CDN, so the
    # documentation works on hosts without internet (FastAPI's own pages load their scripts from a CDN)
    app = FastAPIOffline(title="sdrt", summary="Stable Diffusion over ONNX Runtime / TensorRT engines",
                  description=f"Serving `{state.model_name}` ({state.dir.info.family.value}). Errors: "
                              '`{"error": {"type", "field", "message"}}`.', lifespan=lifespan)
    app.state.sdrt = state
    openai.add_routes(app, state)
    a1111.add_routes(app, state)
    edge.add_routes(app, state)
    playground.add_routes(app)
    edge.install(app, state)
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

    if host not in ("127.0.0.1", "localhost", "::1") and not (config.api_key or config.api_auth):
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
