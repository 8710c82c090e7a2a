"""The OpenAI Images API dialect of `sdrt serve`: POST /v1/images/generations, /v1/images/edits, /v1/images/variations
and GET /v1/models, /v1/models/{id}, for the official `openai` SDK unchanged.

The OpenAI fields (serve/openai_spec.py says what each does here) plus sdrt's extension fields (the SDK sends them
through `extra_body`): `negative_prompt`, `steps` (or `num_inference_steps`), `guidance_scale`, `guidance_rescale`,
`seed` (absent, null or -1: random, below 2**53), `sampler`, `schedule`, `vae` (full | tiny), `vae_tiling`,
`cache_interval`, `loras`; on generations also `controls`, `control_start`, `control_end`, `guess_mode`,
`control_preprocess`, `ip_image`, `ip_scale`, `ip_adapters`, `adapter_name`, `adapter_image`, `adapter_scale`,
`photomaker_images` (a base64 photo or a list), `photomaker_trigger`, `photomaker_style_strength`,
`photomaker_faces` (v2: [[512 numbers] per photo]), `pulid_id` (ID tokens [[2048 numbers] × T], or the ID encoder's
inputs {embedding, eva_embedding, eva_hidden}, the embedding as numbers or a base64 face photo, or {embedding: a
base64 photo} alone, all three read from it: runtime/conditioning/pulid.py), `pulid_scale`, `pulid_mode`,
`pulid_start_step`, `pulid_zero_tokens`, `instantid_face` (the raw insightface embedding, [512] numbers; a
base64 image goes on as a face photo), `instantid_kps` ([[x, y] × 5] output pixels, or a base64 keypoint image),
`identitynet_scale`, `instantid_ip_scale`, `enhance_face_region` (true/false), `instantid_bbox` ([x1, y1, x2, y2] output
pixels); on edits `strength`; on variations `prompt`, `negative_prompt` and `noise_level`. Anything else is refused with 400
naming it. Errors are OpenAI's error object (serve/errors.py).

Edits (multipart, as `client.images.edit` sends them): one `image`; without `mask` img2img, with one inpainting where
the mask's fully transparent pixels (alpha 0) are repainted; `strength` defaults to the runtime's (diffusers'): 0.8
for img2img, 1.0 for inpainting. Variations: unCLIP image variations on an unCLIP export; 400 on any other model.
With `Accept: image/png` (or jpeg, webp) and n = 1 the answer is the raw image (seed in `X-Seed`); with `stream`,
server-sent events (serve/openai_stream.py).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.formparsers import MultiPartParser

from sdrt.runtime.lora import files as lora_files
from sdrt.runtime.samplers import registry as sampler_registry
from sdrt.runtime.samplers.schedules import SIGMA_SCHEDULES
from sdrt.serve import a1111, fields, jobs, openai_stream
from sdrt.serve.edge import ServerState
from sdrt.serve.errors import HttpError, invalid
from sdrt.serve.fields import ModelContext
from sdrt.serve.openai_spec import (EDIT_SPEC, GENERATE_SPEC, OUTPUT_FORMATS, VARIATION_SPEC, OpenAIPlan, form_body,
                                    image_file, one_image, openai_mask, spec_fields, unknown_check, wanted_media)

__all__ = ["OPENAI_FIELDS", "OUTPUT_FORMATS", "openai_plan", "edit_plan", "variation_plan", "wanted_media",
           "add_routes"]

# ---- the bodies → Plans --------------------------------------------------------------------------------------

SAMPLING = ("negative_prompt", "steps", "num_inference_steps", "guidance_scale", "guidance_rescale", "seed", "sampler",
            "schedule", "vae", "vae_tiling", "cache_interval")
CONDITIONING = ("controls", "control_start", "control_end", "guess_mode", "control_preprocess", "ip_image",
                "ip_scale", "ip_adapters", "adapter_name", "adapter_image", "adapter_scale", "photomaker_images",
                "photomaker_trigger", "photomaker_style_strength", "photomaker_faces", "pulid_id", "pulid_scale",
                "pulid_mode", "pulid_start_step", "pulid_zero_tokens", "instantid_face", "instantid_kps",
                "identitynet_scale", "instantid_ip_scale", "enhance_face_region", "instantid_bbox")
OPENAI_FIELDS = GENERATE_SPEC + SAMPLING + ("loras",) + CONDITIONING
EDIT_FIELDS = EDIT_SPEC + SAMPLING + ("loras", "strength")
VARIATION_FIELDS = VARIATION_SPEC + ("prompt", "output_format", "output_compression") + SAMPLING + ("noise_level",)
JS_SAFE_SEEDS = 2 ** 53  # random seeds are drawn below it, so a JavaScript client can send one back exactly
_OPENAI_NAMES = {"guidance": "guidance_scale", "batch": "n", "width": "size", "height": "size", "request": "body",
                 "init_image": "image"}
_PASSED = ("guidance_rescale", "sampler", "schedule", "vae", "vae_tiling", "cache_interval", "control_start",
           "control_end", "guess_mode", "control_preprocess", "ip_scale", "adapter_name", "adapter_scale", "strength",
           "noise_level", "photomaker_trigger", "photomaker_style_strength", "photomaker_faces", "pulid_id",
           "pulid_scale", "pulid_mode", "pulid_start_step", "pulid_zero_tokens", "instantid_face", "instantid_kps",
           "identitynet_scale", "instantid_ip_scale", "enhance_face_region", "instantid_bbox")


def _present(body: Mapping, known) -> dict:
    unknown_check(body, known)
    return {k: v for k, v in body.items() if v is not None or k == "prompt"}


def _prompt(b: Mapping, ctx: ModelContext, required: bool = True) -> str:
    if b.get("prompt") is None:
        if not required:
            return ""
        raise invalid("prompt", "is required: a string", code="missing_required_parameter")
    return fields.text("prompt", b["prompt"], ctx)


def _sd_fields(b: Mapping, flat: dict, names: dict, ctx: ModelContext) -> None:
    """sdrt's extension fields present in `b` → the Request's flat fields (and how this route names them)."""
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
    for key in _PASSED:
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
    if "photomaker_images" in b:  # PhotoMaker: one base64 photo or a list (runtime/conditioning/photomaker.py)
        photos = b["photomaker_images"]
        flat["photomaker_images"] = tuple(fields.decode_image(f"photomaker_images[{i}]", x, ctx, "RGB")
                                          for i, x in enumerate(photos)) if isinstance(photos, list) else \
            fields.decode_image("photomaker_images", photos, ctx, "RGB")
    for key in ("instantid_face", "instantid_kps"):  # InstantID: numbers (checked by validation) or a base64 image
        if isinstance(b.get(key), str):
            flat[key] = fields.decode_image(key, b[key], ctx, "RGB")
    if "adapter_image" in b:  # a T2I-Adapter's condition image (runtime/conditioning/t2i_adapter.py converts it)
        flat["adapter_image"] = fields.decode_image("adapter_image", b["adapter_image"], ctx, "RGB")
    flat["seed"] = b.get("seed", -1)
    if flat["seed"] == -1 and not isinstance(flat["seed"], bool):  # JavaScript's JSON numbers are exact to 2**53
        flat["seed"] = secrets.randbelow(JS_SAFE_SEEDS - 2 ** 16)  # image i gets seed + i: room for any batch


def _plan(flat: dict, names: dict, options: dict, **extra) -> OpenAIPlan:
    return OpenAIPlan([fields.request_of(flat)], names, **options, prompt=flat.get("prompt") or "", **extra)


def openai_plan(body: Mapping, ctx: ModelContext, accept: str | None = None) -> OpenAIPlan:
    """POST /v1/images/generations (JSON)."""
    b = _present(body, OPENAI_FIELDS)
    flat: dict[str, Any] = {"prompt": _prompt(b, ctx)}
    options = spec_fields(b, ctx, flat, accept)
    names = dict(_OPENAI_NAMES)
    _sd_fields(b, flat, names, ctx)
    return _plan(flat, names, options)


def edit_plan(body: Mapping, ctx: ModelContext, accept: str | None = None, unclip: bool = False) -> OpenAIPlan:
    """POST /v1/images/edits (the multipart form as `openai_spec.form_body` reads it): img2img, or with `mask`
    inpainting."""
    b = _present(body, EDIT_FIELDS)
    flat: dict[str, Any] = {"prompt": _prompt(b, ctx)}
    if unclip:
        raise invalid("image", f"{ctx.name} is an unCLIP model: it makes variations of an image "
                               "(POST /v1/images/variations), not edits")
    image = one_image(b, ctx)
    flat["init_image"] = image.convert("RGB")  # an alpha channel is dropped: transparency marks nothing without mask
    if "mask" in b:
        flat["mask"] = openai_mask(image_file("mask", b["mask"], ctx), image)
    options = spec_fields(b, ctx, flat, accept)
    names = dict(_OPENAI_NAMES)
    _sd_fields(b, flat, names, ctx)
    return _plan(flat, names, options, events="image_edit")


def variation_plan(body: Mapping, ctx: ModelContext, accept: str | None = None, unclip: bool = False) -> OpenAIPlan:
    """POST /v1/images/variations: unCLIP image variations (runtime/tasks/unclip.py) on an unCLIP model."""
    b = _present(body, VARIATION_FIELDS)
    if not unclip:
        raise invalid("model", f"{ctx.name} makes no image variations: variations need an unCLIP model (sdrt export "
                               "of a StableUnCLIPImg2ImgPipeline); use POST /v1/images/edits for img2img",
                      code="unsupported_model")
    flat: dict[str, Any] = {"prompt": _prompt(b, ctx, required=False)}
    flat["init_image"] = one_image(b, ctx).convert("RGB")
    options = spec_fields(b, ctx, flat, accept)
    names = dict(_OPENAI_NAMES)
    _sd_fields(b, flat, names, ctx)
    return _plan(flat, names, options)


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

def openai_response(plan: OpenAIPlan, results, encoded: list[list[bytes]], usage: dict) -> dict:
    result = results[0]
    t = result.timings
    body = {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(data).decode("ascii"), "seed": seed}
                 for data, seed in zip(encoded[0], result.seeds)],
        "background": plan.background,
        "output_format": plan.output_format,
        "size": f"{result.job.width}x{result.job.height}",
        "usage": usage,
        "timings": {"queue_wait": round(t.queue_wait, 4), "encode": round(t.encode, 4), "steps": round(t.steps, 4),
                    "decode": round(t.decode, 4), "total": round(t.total, 4), "batch_size": result.batch_size},
    }
    if plan.quality_asked != "auto":  # echoed: sdrt has no quality tiers (steps set the effort)
        body["quality"] = plan.quality_asked
    return body


async def read_form(state: ServerState, request: Request) -> dict:
    """A multipart body (edits, variations) as `openai_spec.form_body` reads it; 413 past the body limit."""
    data = await jobs.read_body(request, state.config.max_body_bytes)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise invalid("body", "must be multipart/form-data with the image as a file part (as the openai SDK sends "
                              "it)")

    async def chunks():
        yield data

    try:
        form = await MultiPartParser(request.headers, chunks(), max_files=20, max_fields=200).parse()
    except Exception as e:  # noqa: BLE001 — MultiPartException, a missing boundary, …
        raise invalid("body", f"is not a readable multipart form ({getattr(e, 'message', None) or type(e).__name__})") \
            from None
    try:
        return await asyncio.to_thread(form_body, form.multi_items())
    finally:
        await form.close()


# ---- the routes ----------------------------------------------------------------------------------------------

_OPENAI_SCHEMA = {"type": "object", "required": ["prompt"], "properties": {
    "prompt": {"type": "string"}, "n": {"type": "integer", "default": 1},
    "size": {"type": "string", "example": "512x512", "description": "WIDTHxHEIGHT or auto (the model's default)"},
    "response_format": {"type": "string", "enum": ["b64_json"]},
    "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"], "default": "png"},
    "output_compression": {"type": "integer", "minimum": 0, "maximum": 100},
    "quality": {"type": "string", "description": "accepted, no effect (steps set the effort)"},
    "background": {"type": "string", "enum": ["auto", "opaque"]},
    "model": {"type": "string"}, "user": {"type": "string"}, "stream": {"type": "boolean", "default": False},
    "partial_images": {"type": "integer", "minimum": 0, "maximum": 3, "description": "with stream: progress images "
                       "decoded by the tiny VAE"},
    "negative_prompt": {"type": "string"}, "steps": {"type": "integer", "default": 30},
    "num_inference_steps": {"type": "integer", "description": "same as steps"},
    "guidance_scale": {"type": "number", "default": 7.5}, "guidance_rescale": {"type": "number", "default": 0},
    "seed": {"type": "integer", "description": "image i uses seed + i; absent or -1: random (returned)"},
    "sampler": {"type": "string", "example": "DPM++ 2M Karras"},
    "schedule": {"type": "string", "enum": list(SIGMA_SCHEDULES)}}}
_FORM_SCHEMA = {"type": "object", "required": ["image"], "properties": {
    "image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"},
    "prompt": {"type": "string"}, "n": {"type": "integer", "default": 1}, "size": {"type": "string"},
    "strength": {"type": "number"}, "steps": {"type": "integer"}, "seed": {"type": "integer"}}}
_IMAGES = {200: {"content": {"application/json": {}, "image/png": {}, "image/jpeg": {}, "image/webp": {}}}}


def add_routes(app: FastAPI, state: ServerState) -> None:
    """The dialect's routes on `app`, over the app's shared state."""
    config = state.config
    unclip = bool(state.dir.info.unclip)

    async def answer(request: Request, plan: OpenAIPlan):
        if plan.stream:
            return await openai_stream.stream(state, request, plan)
        results = await jobs.generate(state, request, plan)
        encoded = await asyncio.to_thread(jobs.encode_results, plan, results, state.model_name)
        if plan.raw:
            r = results[0]
            return Response(encoded[0][0], media_type=f"image/{plan.output_format}",
                            headers={"X-Seed": str(r.seeds[0]), "X-Batch-Size": str(r.batch_size)})
        usage = await asyncio.to_thread(openai_stream.usage, state, plan.prompt)
        return JSONResponse(openai_response(plan, results, encoded, usage))

    async def from_form(request: Request, make: Callable[..., OpenAIPlan]):
        body = await read_form(state, request)
        accept = request.headers.get("accept")
        return await answer(request, await asyncio.to_thread(make, body, state.ctx, accept, unclip))

    @app.post("/v1/images/generations", tags=["OpenAI"], summary="Generate images (OpenAI Images API + SD fields)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": _OPENAI_SCHEMA}}}}, responses=_IMAGES)
    async def images_generations(request: Request):
        accept = request.headers.get("accept")
        return await answer(request, await jobs.plan_of(state, request, lambda body: openai_plan(body, state.ctx,
                                                                                                 accept)))

    @app.post("/v1/images/edits", tags=["OpenAI"], summary="Edit an image: img2img, or inpainting with a mask",
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
                  "schema": _FORM_SCHEMA}}}}, responses=_IMAGES)
    async def images_edits(request: Request):
        return await from_form(request, edit_plan)

    @app.post("/v1/images/variations", tags=["OpenAI"], summary="Variations of an image (unCLIP models)",
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
                  "schema": _FORM_SCHEMA}}}}, responses=_IMAGES)
    async def images_variations(request: Request):
        return await from_form(request, variation_plan)

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
            "img2img": d.has("vae_encoder"),  # POST /v1/images/edits
            "variations": bool(d.info.unclip),  # POST /v1/images/variations
            "previews": d.has("vae_decoder_tiny"),  # streaming with partial_images (the tiny VAE decodes them)
            "default_sampler": sampler_registry.model_default(d.scheduler_config),  # None: name one
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
