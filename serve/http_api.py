"""The HTTP shapes of `sdrt serve`: JSON bodies → Requests, Results → response bodies, and one error shape.

No I/O and no sampling here: a body becomes one or more `Request`s (runtime/request.py), which the service
validates (runtime/validate.py, the one validation); its `InvalidRequest(field, …)` comes back here to be named
the way the route's clients spell the field. Two request dialects:

OpenAI Images (`POST /v1/images/generations`): `prompt`, `n`, `size` ("WxH" or "auto"), `response_format`
("b64_json"), `output_format` (png | jpeg | webp), `output_compression` (jpeg/webp quality), `model` (the served
model's id, optional), `user` (accepted, unused), `stream` and `partial_images` (0–3; server-sent events
`image_generation.partial_image` decoded by the tiny VAE, then `image_generation.completed`; n = 1), plus SD fields `negative_prompt`, `steps`
(or `num_inference_steps`), `guidance_scale`, `guidance_rescale`, `seed` (absent, null or -1: random), `sampler`,
`schedule`, `vae` (full | tiny), `vae_tiling` (auto | on | off), `cache_interval`, `loras` (names from the
server's LoRA folder), `controls`, `control_start`, `control_end`, `guess_mode`, `ip_image`, `ip_scale`, `ip_adapters`, `adapter_name`,
`adapter_image`, `adapter_scale` (a T2I-Adapter). Anything
else is refused with 422 naming it.

AUTOMATIC1111 (`POST /sdapi/v1/txt2img`, `/sdapi/v1/img2img`): the fields sdrt uses are in `A1111_USED`; the
fields A1111 clients send with neutral defaults are in `A1111_NEUTRAL`, each accepted only with a value whose
behaviour sdrt already has (e.g. `restore_faces: false`) and refused with 422 naming it otherwise (e.g.
`restore_faces: true`); any other field is refused as unknown. `n_iter` > 1 runs several batches whose seeds
continue (A1111: image i of the whole request has seed + i). Omitted fields take A1111's defaults (steps 50,
cfg_scale 7, sampler "Euler", denoising_strength 0.75, seed -1) except the size, which is the model's default size
(A1111 always defaults to 512). An omitted `negative_prompt` means the model's default negative conditioning
(for SDXL: zeroed, as diffusers), not "".

Every 4xx/5xx body is `{"error": {"type": ..., "field": ... | null, "message": ...}}`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import Image, ImageOps

from sdrt.runtime import image_io
from sdrt.runtime.lora import adapters as lora
from sdrt.runtime.samplers import registry as sampler_registry
from sdrt.runtime.prompts.tags import TagError, strip_lora_tags
from sdrt.runtime.request import Request
from sdrt.runtime.fields import InvalidRequest, MAX_SEED

# ---- the one error shape ---------------------------------------------------------------------------------


class HttpError(Exception):
    """An answer other than 200: status, a machine-readable type, the field (or None) and a message."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.field = status, kind, message, field
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.kind, self.message, self.field)


def error_body(kind: str, message: str, field: str | None = None) -> dict:
    return {"error": {"type": kind, "field": field, "message": message}}


def invalid(field: str | None, message: str) -> HttpError:
    return HttpError(422, "invalid_request", message, field)


# ---- what the routes need to know about the model ----------------------------------------------------------


@dataclass(frozen=True)
class ModelContext:
    name: str  # the model id clients see (OpenAI `model`, A1111 `sd_model_name`)
    default_size: int
    size_multiple: int
    max_prompt_chars: int
    max_iterations: int  # A1111 n_iter
    max_image_pixels: int  # init images and masks larger than this are refused before decoding
    lora_dir: Path | None = None  # LoRAs a request may name (by file stem; never a path)
    has_tiny_vae: bool = False  # vae_decoder_tiny exported: streamed partial images can be decoded


# ---- JSON bodies -----------------------------------------------------------------------------------------

