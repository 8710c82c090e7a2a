"""Ray Serve deployment over sdrt's batching service (optional: `pip install 'sdrt[ray]'`).

    python -m sdrt.serve.ray ENGINE_DIR --port 8000                  # a local Ray instance, HTTP on 127.0.0.1:8000

    from ray import serve
    from sdrt.serve.ray import build
    serve.run(build("sd15-fp16", num_replicas=2, num_gpus=1), route_prefix="/sd15")

Each replica owns one `sdrt.runtime.service.Service` (one worker thread owning the engines), so concurrent
requests routed to a replica share engine batches exactly as in `sdrt serve` or the Triton model; Ray adds
replicas, placement and autoscaling. `max_ongoing_requests` defaults to twice the batch so that a replica sees
enough requests at once to fill a batch.

HTTP (the replica's `__call__`): `POST /` with a JSON request in sdrt's own form (runtime/request.py: flat keys
such as {"prompt": "a cat", "steps": 20, "seed": 7, "width": 512} or nested groups; images as base64) answers
`{"created", "data": [{"b64_json", "seed"}], "timings", "batch_size"}`; with `Accept: image/png` and one image,
the PNG itself (with its `parameters` text chunk, seed in `X-Seed`). `GET /` answers the model and readiness.
Errors are `{"error": {"type", "field", "message"}}`: 422 invalid request, 429 + Retry-After when the replica's
queue is full, 504 past the deadline, 503 while closing, 500 otherwise. Python callers holding a
DeploymentHandle call `generate(request_dict)` and get the PIL images and seeds.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

from sdrt.runtime.errors import UserError


def _serve():
    try:
        from ray import serve
    except ImportError:
        raise UserError("Ray Serve is not installed here: pip install 'sdrt[ray]' (or 'ray[serve]')") from None
    return serve


def _error(status: int, kind: str, message: str, field: str | None = None, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"type": kind, "field": field, "message": " ".join(message.split())}},
                        status_code=status, headers=headers)


class _NoFolders:
    lora_dir = None  # a replica has no LoRA folder: requests cannot name LoRAs (serve/fields.py confine_adapters)


class SdrtDeployment:
    """The replica: a Service over one engine directory. Plain class; `build()` makes it a Ray Serve deployment."""

    def __init__(self, engine_dir: str, backend: str = "auto", max_batch: int = 4, max_wait_ms: float = 10.0,
                 queue_size: int = 64, request_timeout_s: float = 300.0, warmup: bool = True):
        from sdrt.runtime.service import Service

        self.model = Path(engine_dir).name
        self.request_timeout = request_timeout_s
        self.service = Service(engine_dir, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
                               backend=backend, warmup=warmup)
        self.service.wait_ready(600)  # the replica starts serving warm
        self.context = _NoFolders()

    # ---- Python callers (DeploymentHandle) ---------------------------------------------------------------------
    async def generate(self, request: dict) -> dict:
        """A request dict (flat or nested, runtime/request.py) → {"images": [PIL], "seeds": [...]}; raises what the
        service raises (InvalidRequest, QueueFull, DeadlineExceeded, …)."""
        from sdrt.runtime.request import Request

        result = await self._run(Request.from_dict(request))
        return {"images": result.images, "seeds": list(result.seeds)}

    async def _run(self, request):
        from sdrt.runtime.service import CancelToken

        token = CancelToken()
        future = self.service.submit(request, timeout=self.request_timeout, cancel=token)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the client went away: stop its rows between steps
            token.cancel()
            future.cancel()
            raise

    # ---- HTTP -----------------------------------------------------------------------------------------------------
    async def __call__(self, http_request):
        from starlette.responses import JSONResponse, Response

        from sdrt.runtime.request import Request
        from sdrt.runtime.service import DeadlineExceeded, QueueFull, ServiceClosed
        from sdrt.runtime.fields import InvalidRequest
        from sdrt.serve import errors, fields

        if http_request.method == "GET":
            return JSONResponse({"model": self.model, "ready": self.service.ready,
                                 "queue_depth": self.service.queue_depth, "max_batch": self.service.max_batch})
        if http_request.method != "POST":
            return _error(405, "method_not_allowed", "use POST with a JSON request, or GET for the model's state")
        try:
            body = await http_request.json()
        except Exception:  # noqa: BLE001 — JSONDecodeError, UnicodeDecodeError
            return _error(400, "invalid_json", "the body is not a JSON object")
        try:
            request = Request.from_dict(body)
            fields.confine_adapters(request, self.context)
            result = await self._run(request)
        except errors.HttpError as e:
            return _error(e.status, e.kind, e.message, e.field)
        except InvalidRequest as e:
            return _error(422, "invalid_request", e.message, e.field)
        except QueueFull as e:
            return _error(429, "queue_full", str(e), headers={"Retry-After": "1"})
        except DeadlineExceeded as e:
            return _error(504, "deadline_exceeded", str(e))
        except ServiceClosed as e:
            return _error(503, "closing", str(e))
        except UserError as e:
            return _error(400, "bad_request", str(e))
        except Exception as e:  # noqa: BLE001 — an engine error: this request fails, the replica goes on
            return _error(500, "internal", f"{type(e).__name__}: {e}")
        if "image/png" in http_request.headers.get("accept", "") and len(result.images) == 1:
            return Response(self._png(result, 0), media_type="image/png", headers={"X-Seed": str(result.seeds[0])})
        t = result.timings
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(self._png(result, i)).decode("ascii"), "seed": result.seeds[i]}
                     for i in range(len(result.images))],
            "timings": {"queue_wait": t.queue_wait, "encode": t.encode, "steps": t.steps, "decode": t.decode,
                        "total": t.total},
            "batch_size": result.batch_size,
        })

    def _png(self, result, index: int) -> bytes:
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", result.parameters(index, self.model).a1111_text())
        buffer = io.BytesIO()
        result.images[index].save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()

    # ---- Ray Serve hooks ----------------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy (it is restarted)."""
        if not self.service.ready:
            raise RuntimeError("the service's worker is not running")

    def __del__(self):  # Ray Serve calls __del__ when it shuts a replica down
        service = getattr(self, "service", None)
        if service is not None:
            service.close(drain=False, timeout=30)


