"""The OpenAI Images API dialect of `sdrt serve`: POST /v1/images/generations and GET /v1/models.

OpenAI Images (`POST /v1/images/generations`): `prompt`, `n`, `size` ("WxH" or "auto"), `response_format`
("b64_json"), `output_format` (png | jpeg | webp), `output_compression` (jpeg/webp quality), `model` (the served
model's id, optional), `user` (accepted, unused), `stream` and `partial_images` (0–3; server-sent events
`image_generation.partial_image` decoded by the tiny VAE, then `image_generation.completed`; n = 1), plus SD fields `negative_prompt`, `steps`
(or `num_inference_steps`), `guidance_scale`, `guidance_rescale`, `seed` (absent, null or -1: random), `sampler`,
`schedule`, `vae` (full | tiny), `vae_tiling` (auto | on | off), `cache_interval`, `loras` (names from the
server's LoRA folder), `controls`, `control_start`, `control_end`, `guess_mode`, `ip_image`, `ip_scale`, `ip_adapters`, `adapter_name`,
`adapter_image`, `adapter_scale` (a T2I-Adapter). Anything
else is refused with 422 naming it.

With `Accept: image/png` (or jpeg, webp) and n = 1 the answer is the raw image (seed in `X-Seed`); with `stream`,
server-sent events (`_stream`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sdrt.runtime import image_io
from sdrt.runtime.lora import files as lora_files
from sdrt.runtime.samplers import registry as sampler_registry
from sdrt.runtime.samplers.schedules import SIGMA_SCHEDULES
from sdrt.runtime.service import CancelToken, DeadlineExceeded
from sdrt.serve import a1111, fields, jobs
from sdrt.serve.edge import ServerState
from sdrt.serve.errors import HttpError, invalid
from sdrt.serve.fields import ModelContext, Plan

# ---- the body → a Plan ---------------------------------------------------------------------------------------

OPENAI_FIELDS = ("model", "prompt", "n", "size", "response_format", "output_format", "output_compression", "user",
                 "stream", "partial_images", "negative_prompt", "steps", "num_inference_steps", "guidance_scale", "guidance_rescale",
                 "seed", "sampler", "schedule", "loras", "vae", "vae_tiling", "cache_interval", "controls",
                 "control_start", "control_end", "guess_mode", "control_preprocess", "ip_image", "ip_scale",
                 "ip_adapters", "adapter_name", "adapter_image", "adapter_scale")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
JS_SAFE_SEEDS = 2 ** 53  # random seeds are drawn below it, so a JavaScript client can send one back exactly
_MEDIA = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
_SIZE = re.compile(r"^\s*(\d{1,7})\s*[xX×]\s*(\d{1,7})\s*$")
_OPENAI_NAMES = {"guidance": "guidance_scale", "batch": "n", "width": "size", "height": "size", "request": "body"}


def wanted_media(accept: str | None) -> str | None:
    """The image format an Accept header asks for instead of JSON (None: JSON)."""
    if not accept:
        return None
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if "application/json" in types:
        return None
    for t in types:
        if t in _MEDIA:
            return _MEDIA[t]
    return None


def openai_plan(body: Mapping, ctx: ModelContext, accept: str | None = None) -> Plan:
    unknown = [k for k in body if k not in OPENAI_FIELDS]
    if unknown:
        raise invalid(unknown[0], f"is not a field of this API (unknown: {', '.join(unknown)}); known: "
                                  f"{', '.join(OPENAI_FIELDS)}")
    b = {k: v for k, v in body.items() if v is not None or k == "prompt"}
    if "prompt" not in b or b["prompt"] is None:
        raise invalid("prompt", "is required: a string")
    flat: dict[str, Any] = {"prompt": fields.text("prompt", b["prompt"], ctx)}
    if "model" in b and b["model"] not in (ctx.name, "sdrt"):
        raise invalid("model", f"this server serves {ctx.name!r} (GET /v1/models), not {fields.short(b['model'])}")
    if "user" in b and not isinstance(b["user"], str):
        raise invalid("user", f"must be a string, not {fields.json_type(b['user'])}")
    stream = b.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream", f"must be true or false, not {fields.short(stream)}")
    partial = 0
    if "partial_images" in b:
        partial = fields.integer("partial_images", b["partial_images"], 0, 3)
        if partial and not stream:
            raise invalid("partial_images", "are sent while streaming; give stream: true with it")
        if partial and not ctx.has_tiny_vae:
            raise invalid("partial_images", "are decoded by the tiny VAE, which this model's engine directory does not "
                                            "have (export it with --tiny-vae); send 0 or leave it out")
    if stream and b.get("n", 1) != 1:
        raise invalid("n", "stream: true sends one image; send n = 1")
    if stream and wanted_media(accept) is not None:
        raise invalid("stream", "streams server-sent events; accept text/event-stream or application/json")
    if b.get("response_format") == "url":
        raise invalid("response_format", "sdrt returns images inline; use b64_json (it stores no files to link to)")
    _choice("response_format", b.get("response_format", "b64_json"), ("b64_json",))
    output = _choice("output_format", b.get("output_format", "png"), OUTPUT_FORMATS + ("jpg",))
    output = "jpeg" if output == "jpg" else output
    quality = None
    if "output_compression" in b:
        quality = fields.integer("output_compression", b["output_compression"], 0, 100)
        if output == "png" and quality != 100:
            raise invalid("output_compression", "applies to jpeg and webp; PNG is lossless (give 100 or leave it "
                                                "out)")
    n = b.get("n", 1)
    flat["batch"] = n
    media = wanted_media(accept)
    if media is not None:
        if "output_format" in b and output != media:
            raise invalid("output_format", f"is {output} but the Accept header asks for image/{media}")
        if n != 1:
            raise invalid("n", "an image/* Accept header returns one raw image; send n = 1, or accept "
                               "application/json for several")
        output = media
    if "size" in b and b["size"] != "auto":
        size = b["size"]
        match = _SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise invalid("size", f"must be \"WIDTHxHEIGHT\" (e.g. \"{ctx.default_size}x{ctx.default_size}\") or "
                                  f"\"auto\", not {fields.short(size)}")
        flat["width"], flat["height"] = int(match.group(1)), int(match.group(2))
    names = dict(_OPENAI_NAMES)
    if "steps" in b and "num_inference_steps" in b:
        raise invalid("num_inference_steps", "give steps or num_inference_steps, not both")
    if "num_inference_steps" in b:
        flat["steps"] = b["num_inference_steps"]
        names["steps"] = "num_inference_steps"
    elif "steps" in b:
        flat["steps"] = b["steps"]
    if "negative_prompt" in b:
        flat["negative_prompt"] = fields.text("negative_prompt", b["negative_prompt"], ctx, allow_list=True)
    if "guidance_scale" in b:
        flat["guidance"] = b["guidance_scale"]
    for key in ("guidance_rescale", "sampler", "schedule", "vae", "vae_tiling", "cache_interval", "control_start",
                "control_end", "guess_mode", "control_preprocess", "ip_scale", "adapter_name", "adapter_scale"):
        if key in b:
            flat[key] = b[key]
    if "loras" in b:
        flat["loras"] = lora_entries("loras", b["loras"], ctx)
    if "controls" in b:
        flat["controls"] = _controls(b["controls"], ctx)
    if "ip_image" in b:  # one base64 image, or a list of them for the one adapter
        images = b["ip_image"]
        flat["ip_image"] = tuple(fields.decode_image(f"ip_image[{i}]", x, ctx, "RGB") for i, x in enumerate(images)) \
            if isinstance(images, list) else fields.decode_image("ip_image", images, ctx, "RGB")
    if "ip_adapters" in b:
        flat["ip_adapters"] = _ip_adapters(b["ip_adapters"], ctx)
    if "adapter_image" in b:  # a T2I-Adapter's condition image (runtime/conditioning/t2i_adapter.py converts it for the adapter)
        flat["adapter_image"] = fields.decode_image("adapter_image", b["adapter_image"], ctx, "RGB")
    flat["seed"] = b.get("seed", -1)
    if flat["seed"] == -1 and not isinstance(flat["seed"], bool):  # JavaScript's JSON numbers are exact to 2**53
        flat["seed"] = secrets.randbelow(JS_SAFE_SEEDS - 2 ** 16)  # image i gets seed + i: room for any batch
    return Plan([fields.request_of(flat)], names, output_format=output, quality=quality, raw=media is not None,
                stream=stream, partial_images=partial)


def _choice(field: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise invalid(field, f"must be one of {', '.join(choices)}, not {fields.short(value)}")
    return value.lower()


def lora_entries(field_name: str, value, ctx: ModelContext) -> list[list]:
    """OpenAI `loras`: ["NAME:SCALE", …] or [{"name": …, "scale": …}, …] → [[name, scale], …] (names checked)."""
    try:
        entries = lora_files.normalize_entries(value, field_name)
    except lora_files.LoraError as e:
        raise invalid(field_name, str(e)) from None
    fields.lora_names_check(field_name, [name for name, _ in entries], ctx)
    return [[name, scale] for name, scale in entries]


def _ip_adapters(value, ctx: ModelContext) -> tuple:
    """`ip_adapters`: [{"name": …, "image": base64 or [base64, …], "scale": …}, …], FaceID {"name", "embeds": [[…]],
    "scale"} (runtime/conditioning/ip_adapter.py checks names, embeddings and scales)."""
    if not isinstance(value, list):
        raise invalid("ip_adapters", f"must be a list of {{name, image, scale}} objects, not {fields.json_type(value)}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise invalid(f"ip_adapters[{i}]",
                          f"must be an object {{name, image, scale}}, not {fields.json_type(entry)}")
        if "image" not in entry:  # FaceID: {name, embeds, scale}
            out.append(entry)
            continue
        image = entry["image"]
        image = tuple(fields.decode_image(f"ip_adapters[{i}].image[{j}]", x, ctx, "RGB") for j, x in enumerate(image)) \
            if isinstance(image, list) else fields.decode_image(f"ip_adapters[{i}].image", image, ctx, "RGB")
        out.append(entry | {"image": image})
    return tuple(out)


def _controls(value, ctx: ModelContext) -> tuple:
    """`controls`: [{"name": …, "image": base64, "scale": …}, …] (runtime/conditioning/controlnet.py checks names and scales)."""
    if not isinstance(value, list):
        raise invalid("controls", f"must be a list of {{name, image, scale}} objects, not {fields.json_type(value)}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise invalid(f"controls[{i}]", f"must be an object {{name, image, scale}}, not {fields.json_type(entry)}")
        image = fields.decode_image(f"controls[{i}].image", entry.get("image"), ctx, "RGB")
        out.append(entry | {"image": image})
    return tuple(out)


# ---- the answers ---------------------------------------------------------------------------------------------

def openai_response(plan: Plan, results, encoded: list[list[bytes]]) -> dict:
    result = results[0]
    t = result.timings
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(data).decode("ascii"), "seed": seed}
                 for data, seed in zip(encoded[0], result.seeds)],
        "output_format": plan.output_format,
        "size": f"{result.job.width}x{result.job.height}",
        "timings": {"queue_wait": round(t.queue_wait, 4), "encode": round(t.encode, 4), "steps": round(t.steps, 4),
                    "decode": round(t.decode, 4), "total": round(t.total, 4), "batch_size": result.batch_size},
    }


def stream_event(kind: str, plan: Plan, image_bytes: bytes, size: tuple[int, int], index: int | None = None,
                 extra: dict | None = None) -> bytes:
    """One server-sent event in OpenAI's image streaming shape: `image_generation.partial_image` (with
    partial_image_index) or `image_generation.completed`."""
    data = {"type": f"image_generation.{kind}", "b64_json": base64.b64encode(image_bytes).decode("ascii"),
            "created_at": int(time.time()), "size": f"{size[0]}x{size[1]}", "output_format": plan.output_format}
    if index is not None:
        data["partial_image_index"] = index
    data |= extra or {}
    return f"event: image_generation.{kind}\ndata: {json.dumps(data)}\n\n".encode()


def stream_error(error: HttpError) -> bytes:
    """A failure after the stream began (its status line is sent): an `error` event with the usual error body."""
    return f"event: error\ndata: {json.dumps(error.body())}\n\n".encode()


# ---- the routes ----------------------------------------------------------------------------------------------

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


async def _stream(state: ServerState, request: Request, plan: Plan) -> StreamingResponse:
    """OpenAI image streaming: `partial_images` progress images (tiny VAE, runtime/service.preview_steps), then
    the finished image, as server-sent events. Errors before the first byte are ordinary answers; after it, an
    `error` event. A client that goes away cancels the request, as in `jobs.generate`."""
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
                               extra={"seed": result.seeds[0], "partial_images_sent": index})
        except Exception as e:  # noqa: BLE001 — the status line is gone: an error event instead
            yield stream_error(jobs.failure(state, e, plan))
        finally:
            if not finished:
                token.cancel()
                waiter.cancel()
                waiter.add_done_callback(jobs.retrieve)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Seed": str(queued[0].seeds[0])})


def add_routes(app: FastAPI, state: ServerState) -> None:
    """The dialect's routes on `app`, over the app's shared state."""
    config = state.config

    @app.post("/v1/images/generations", tags=["OpenAI"], summary="Generate images (OpenAI Images API + SD fields)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": _OPENAI_SCHEMA}}}},
              responses={200: {"content": {"application/json": {}, "image/png": {}, "image/jpeg": {},
                                           "image/webp": {}}}})
    async def images_generations(request: Request):
        accept = request.headers.get("accept")
        plan = await jobs.plan_of(state, request, lambda body: openai_plan(body, state.ctx, accept))
        if plan.stream:
            return await _stream(state, request, plan)
        results = await jobs.generate(state, request, plan)
        encoded = await asyncio.to_thread(jobs.encode_results, plan, results, state.model_name)
        if plan.raw:
            r = results[0]
            return Response(encoded[0][0], media_type=f"image/{plan.output_format}",
                            headers={"X-Seed": str(r.seeds[0]), "X-Batch-Size": str(r.batch_size)})
        return JSONResponse(openai_response(plan, results, encoded))

    def model_card() -> dict:
        d, limits = state.dir, config.limits
        manifest = d.manifest or {}
        service = state.service
        return {
            "id": state.model_name, "object": "model", "owned_by": "sdrt",
            "created": int((Path(config.engine_dir) / "model_index.json").stat().st_mtime),
            "family": d.info.family.value, "inpaint": d.info.inpaint, "prediction_type": d.info.prediction_type,
            "precision": manifest.get("precision"), "default_size": d.default_size,
            "size_multiple": state.ctx.size_multiple,
            "img2img": d.has("vae_encoder"),
            "previews": d.has("vae_decoder_tiny"),  # streaming with partial_images (the tiny VAE decodes them)
            "default_sampler": sampler_registry.default_for(d.scheduler_config),
            "samplers": list(sampler_registry.REGISTRY),
            "a1111_samplers": [s["name"] for s in a1111.a1111_samplers()],
            "schedules": list(SIGMA_SCHEDULES),
            "limits": {"max_pixels": limits.max_pixels, "max_images_per_request": limits.max_batch,
                       "max_steps": limits.max_steps, "max_prompt_chars": config.max_prompt_chars,
                       "max_body_bytes": config.max_body_bytes, "timeout_s": config.timeout_s,
                       "max_n_iter": state.ctx.max_iterations},
            "batching": {"max_batch": service.max_batch if service else min(config.max_batch, limits.max_batch),
                         "max_wait_ms": config.max_wait_ms, "queue_size": config.queue_size},
            "ready": state.ready,
        }

    @app.get("/v1/models", tags=["OpenAI"], summary="The served model and what it can do")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", tags=["OpenAI"], summary="The served model, by its id")
    async def model(model_id: str):
        if model_id != state.model_name:
            raise HttpError(404, "not_found", f"this server serves {state.model_name!r}, not "
                                              f"{fields.short(model_id)} (GET /v1/models)", "model")
        return model_card()