def parse_json(body: bytes) -> dict:
    """The body as a JSON object, or 422 naming `body`."""
    if not body.strip():
        raise invalid("body", "is empty; send a JSON object")
    try:
        data = json.loads(body)
    except RecursionError:
        raise invalid("body", "is nested too deeply to be a request") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError, int digit limits
        raise invalid("body", f"is not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise invalid("body", f"must be a JSON object, not {_json_type(data)}")
    _check_strings(data)
    return data


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _check_strings(body: dict) -> None:
    """Refuse unpaired UTF-16 surrogates ("\\ud800" in JSON): no tokenizer or PNG chunk can carry them. Iterative:
    a deeply nested body must not exhaust the stack."""
    stack = [(value, key) for key, value in body.items()] + [(key, "body") for key in body]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise invalid(where, "contains an unpaired UTF-16 surrogate (\\ud800-\\udfff); send valid "
                                     "Unicode text") from None
        elif isinstance(value, dict):
            stack.extend((v, where) for v in value.values())
            stack.extend((k, where) for k in value)
        elif isinstance(value, list):
            stack.extend((v, where) for v in value)


def _text(field: str, value, ctx: ModelContext, *, allow_list: bool = False) -> str | list[str]:
    """A prompt: a string (or, where allowed, a list of strings) of at most max_prompt_chars characters."""
    items = value if allow_list and isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, str):
            kind = "a string or a list of strings" if allow_list else "a string"
            raise invalid(field, f"must be {kind}, not {_json_type(item)}")
        if len(item) > ctx.max_prompt_chars:
            raise invalid(field, f"is {len(item):,} characters long; at most {ctx.max_prompt_chars:,} (the text "
                                 "encoder reads the first 77 tokens)")
    return value