def build(engine_dir: str | Path, *, num_replicas: int = 1, num_gpus: float = 0, num_cpus: float = 1,
          max_ongoing_requests: int | None = None, backend: str = "auto", max_batch: int = 4,
          max_wait_ms: float = 10.0, queue_size: int = 64, request_timeout_s: float = 300.0, warmup: bool = True,
          name: str = "sdrt"):
    """A Ray Serve application (Deployment.bind(...)) of SdrtDeployment over `engine_dir`, for serve.run()."""
    from sdrt.runtime.loader import open_dir

    serve = _serve()
    engine_dir = Path(engine_dir).resolve()
    open_dir(engine_dir)  # refuse a missing or non-engine directory here, not in a replica's log
    if num_replicas < 1 or max_batch < 1 or queue_size < 1 or num_gpus < 0 or num_cpus < 0:
        raise UserError("replicas, max batch and queue size must be at least 1; GPUs and CPUs at least 0")
    from sdrt.serve import ray as this_module  # by reference, also when this file runs as __main__

    deployment = serve.deployment(
        this_module.SdrtDeployment, name=name, num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests or max(2 * max_batch, 8),
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus})
    return deployment.bind(str(engine_dir), backend=backend, max_batch=max_batch, max_wait_ms=max_wait_ms,
                           queue_size=queue_size, request_timeout_s=request_timeout_s, warmup=warmup)


def main(argv: list[str] | None = None) -> int:
    """`python -m sdrt.serve.ray ENGINE_DIR --port P`: a local Ray instance serving one model until SIGINT/SIGTERM."""
    import argparse
    import signal
    import sys
    import threading

    parser = argparse.ArgumentParser(prog="python -m sdrt.serve.ray", description=main.__doc__)
    parser.add_argument("engine_dir")
    parser.add_argument("--host", default="127.0.0.1", help="address of Ray Serve's HTTP proxy [127.0.0.1]")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--route-prefix", default="/")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (e.g. 1, or 0.5 to share)")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs Ray reserves per replica")
    parser.add_argument("--backend", default="auto", help="auto|tensorrt|ort-cuda|ort-cpu|torch")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args(argv)
    try:
        serve = _serve()
        app = build(args.engine_dir, num_replicas=args.replicas, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                    backend=args.backend, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                    queue_size=args.queue_size, warmup=not args.no_warmup)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    import ray

    # Serve's HTTP proxy binds --host (127.0.0.1 by default). Ray 2.x's own gRPC servers (GCS, raylet, workers)
    # listen on the node's address or all interfaces whatever ray.init is given: firewall a shared host.
    ray.init(include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, route_prefix=args.route_prefix, blocking=False)
        print(f"serving {args.engine_dir} at http://{args.host}:{args.port}{args.route_prefix}", flush=True)
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
