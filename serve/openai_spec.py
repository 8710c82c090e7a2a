"""The OpenAI Images API's own fields, shared by POST /v1/images/generations, /edits and /variations: what each means
here (honoured, accepted without effect, or refused with 400 naming it), the multipart form the `openai` SDK sends
to edits and variations, and OpenAI's mask convention.

The field list and enums follow the SDK's types (openai/types/image_generate_params.py, image_edit_params.py,
image_create_variation_params.py). sdrt's own extension fields (steps, seed, sampler, …) are serve/openai.py's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from PIL import Image

from sdrt.serve import fields
from sdrt.serve.errors import invalid
from sdrt.serve.fields import ModelContext, Plan, open_image

OUTPUT_FORMATS = ("png", "jpeg", "webp")
QUALITIES = ("low", "medium", "high", "xhigh", "max", "auto", "standard", "hd")  # the SDK's enum; none has an effect
# accepted without effect: sdrt runs no moderation, has no DALL·E styles, plans nothing before sampling and weighs
# the input image by `strength`, not by a fidelity setting
NO_EFFECT = {"moderation": ("low", "auto"), "style": ("vivid", "natural"), "complexity": ("low", "medium", "high"),
             "input_fidelity": ("high", "low")}
TEXT_NO_EFFECT = ("user", "safety_identifier")  # end-user ids for OpenAI's abuse monitoring; sdrt keeps none
REFUSED = {  # fields whose every value asks for what sdrt cannot make
    "frame_count": "applies to GIF output, which sdrt does not make (output_format: png, jpeg or webp)",
    "frame_duration_ms": "applies to GIF output, which sdrt does not make (output_format: png, jpeg or webp)",
    "svg": "applies to SVG output, which sdrt does not make (output_format: png, jpeg or webp)",
    "markup": "(a guide overlay for GPT Image 2.5) has no Stable Diffusion counterpart; give a mask instead",
}
GENERATE_SPEC = ("prompt", "background", "complexity", "frame_count", "frame_duration_ms", "model", "moderation", "n",
                 "output_compression", "output_format", "partial_images", "quality", "response_format",
                 "safety_identifier", "size", "stream", "style", "svg", "user")
EDIT_SPEC = ("image", "mask", "prompt", "background", "complexity", "frame_count", "frame_duration_ms",
             "input_fidelity", "markup", "model", "n", "output_compression", "output_format", "partial_images",
             "quality", "response_format", "safety_identifier", "size", "stream", "svg", "user")
VARIATION_SPEC = ("image", "model", "n", "response_format", "size", "user")
_MEDIA = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
_SIZE = re.compile(r"^\s*(\d{1,7})\s*[xX×]\s*(\d{1,7})\s*$")


@dataclass
class OpenAIPlan(Plan):
    """A Plan with what OpenAI's answers report: the background, the quality asked for, the event names."""

    background: str = "opaque"  # Stable Diffusion's images have no alpha channel
    quality_asked: str = "auto"
    events: str = "image_generation"  # image_generation.* or image_edit.* stream events
    prompt: str = ""  # for `usage` (its CLIP tokens)


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