def _int(field: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, f"must be an integer, not {_short(value)}")
    if lo is not None and value < lo:
        raise invalid(field, f"must be at least {lo} (got {value})")
    if hi is not None and value > hi:
        raise invalid(field, f"must be at most {hi} (got {_short(value)})")
    return value


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _choice(field: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise invalid(field, f"must be one of {', '.join(choices)}, not {_short(value)}")
    return value.lower()


def decode_image(field: str, value, ctx: ModelContext, mode: str) -> Image.Image:
    """A base64 (or data: URL) PNG/JPEG/WebP, checked for size before its pixels are decoded."""
    if not isinstance(value, str):
        raise invalid(field, f"must be a base64-encoded image, not {_json_type(value)}")
    text = value.split(",", 1)[-1] if value.startswith("data:") else value
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > ctx.max_image_pixels:
            raise invalid(field, f"is {width}x{height}; at most {ctx.max_image_pixels:,} pixels")
        image.load()
        return image.convert(mode)
    except HttpError:
        raise
    except Exception as e:  # UnidentifiedImageError, OSError, DecompressionBombError, …
        raise invalid(field, f"is not a readable PNG/JPEG/WebP image ({type(e).__name__})") from None


# ---- LoRAs a request names ---------------------------------------------------------------------------------

_EXTRA_NETWORK = re.compile(r"<(\w+):[^>]*>")


def lora_names_check(field_name: str, names: Sequence[str], ctx: ModelContext) -> None:
    """Servers take LoRAs by name from their LoRA folder only (a name is never a path on the server)."""
    if not names:
        return
    if ctx.lora_dir is None:
        raise invalid(field_name, f"names a LoRA ({_short(names[0])}), but this server has no LoRA folder (start it "
                                  "with a LoRA folder to allow them)")
    available = lora.available(ctx.lora_dir)
    for name in names:
        if name not in available:
            listing = ", ".join(sorted(available)[:20]) or "none"
            raise invalid(field_name, f"no LoRA named {_short(name)} on this server; it has: {listing} "
                                      "(GET /sdapi/v1/loras)")


def confine_adapters(request: Request, ctx: ModelContext) -> None:
    """A Request that came over the network (Ray's JSON body): LoRAs by name from the server's folder only, no
    embedding files (the server's embeddings folder serves every prompt)."""
    try:
        names = [name for name, _ in lora.normalize_entries(request.adapters.loras)]
    except lora.LoraError as e:
        raise invalid("loras", str(e)) from None
    lora_names_check("loras", names, ctx)
    if request.prompt_group.embeddings:
        raise invalid("embeddings", "names files on the server, which a remote request cannot; the server's "
                                    "embeddings folder serves every prompt")


def lora_entries(field_name: str, value, ctx: ModelContext) -> list[list]:
    """OpenAI `loras`: ["NAME:SCALE", …] or [{"name": …, "scale": …}, …] → [[name, scale], …] (names checked)."""
    try:
        entries = lora.normalize_entries(value, field_name)
    except lora.LoraError as e:
        raise invalid(field_name, str(e)) from None
    lora_names_check(field_name, [name for name, _ in entries], ctx)
    return [[name, scale] for name, scale in entries]


def extra_networks(field_name: str, text: str, ctx: ModelContext, disabled) -> str:
    """A1111 prompt tags: `<lora:NAME:SCALE>` names a LoRA of the server's folder (the runtime applies it);
    `<hypernet:…>` must name one baked into the engines (the runtime checks); other networks are refused. With
    disable_extra_networks, A1111 drops every tag unapplied."""
    if disabled:
        return _EXTRA_NETWORK.sub("", text)
    kinds = {m.group(1).lower() for m in _EXTRA_NETWORK.finditer(text)} - {"lora", "lyco", "hypernet"}
    if kinds:
        raise invalid(field_name, f"holds a <{sorted(kinds)[0]}:…> extra network, which sdrt does not load (it loads "
                                  "<lora:NAME:SCALE>); remove it, or set disable_extra_networks: true to drop the tags")
    try:
        _, tags = strip_lora_tags(text)
    except TagError as e:
        raise invalid(field_name, str(e)) from None
    lora_names_check(field_name, [name for name, _ in tags], ctx)
    return text


# ---- what a POST asks for -------------------------------------------------------------------------------

@dataclass
class Plan:
    """One HTTP request as Requests for the service (A1111 n_iter: one per iteration), plus output options."""

    requests: list[Request]
    names: Mapping[str, str]  # runtime field → this route's name for it
    output_format: str = "png"
    quality: int | None = None
    raw: bool = False  # answer with the image bytes (Accept: image/…, n = 1)
    send_images: bool = True
    echo: dict = field(default_factory=dict)  # A1111 `parameters`
    img2img: bool = False
    stream: bool = False  # OpenAI `stream`: server-sent events, partial images then the finished one
    partial_images: int = 0

    def field(self, runtime_field: str | None) -> str | None:
        if runtime_field is None:
            return None
        if runtime_field.startswith(("controls[", "ip_adapters[")):  # controls[i].name|image|scale, as the body spells them
            return runtime_field
        head = runtime_field.split(".")[-1]
        return self.names.get(head, head)

    def invalid(self, e: InvalidRequest) -> HttpError:
        return invalid(self.field(e.field), e.message)


# ---- OpenAI Images --------------------------------------------------------------------------------------

OPENAI_FIELDS = ("model", "prompt", "n", "size", "response_format", "output_format", "output_compression", "user",
                 "stream", "partial_images", "negative_prompt", "steps", "num_inference_steps", "guidance_scale", "guidance_rescale",
                 "seed", "sampler", "schedule", "loras", "vae", "vae_tiling", "cache_interval", "controls",
                 "control_start", "control_end", "guess_mode", "control_preprocess", "ip_image", "ip_scale",
                 "ip_adapters", "adapter_name", "adapter_image", "adapter_scale")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
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
    flat: dict[str, Any] = {"prompt": _text("prompt", b["prompt"], ctx)}
    if "model" in b and b["model"] not in (ctx.name, "sdrt"):
        raise invalid("model", f"this server serves {ctx.name!r} (GET /v1/models), not {_short(b['model'])}")
    if "user" in b and not isinstance(b["user"], str):
        raise invalid("user", f"must be a string, not {_json_type(b['user'])}")
    stream = b.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream", f"must be true or false, not {_short(stream)}")
    partial = 0
    if "partial_images" in b:
        partial = _int("partial_images", b["partial_images"], 0, 3)
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
        quality = _int("output_compression", b["output_compression"], 0, 100)
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
                                  f"\"auto\", not {_short(size)}")
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
        flat["negative_prompt"] = _text("negative_prompt", b["negative_prompt"], ctx, allow_list=True)
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
        flat["ip_image"] = tuple(decode_image(f"ip_image[{i}]", x, ctx, "RGB") for i, x in enumerate(images)) \
            if isinstance(images, list) else decode_image("ip_image", images, ctx, "RGB")
    if "ip_adapters" in b:
        flat["ip_adapters"] = _ip_adapters(b["ip_adapters"], ctx)
    if "adapter_image" in b:  # a T2I-Adapter's condition image (runtime/conditioning/t2i_adapter.py converts it for the adapter)
        flat["adapter_image"] = decode_image("adapter_image", b["adapter_image"], ctx, "RGB")
    flat["seed"] = b.get("seed", -1)
    return Plan([_request(flat)], names, output_format=output, quality=quality, raw=media is not None, stream=stream,
                partial_images=partial)


