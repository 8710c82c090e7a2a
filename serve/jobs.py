"""What both HTTP dialects of `sdrt serve` do with a request: read the body, plan it, validate, submit to the batching
service (runtime/service.py), await the result, encode the images.

    results = await jobs.generate(state, request, await jobs.plan_of(state, request, make_plan))

A client that disconnects cancels its request: `generate` polls `request.is_disconnected()` while it awaits the
service's future and sets the request's CancelToken. Each outcome is counted in the metrics once.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from fastapi import Request

from sdrt.runtime import image_io
from sdrt.runtime.errors import UserError
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.service import CancelToken, DeadlineExceeded, QueueFull, Service, ServiceClosed
from sdrt.serve import errors, fields
from sdrt.serve.edge import ServerState
from sdrt.serve.errors import HttpError
from sdrt.serve.fields import Plan


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


async def plan_of(state: ServerState, request: Request, make: Callable[[dict], Plan]) -> Plan:
    """Read the body, then parse it and build the plan on a thread (a 32 MB body must not stall the loop)."""
    body = await read_body(request, state.config.max_body_bytes)
    return await asyncio.to_thread(lambda: make(fields.parse_json(body)))


def retrieve(future: asyncio.Future) -> None:
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


def validated(state: ServerState, service: Service, plan: Plan) -> list:
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
            raise errors.invalid(None, str(e)) from None
        jobs.append(job)
    return jobs


def submitted(state: ServerState, service: Service, jobs: list, token: CancelToken, watch=None, **preview) -> list:
    """The jobs queued (429 when the queue is full, 503 while closing). `watch` (A1111's progress,
    serve/a1111/progress.py): `watch.tokens[i]` is job i's CancelToken, `watch.callbacks(i)` its submit callbacks."""
    tokens = watch.tokens if watch is not None else [token] * len(jobs)
    try:
        return [service.submit(job, timeout=state.config.timeout_s, cancel=t,
                               **(watch.callbacks(i) if watch is not None else {}), **preview)
                for i, (job, t) in enumerate(zip(jobs, tokens))]
    except QueueFull as e:
        token.cancel()
        state.metrics.outcome("queue_full")
        raise HttpError(429, "queue_full", str(e), headers={"Retry-After": str(state.retry_after())}) from None
    except ServiceClosed as e:
        token.cancel()
        state.metrics.outcome("closed")
        raise HttpError(503, "shutting_down", str(e), headers={"Retry-After": "10"}) from None


def failure(state: ServerState, e: BaseException, plan: Plan) -> HttpError:
    """What a request that failed after it was queued answers, its outcome counted."""
    error, outcome = errors.failure(e, state.config.timeout_s, plan.invalid)
    if outcome is not None:
        state.metrics.outcome(outcome)
    return error


async def generate(state: ServerState, request: Request, plan: Plan, watch=None) -> list:
    """The plan's results, in order (its errors as HttpError: 422, 429, 499, 503, 504, 500). `watch(jobs)` (A1111's
    progress) gives each job its own CancelToken and callbacks, and is cancelled with the request."""
    service = state.require_service()
    metrics, config = state.metrics, state.config
    jobs = await asyncio.to_thread(validated, state, service, plan)  # image decoding and schedules: off the loop
    token = CancelToken()
    if watch is not None:
        watch = watch(jobs)
        token = watch  # its cancel() cancels every job of the plan
    futures = submitted(state, service, jobs, token, watch)
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
        raise failure(state, e, plan) from None
    finally:
        if not finished:
            token.cancel()
            waiter.cancel()
            waiter.add_done_callback(retrieve)
    metrics.outcome("ok")
    for r in results:
        metrics.on_result(r)
    return results


def encode_results(plan: Plan, results, model_name: str) -> list[list[bytes]]:
    """Each result's images as file bytes with the `parameters` metadata `sdrt run` writes (CPU work: run it off
    the event loop)."""
    if not plan.send_images:
        return [[] for _ in results]
    return [[image_io.image_bytes(image, r.parameters(i, model_name), plan.output_format, plan.quality)
             for i, image in enumerate(r.images)] for r in results]