def choice(field: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise invalid(field, f"must be one of {', '.join(choices)}, not {fields.short(value)}")
    return value.lower()


def unknown_check(body: Mapping, known: Sequence[str]) -> None:
    unknown = [k for k in body if k not in known]
    if unknown:
        raise invalid(unknown[0], f"is not a field of this API (unknown: {', '.join(unknown)}); known: "
                                  f"{', '.join(known)}", code="unknown_parameter")


def spec_fields(b: Mapping, ctx: ModelContext, flat: dict, accept: str | None = None) -> dict:
    """Check the OpenAI fields of body `b` (None values already dropped), put n and size into `flat`, and return the
    OpenAIPlan's output options."""
    if "model" in b and b["model"] not in (ctx.name, "sdrt"):
        raise invalid("model", f"this server serves {ctx.name!r} (GET /v1/models), not {fields.short(b['model'])}")
    for name, message in REFUSED.items():
        if name in b:
            raise invalid(name, message, code="unsupported_parameter")
    for name in TEXT_NO_EFFECT:
        if name in b and not isinstance(b[name], str):
            raise invalid(name, f"must be a string, not {fields.json_type(b[name])}")
    for name, values in NO_EFFECT.items():
        if name in b:
            choice(name, b[name], values)
    quality = choice("quality", b.get("quality", "auto"), QUALITIES)
    background = choice("background", b.get("background", "auto"), ("transparent", "opaque", "auto"))
    if background == "transparent":
        raise invalid("background", "Stable Diffusion makes opaque images (no alpha channel); send opaque or auto",
                      code="unsupported_value")
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
    media = wanted_media(accept)
    if stream and b.get("n", 1) != 1:
        raise invalid("n", "stream: true sends one image; send n = 1")
    if stream and media is not None:
        raise invalid("stream", "streams server-sent events; accept text/event-stream or application/json")
    if b.get("response_format") == "url":
        raise invalid("response_format", "sdrt returns images inline; use b64_json (it stores no files to link to)",
                      code="unsupported_value")
    choice("response_format", b.get("response_format", "b64_json"), ("b64_json",))
    output = choice("output_format", b.get("output_format", "png"), OUTPUT_FORMATS + ("jpg",))
    output = "jpeg" if output == "jpg" else output
    compression = None
    if "output_compression" in b:
        compression = fields.integer("output_compression", b["output_compression"], 0, 100)
        if output == "png" and compression != 100:
            raise invalid("output_compression", "applies to jpeg and webp; PNG is lossless (give 100 or leave it "
                                                "out)")
    n = b.get("n", 1)
    flat["batch"] = n
    if media is not None:
        if "output_format" in b and output != media:
            raise invalid("output_format", f"is {output} but the Accept header asks for image/{media}")
        if n != 1:
            raise invalid("n", "an image/* Accept header returns one raw image; send n = 1, or accept "
                               "application/json for several")
        output = media
    if "size" in b and b["size"] != "auto":  # auto: the model's own size (generations) or the image's (edits)
        size = b["size"]
        match = _SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise invalid("size", f"must be \"WIDTHxHEIGHT\" (e.g. \"{ctx.default_size}x{ctx.default_size}\") or "
                                  f"\"auto\", not {fields.short(size)}")
        flat["width"], flat["height"] = int(match.group(1)), int(match.group(2))
    return {"output_format": output, "quality": compression, "raw": media is not None, "stream": stream,
            "partial_images": partial, "background": "opaque", "quality_asked": quality}


# ---- multipart forms (edits, variations) -----------------------------------------------------------------------

# multipart carries text: these fields are read as numbers or booleans; "" is what the SDK sends for None
FORM_INTEGERS = frozenset({"n", "output_compression", "partial_images", "frame_count", "frame_duration_ms", "steps",
                           "num_inference_steps", "seed", "cache_interval", "noise_level"})
FORM_NUMBERS = frozenset({"guidance_scale", "guidance_rescale", "strength"})
FORM_FILES = ("image", "mask", "markup")


def form_body(items: Sequence[tuple[str, Any]]) -> dict:
    """The (name, value) pairs of a multipart form as a body: `image` / `image[]` → a list of file bytes, `mask`
    and `markup` → bytes, `name[]` → a list, `svg[model]` → {"svg": {...}}, numbers and booleans parsed."""
    body: dict[str, Any] = {}
    for name, value in items:
        data = getattr(value, "file", None)
        if name.endswith("[]"):
            base = name[:-2]
        elif "[" in name and name.endswith("]"):  # svg[model]: a nested field; only its presence matters here
            base, _, key = name[:-1].partition("[")
            nested = body.setdefault(base, {})
            if not isinstance(nested, dict):
                raise invalid(base, "is given twice")
            nested[key] = value if data is None else "(a file)"
            continue
        else:
            base = name
        if data is not None:
            data.seek(0)
            value = data.read()
        elif base in FORM_FILES:
            raise invalid(base, "must be a file part of the multipart form (an image file), not a text field")
        if base == "image" or name.endswith("[]"):
            listed = body.setdefault(base, [])
            if not isinstance(listed, list):
                raise invalid(base, "is given twice")
            listed.append(value)
        elif base in body:
            raise invalid(base, "is given twice")
        else:
            body[base] = _form_value(base, value)
    return body


def _form_value(name: str, value):
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text == "":
        return None
    if name == "stream":
        if text.lower() not in ("true", "false"):
            raise invalid(name, f"must be true or false, not {fields.short(value)}")
        return text.lower() == "true"
    if name in FORM_INTEGERS:
        try:
            return int(text)
        except ValueError:
            raise invalid(name, f"must be an integer, not {fields.short(value)}") from None
    if name in FORM_NUMBERS:
        try:
            number = float(text)
        except ValueError:
            raise invalid(name, f"must be a number, not {fields.short(value)}") from None
        if not math.isfinite(number):
            raise invalid(name, f"must be a finite number, not {fields.short(value)}")
        return number
    return value


def image_file(field: str, data, ctx: ModelContext) -> Image.Image:
    """An uploaded PNG/JPEG/WebP in its own mode, checked for size before its pixels are decoded."""
    if not isinstance(data, bytes):
        raise invalid(field, "must be an image file part of the multipart form")
    return open_image(field, data, ctx)


def one_image(b: Mapping, ctx: ModelContext) -> Image.Image:
    """`image`: exactly one file. OpenAI's GPT image models compose several into one picture; Stable Diffusion's
    img2img and inpainting start from one image, so several are refused rather than silently dropped."""
    files = b.get("image")
    if not files:
        raise invalid("image", "is required: an image file", code="missing_required_parameter")
    if len(files) > 1:
        raise invalid("image", f"got {len(files)} images; sdrt edits one image (Stable Diffusion starts from one), "
                               "send one")
    return image_file("image", files[0], ctx)


def openai_mask(mask: Image.Image, image: Image.Image) -> Image.Image:
    """OpenAI's mask (a PNG whose fully transparent pixels, alpha 0, mark where to edit) → sdrt's ("L", white =
    repaint)."""
    if mask.size != image.size:
        raise invalid("mask", f"is {mask.width}x{mask.height}; it must be the image's size, "
                              f"{image.width}x{image.height}")
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise invalid("mask", "has no alpha channel; OpenAI's masks are PNGs whose fully transparent pixels (alpha 0) "
                              "mark where to edit")
    repaint = mask.convert("RGBA").getchannel("A").point(lambda a: 255 if a == 0 else 0)
    if repaint.getbbox() is None:
        raise invalid("mask", "has no fully transparent pixel (alpha 0), so it marks nothing to edit")
    return repaint