def _ip_adapters(value, ctx: ModelContext) -> tuple:
    """`ip_adapters`: [{"name": …, "image": base64 or [base64, …], "scale": …}, …], FaceID {"name", "embeds": [[…]],
    "scale"} (runtime/conditioning/ip_adapter.py checks names, embeddings and scales)."""
    if not isinstance(value, list):
        raise invalid("ip_adapters", f"must be a list of {{name, image, scale}} objects, not {_json_type(value)}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise invalid(f"ip_adapters[{i}]", f"must be an object {{name, image, scale}}, not {_json_type(entry)}")
        if "image" not in entry:  # FaceID: {name, embeds, scale}
            out.append(entry)
            continue
        image = entry["image"]
        image = tuple(decode_image(f"ip_adapters[{i}].image[{j}]", x, ctx, "RGB") for j, x in enumerate(image)) \
            if isinstance(image, list) else decode_image(f"ip_adapters[{i}].image", image, ctx, "RGB")
        out.append(entry | {"image": image})
    return tuple(out)


def _controls(value, ctx: ModelContext) -> tuple:
    """`controls`: [{"name": …, "image": base64, "scale": …}, …] (runtime/conditioning/controlnet.py checks names and scales)."""
    if not isinstance(value, list):
        raise invalid("controls", f"must be a list of {{name, image, scale}} objects, not {_json_type(value)}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise invalid(f"controls[{i}]", f"must be an object {{name, image, scale}}, not {_json_type(entry)}")
        image = decode_image(f"controls[{i}].image", entry.get("image"), ctx, "RGB")
        out.append(entry | {"image": image})
    return tuple(out)


def _request(flat: dict) -> Request:
    try:
        return Request.from_dict(flat)
    except InvalidRequest as e:  # pragma: no cover - the keys are ours
        raise invalid(e.field, e.message) from None


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


# ---- AUTOMATIC1111 --------------------------------------------------------------------------------------

A1111_USED = ("prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "batch_size",
              "n_iter", "steps", "cfg_scale", "width", "height", "send_images")
A1111_IMG2IMG_USED = ("init_images", "denoising_strength", "mask", "inpainting_mask_invert", "include_init_images",
                      "outpaint")
# inpainting_fill with sdrt's `outpaint` extension: 0 "fill" (blurred colours), 1 "original", 2 "latent noise"
A1111_OUTPAINT_FILL = {0: "blur", 1: "edge", 2: "noise"}
_A1111_NAMES = {"guidance": "cfg_scale", "batch": "batch_size", "sampler": "sampler_name", "schedule": "scheduler",
                "strength": "denoising_strength", "init_image": "init_images", "request": "body"}
A1111_DEFAULTS = {"steps": 50, "cfg_scale": 7.0, "sampler": "Euler", "denoising_strength": 0.75}

# A1111 scheduler labels (and sdrt's schedule names) → sdrt's schedule; None: what the sampler name implies
A1111_SCHEDULERS = {"automatic": None, "karras": "karras", "exponential": "exponential", "sgm uniform": "sgm_uniform",
                    "simple": "simple", "beta": "beta", "default": "default"}


@dataclass(frozen=True)
class Neutral:
    accepts: str  # what sdrt accepts, in words (the 422 message and the docs)
    check: Callable[[Any, Mapping], bool]  # (value, the whole body) → accepted


def _is(*values) -> Callable[[Any, Mapping], bool]:
    """Accepts exactly these JSON values (1 and 1.0 alike; true is not 1)."""
    def check(v, body) -> bool:
        for x in values:
            if x is None or isinstance(x, bool):
                if v is x:
                    return True
            elif isinstance(x, (int, float)):
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v == x:
                    return True
            elif type(v) is type(x) and v == x:
                return True
        return False
    return check


def _any(v, body) -> bool:
    return True


def _bool_or_null(v, body) -> bool:
    return v is None or isinstance(v, bool)


def _unless(flag: str, inner=None) -> Callable[[Any, Mapping], bool]:
    """Any value while `flag` is off (the field then does nothing, in A1111 too), else `inner`."""
    return lambda v, body: not body.get(flag) or (inner is not None and inner(v, body))


def _with_mask(inner) -> Callable[[Any, Mapping], bool]:
    return lambda v, body: body.get("mask") is None or inner(v, body)


def _eta(v, body) -> bool:
    """eta as the sampler's registry entry allows it (DDIM 0; ancestral and SDE samplers 1, as sdrt runs them)."""
    if v is None:
        return True
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    name = body.get("sampler_name") or body.get("sampler_index") or A1111_DEFAULTS["sampler"]
    try:
        sampler, _ = sampler_registry.resolve(name) if isinstance(name, str) else ("euler", None)
    except Exception:  # the sampler's own error comes from validation
        return True
    return sampler_registry.get(sampler).accepts_eta(v)


def _override_settings(ctx_name: str) -> Callable[[Any, Mapping], bool]:
    def check(v, body) -> bool:
        if v is None or v == {}:
            return True
        return isinstance(v, dict) and set(v) == {"sd_model_checkpoint"} and \
            isinstance(v["sd_model_checkpoint"], str) and v["sd_model_checkpoint"].split(" [")[0] == ctx_name
    return check


_HIRES = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
          "hr_additional_modules", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg",
          "hr_distilled_cfg", "firstphase_width", "firstphase_height")


def a1111_neutral(model_name: str, img2img: bool) -> dict[str, Neutral]:
    """The fields A1111 clients send with defaults, and the values of them sdrt accepts."""
    table = {
        "restore_faces": Neutral("false or null (sdrt has no face restoration)", _is(False, None)),
        "tiling": Neutral("false or null (sdrt does not tile)", _is(False, None)),
        "styles": Neutral("[] or null (sdrt has no saved styles)", _is([], None)),
        "subseed": Neutral("anything while subseed_strength is 0 (no variation seeds)",
                           lambda v, body: not body.get("subseed_strength")),
        "subseed_strength": Neutral("0 or null (no variation seeds)", _is(0, None)),
        "seed_resize_from_h": Neutral("-1, 0 or null (no seed resize)", _is(-1, 0, None)),
        "seed_resize_from_w": Neutral("-1, 0 or null (no seed resize)", _is(-1, 0, None)),
        "do_not_save_samples": Neutral("true, false or null (sdrt never saves images on the server)", _bool_or_null),
        "do_not_save_grid": Neutral("true, false or null (sdrt never saves grids)", _bool_or_null),
        "save_images": Neutral("false or null (sdrt never saves images on the server)", _is(False, None)),
        "eta": Neutral("null; 0 for DDIM; 1 for ancestral and SDE samplers (sdrt's fixed eta); any value for "
                       "samplers without noise", _eta),
        "s_min_uncond": Neutral("0 or null", _is(0, None)),
        "s_churn": Neutral("0 or null (no churn)", _is(0, None)),
        "s_tmax": Neutral("0 or null", _is(0, None)),
        "s_tmin": Neutral("0 or null", _is(0, None)),
        "s_noise": Neutral("1 or null", _is(1, None)),
        "override_settings": Neutral(f"{{}}, null, or {{\"sd_model_checkpoint\": \"{model_name}\"}}",
                                     _override_settings(model_name)),
        "override_settings_restore_afterwards": Neutral("true, false or null (nothing is overridden)",
                                                        _bool_or_null),
        "refiner_checkpoint": Neutral("null, \"\" or \"None\" (no refiner)", _is(None, "", "None")),
        "refiner_switch_at": Neutral("anything while there is no refiner_checkpoint", _any),
        "disable_extra_networks": Neutral("true, false or null (true: extra-network tags are dropped unapplied)", _bool_or_null),
        "comments": Neutral("{} or null", _is({}, None)),
        "enable_hr": Neutral("false or null (sdrt has no hires fix)", _is(False, None)),
        "script_name": Neutral("null or \"\" (sdrt runs no scripts)", _is(None, "")),
        "script_args": Neutral("[] or null", _is([], None)),
        "alwayson_scripts": Neutral("{} or null", _is({}, None)),
        "force_task_id": Neutral("any string or null (sdrt has no progress endpoint to use it)",
                                 lambda v, body: v is None or isinstance(v, str)),
        "infotext": Neutral("null or \"\"", _is(None, "")),
    }
    for name in _HIRES:
        table[name] = Neutral("anything while enable_hr is false (hires fix does nothing then)", _unless("enable_hr"))
    if not img2img:
        table["denoising_strength"] = Neutral("anything while enable_hr is false (txt2img uses it only for hires "
                                              "fix)", _unless("enable_hr"))
        return table
    table |= {
        "resize_mode": Neutral("0 or null (\"Just resize\": the init image is resized to width x height)",
                               _is(0, None)),
        "image_cfg_scale": Neutral("null (no instruct-pix2pix)", _is(None)),
        "mask_blur": Neutral("0 or null with a mask (sdrt does not blur masks); anything without one (with outpaint: "
                             "the soft border)",
                             _with_mask(_is(0, None))),
        "mask_blur_x": Neutral("0 or null with a mask; anything without one", _with_mask(_is(0, None))),
        "mask_blur_y": Neutral("0 or null with a mask; anything without one", _with_mask(_is(0, None))),
        "mask_round": Neutral("true or null with a mask (sdrt binarizes masks at 0.5); anything without one",
                              _with_mask(_is(True, None))),
        "inpainting_fill": Neutral("1 (\"original\") or null with a mask; anything without one (with outpaint: 0, 1 "
                                   "or 2, the fill)",
                                   _with_mask(_is(1, None))),
        "inpaint_full_res": Neutral("false, 0 or null with a mask (\"whole picture\"); anything without one",
                                    _with_mask(_is(False, 0, None))),
        "inpaint_full_res_padding": Neutral("anything while inpaint_full_res is off",
                                            lambda v, body: body.get("mask") is None or
                                            not body.get("inpaint_full_res")),
        "initial_noise_multiplier": Neutral("1 or null", _is(1, None)),
        "latent_mask": Neutral("null", _is(None)),
    }
    return table


def a1111_plan(body: Mapping, ctx: ModelContext, img2img: bool) -> Plan:
    used = A1111_USED + (A1111_IMG2IMG_USED if img2img else ())
    neutral = a1111_neutral(ctx.name, img2img)
    unknown = [k for k in body if k not in used and k not in neutral]
    if unknown:
        route = "img2img" if img2img else "txt2img"
        raise invalid(unknown[0], f"is not an AUTOMATIC1111 {route} field sdrt knows (unknown: "
                                  f"{', '.join(unknown)}); GET /docs lists the accepted fields")
    refused = [k for k, rule in neutral.items() if k in body and not rule.check(body[k], body)]
    if refused:
        what = "; ".join(f"{k} = {_short(body[k])} (sdrt accepts {neutral[k].accepts})" for k in refused)
        raise invalid(refused[0], f"asks for what sdrt does not do: {what}")

    prompt = body.get("prompt")
    prompt = _text("prompt", "" if prompt is None else prompt, ctx)
    flat: dict[str, Any] = {"prompt": extra_networks("prompt", prompt, ctx, body.get("disable_extra_networks"))}
    names = dict(_A1111_NAMES)
    if body.get("negative_prompt") is not None:
        negative = _text("negative_prompt", body["negative_prompt"], ctx)
        flat["negative_prompt"] = extra_networks("negative_prompt", negative, ctx, body.get("disable_extra_networks"))
    batch = body.get("batch_size", 1)
    flat["batch"] = batch
    iterations = _int("n_iter", 1 if body.get("n_iter") is None else body["n_iter"], 1, ctx.max_iterations)
    flat["steps"] = A1111_DEFAULTS["steps"] if body.get("steps") is None else body["steps"]
    flat["guidance"] = A1111_DEFAULTS["cfg_scale"] if body.get("cfg_scale") is None else body["cfg_scale"]
    for key in ("width", "height"):
        if body.get(key) is not None:
            flat[key] = body[key]
    sampler = body.get("sampler_name") or None
    if sampler is None and body.get("sampler_index"):
        sampler, names["sampler"] = body["sampler_index"], "sampler_index"
    if sampler is not None and not isinstance(sampler, str):
        raise invalid(names["sampler"], f"must be a sampler name (GET /sdapi/v1/samplers), not {_short(sampler)}")
    flat["sampler"] = sampler or A1111_DEFAULTS["sampler"]
    scheduler = body.get("scheduler")
    if scheduler is not None:
        key = re.sub(r"[\s_\-]+", " ", scheduler.strip().lower()) if isinstance(scheduler, str) else None
        if key not in A1111_SCHEDULERS:
            raise invalid("scheduler", f"must be one of Automatic, Karras, Exponential, SGM Uniform, Simple, Beta "
                                       f"(GET /sdapi/v1/schedulers), not {_short(scheduler)}")
        flat["schedule"] = A1111_SCHEDULERS[key]
    send_images = body.get("send_images", True)
    if not isinstance(send_images, bool):
        raise invalid("send_images", f"must be true or false, not {_short(send_images)}")
    seed = -1 if body.get("seed") is None else _int("seed", body["seed"], -1, MAX_SEED)
    if isinstance(batch, bool) or not isinstance(batch, int):
        batch_count = None  # validation names batch_size
    else:
        batch_count = batch
    if seed == -1:
        seed = secrets.randbelow(2 ** 32)
    echo = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            raise invalid("init_images", "must be a list holding one base64 image (sdrt uses one init image for "
                                         f"the whole batch), not {_json_type(images) if not isinstance(images, list) else f'{len(images)} images'}")
        flat["init_image"] = decode_image("init_images", images[0], ctx, "RGB")
        strength = body.get("denoising_strength")
        flat["strength"] = A1111_DEFAULTS["denoising_strength"] if strength is None else strength
        if body.get("mask") is not None:
            mask = decode_image("mask", body["mask"], ctx, "L")
            invert = body.get("inpainting_mask_invert")
            if invert not in (None, 0, 1) or isinstance(invert, bool):
                raise invalid("inpainting_mask_invert", f"must be 0 or 1, not {_short(invert)}")
            flat["mask"] = ImageOps.invert(mask) if invert == 1 else mask
        if body.get("outpaint") is not None:
            flat["outpaint"] = _a1111_outpaint(body)
            _a1111_outpaint_size(flat)
        include = body.get("include_init_images")
        if include not in (None, True, False):
            raise invalid("include_init_images", f"must be true or false, not {_short(include)}")
        if include:
            echo = dict(body)
    requests = []
    step = batch_count if batch_count is not None else 1
    if seed + iterations * step - 1 > MAX_SEED:
        raise invalid("seed", f"image i uses seed + i; with {iterations * step} images the seed must be at most "
                              f"{MAX_SEED - iterations * step + 1}")
    for i in range(iterations):
        requests.append(_request({**flat, "seed": seed + i * step}))
    return Plan(requests, names, send_images=send_images, echo=echo, img2img=img2img)


def _a1111_outpaint(body: Mapping) -> dict:
    """sdrt's `outpaint` extension ({"left", "right", "top", "bottom"} pixels) with A1111's own fields where they
    map: inpainting_fill → the fill of the new area, mask_blur → the soft border (runtime/tasks/outpaint.py)."""
    spec = body["outpaint"]
    if not isinstance(spec, Mapping):
        raise invalid("outpaint", f"must be an object with left/right/top/bottom margins in pixels, not "
                                  f"{_json_type(spec)}")
    spec = dict(spec)
    fill = body.get("inpainting_fill")
    if fill is not None:
        if isinstance(fill, bool) or not isinstance(fill, int) or fill not in A1111_OUTPAINT_FILL:
            raise invalid("inpainting_fill", "with outpaint: 0 (fill: blurred edge), 1 (original: repeated edge) "
                                             f"or 2 (latent noise: noise), not {_short(fill)}")
        if "fill" in spec and spec["fill"] != A1111_OUTPAINT_FILL[fill]:
            raise invalid("inpainting_fill", f"asks for {A1111_OUTPAINT_FILL[fill]} but outpaint.fill is "
                                             f"{_short(spec['fill'])}; give one")
        spec["fill"] = A1111_OUTPAINT_FILL[fill]
    blur = body.get("mask_blur")
    if blur is not None:
        if "blur" in spec and spec["blur"] != blur:
            raise invalid("mask_blur", f"is {_short(blur)} but outpaint.blur is {_short(spec['blur'])}; give one")
        spec["blur"] = blur
    return spec


def _a1111_outpaint_size(flat: dict) -> None:
    """With outpaint the size is the extended canvas: width/height (which A1111 clients always send) may only
    repeat it, and are then left to the margins."""
    spec, (w, h) = flat["outpaint"], flat["init_image"].size
    sides = [spec.get(k, 0) for k in ("left", "right", "top", "bottom")]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in sides):
        canvas = {"width": w + sides[0] + sides[1], "height": h + sides[2] + sides[3]}
        for key, value in canvas.items():
            if key in flat and flat[key] != value:
                raise invalid(key, f"with outpaint the image is the extended canvas, {canvas['width']}x"
                                   f"{canvas['height']}; send that size or leave {key} out")
    flat.pop("width", None)
    flat.pop("height", None)


