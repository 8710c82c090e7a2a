"""OpenAI image streaming for `sdrt serve` (`stream: true`, with `partial_images` 0–3): server-sent events
`image_generation.partial_image` / `image_generation.completed` for generations, `image_edit.*` for edits, each with
the fields the SDK's event types require (openai/types/image_gen_*_event.py, image_edit_*_event.py): b64_json,
background, created_at, output_format, quality, size, type, partial_image_index, and `usage` on the completed one.

Partial images are decoded by the tiny VAE after the steps runtime/service.preview_steps picks; the completed image
is the one the same request answers unstreamed. Errors before the first byte are ordinary answers; after it, an
`error` event carrying OpenAI's error object (the SDK raises APIError from it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

from fastapi import Request
from fastapi.responses import StreamingResponse

from sdrt.runtime import image_io
from sdrt.runtime.service import CancelToken, DeadlineExceeded
from sdrt.serve import jobs
from sdrt.serve.edge import ServerState
from sdrt.serve.errors import HttpError, openai_body
from sdrt.serve.openai_spec import OpenAIPlan


def usage(state: ServerState, prompt: str) -> dict:
    """OpenAI's `usage`, as far as sdrt has one: the prompt's CLIP tokens as written (the first text encoder's
    tokenizer); images are neither read nor made as tokens here, so image and output tokens are 0."""
    text = 0
    service = state.service
    tokenizers = getattr(getattr(service, "pipeline", None), "tokenizers", None) or {}
    if prompt and tokenizers:
        try:
            text = len(next(iter(tokenizers.values())).tokens(prompt))
        except Exception:  # noqa: BLE001 — a count is not worth failing a finished request for
            text = 0
    return {"input_tokens": text, "input_tokens_details": {"image_tokens": 0, "text_tokens": text},
            "output_tokens": 0, "total_tokens": text}


def stream_event(kind: str, plan: OpenAIPlan, image_bytes: bytes, size: tuple[int, int], index: int | None = None,
                 extra: dict | None = None) -> bytes:
    """One server-sent event: `{events}.partial_image` (with partial_image_index) or `{events}.completed`."""
    name = f"{plan.events}.{kind}"
    data = {"type": name, "b64_json": base64.b64encode(image_bytes).decode("ascii"),
            "background": plan.background, "created_at": int(time.time()), "output_format": plan.output_format,
            "quality": plan.quality_asked, "size": f"{size[0]}x{size[1]}"}
    if index is not None:
        data["partial_image_index"] = index
    data |= extra or {}
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def stream_error(error: HttpError) -> bytes:
    """A failure after the stream began (its status line is sent): an `error` event with OpenAI's error object."""
    return f"event: error\ndata: {json.dumps({'type': 'error', **openai_body(error)})}\n\n".encode()


async def stream(state: ServerState, request: Request, plan: OpenAIPlan) -> StreamingResponse:
    """The plan's one image as server-sent events. A client that goes away cancels the request, as in
    `jobs.generate`."""
    service = state.require_service()
    queued = await asyncio.to_thread(jobs.validated, state, service, plan)
    loop = asyncio.get_running_loop()
    previews: asyncio.Queue = asyncio.Queue()
    token = CancelToken()
    future, = jobs.submitted(state, service, queued, token, previews=plan.partial_images,
                             on_preview=lambda done, total, images: loop.call_soon_threadsafe(previews.put_nowait,
                                                                                             images[0]))
    size = (queued[0].width, queued[0].height)

    async def events():
        waiter = asyncio.wrap_future(future)
        give_up = None if state.config.timeout_s is None else loop.time() + state.config.timeout_s + 1.0
        index, finished = 0, False
        try:
            while True:
                while not previews.empty():  # in step order, before the result they precede
                    data = await asyncio.to_thread(image_io.image_bytes, previews.get_nowait(), None,
                                                   plan.output_format, plan.quality)
                    yield stream_event("partial_image", plan, data, size, index)
                    index += 1
                if waiter.done():
                    break
                await asyncio.wait({waiter}, timeout=state.config.poll_s)
                if not waiter.done() and await request.is_disconnected():
                    state.metrics.outcome("cancelled")
                    return
                if give_up is not None and loop.time() > give_up:
                    raise DeadlineExceeded("the request's deadline passed before it finished")
            result = waiter.result()
            encoded = await asyncio.to_thread(jobs.encode_results, plan, [result], state.model_name)
            finished = True
            state.metrics.outcome("ok")
            state.metrics.on_result(result)
            yield stream_event("completed", plan, encoded[0][0], size,
                               extra={"usage": usage(state, plan.prompt), "seed": result.seeds[0],
                                      "partial_images_sent": index})
        except Exception as e:  # noqa: BLE001 — the status line is gone: an error event instead
            yield stream_error(jobs.failure(state, e, plan))
        finally:
            if not finished:
                token.cancel()
                waiter.cancel()
                waiter.add_done_callback(jobs.retrieve)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Seed": str(queued[0].seeds[0])})