def a1111_response(plan: Plan, results, encoded: list[list[bytes]], model_name: str) -> dict:
    jobs = [r.job for r in results]
    first = jobs[0]
    seeds = [s for r in results for s in r.seeds]
    prompts = [p for j in jobs for p in j.prompt for _ in range(j.images_per_prompt)]
    negatives = [n for j in jobs for n in (j.negative_prompt or ("",) * len(j.prompt))
                 for _ in range(j.images_per_prompt)]
    infotexts = [r.parameters(i, model_name).a1111_text() for r in results for i in range(len(r.images))]
    info = {
        "prompt": prompts[0], "all_prompts": prompts, "negative_prompt": negatives[0],
        "all_negative_prompts": negatives, "seed": seeds[0], "all_seeds": seeds, "subseed": -1,
        "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": first.width, "height": first.height,
        "sampler_name": first.sampler_label, "scheduler": first.schedule, "cfg_scale": first.guidance,
        "steps": first.steps, "batch_size": first.count, "n_iter": len(jobs), "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model_name, "sd_model_hash": None, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": first.strength, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": first.mask is not None, "version": "sdrt",
    }
    images = [base64.b64encode(data).decode("ascii") for per in encoded for data in per] if plan.send_images else []
    return {"images": images, "parameters": plan.echo, "info": json.dumps(info)}


def a1111_samplers() -> list[dict]:
    """GET /sdapi/v1/samplers: every name `sampler_name` takes (A1111's, with schedule suffixes, and sdrt's)."""
    out = []
    for spec in sampler_registry.REGISTRY.values():
        names = sampler_registry.display_names(spec) or (spec.name,)
        for name in names:
            schedule = next((s for s in ("karras", "exponential") if name.lower().endswith(" " + s)), None)
            out.append({"name": name, "aliases": [spec.name] if name in spec.a1111 or name == spec.name else [],
                        "options": {"scheduler": schedule} if schedule else {}})
    return out


def a1111_schedulers() -> list[dict]:
    labels = {"automatic": "Automatic", "karras": "Karras", "exponential": "Exponential",
              "sgm uniform": "SGM Uniform", "simple": "Simple", "beta": "Beta"}
    return [{"name": (A1111_SCHEDULERS[k] or "automatic"), "label": label, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for k, label in labels.items()]


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


def encode_results(plan: Plan, results, model_name: str) -> list[list[bytes]]:
    """Each result's images as file bytes with the `parameters` metadata `sdrt run` writes (CPU work: run it off
    the event loop)."""
    if not plan.send_images:
        return [[] for _ in results]
    return [[image_io.image_bytes(image, r.parameters(i, model_name), plan.output_format, plan.quality)
             for i, image in enumerate(r.images)] for r in results]
