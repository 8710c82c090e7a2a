"""Body-field parsing shared by the HTTP dialects of `sdrt serve` (serve/openai.py, serve/a1111.py, serve/ray.py).

No I/O and no sampling here: a body becomes one or more `Request`s (runtime/request.py) in a `Plan`, which the
service validates (runtime/validate.py, the one validation); its `InvalidRequest(field, …)` comes back to the Plan
to be named the way the route's clients spell the field. The helpers here check what the body itself must get
right (JSON, prompt lengths, integers, images, LoRA names), each refusal a 422 naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.lora import files as lora_files, refs as lora_refs
from sdrt.runtime.request import Request
from sdrt.serve.errors import HttpError, invalid

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
        raise invalid("body", f"must be a JSON object, not {json_type(data)}")
    _check_strings(data)
    return data


def json_type(value) -> str:
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


def text(field: str, value, ctx: ModelContext, *, allow_list: bool = False) -> str | list[str]:
    """A prompt: a string (or, where allowed, a list of strings) of at most max_prompt_chars characters."""
    items = value if allow_list and isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, str):
            kind = "a string or a list of strings" if allow_list else "a string"
            raise invalid(field, f"must be {kind}, not {json_type(item)}")
        if len(item) > ctx.max_prompt_chars:
            raise invalid(field, f"is {len(item):,} characters long; at most {ctx.max_prompt_chars:,} (the text "
                                 "encoder reads the first 77 tokens)")
    return value


def integer(field: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, f"must be an integer, not {short(value)}")
    if lo is not None and value < lo:
        raise invalid(field, f"must be at least {lo} (got {value})")
    if hi is not None and value > hi:
        raise invalid(field, f"must be at most {hi} (got {short(value)})")
    return value


def short(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def decode_image(field: str, value, ctx: ModelContext, mode: str) -> Image.Image:
    """A base64 (or data: URL) PNG/JPEG/WebP, checked for size before its pixels are decoded."""
    if not isinstance(value, str):
        raise invalid(field, f"must be a base64-encoded image, not {json_type(value)}")
    text = value.split(",", 1)[-1] if value.startswith("data:") else value
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "is not valid base64") from None
    return open_image(field, data, ctx).convert(mode)


def open_image(field: str, data: bytes, ctx: ModelContext) -> Image.Image:
    """Image file bytes → the image in its own mode, its size checked before its pixels are decoded."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > ctx.max_image_pixels:
            raise invalid(field, f"is {width}x{height}; at most {ctx.max_image_pixels:,} pixels")
        image.load()
        return image
    except HttpError:
        raise
    except Exception as e:  # UnidentifiedImageError, OSError, DecompressionBombError, …
        raise invalid(field, f"is not a readable PNG/JPEG/WebP image ({type(e).__name__})") from None


# ---- LoRAs a request names ---------------------------------------------------------------------------------

def lora_names_check(field_name: str, names: Sequence[str], ctx: ModelContext) -> None:
    """Servers take LoRAs by name from their LoRA folder only (a name is never a path on the server)."""
    if not names:
        return
    if ctx.lora_dir is None:
        raise invalid(field_name, f"names a LoRA ({short(names[0])}), but this server has no LoRA folder (start it "
                                  "with a LoRA folder to allow them)")
    available = lora_refs.available(ctx.lora_dir)
    for name in names:
        if name not in available:
            listing = ", ".join(sorted(available)[:20]) or "none"
            raise invalid(field_name, f"no LoRA named {short(name)} on this server; it has: {listing} "
                                      "(GET /sdapi/v1/loras)")


def confine_adapters(request: Request, ctx: ModelContext) -> None:
    """A Request that came over the network (Ray's JSON body): LoRAs by name from the server's folder only, no
    embedding files (the server's embeddings folder serves every prompt)."""
    try:
        names = [name for name, _ in lora_files.normalize_entries(request.adapters.loras)]
    except lora_files.LoraError as e:
        raise invalid("loras", str(e)) from None
    lora_names_check("loras", names, ctx)
    if request.prompt_group.embeddings:
        raise invalid("embeddings", "names files on the server, which a remote request cannot; the server's "
                                    "embeddings folder serves every prompt")


def request_of(flat: dict) -> Request:
    """The dialect's flat runtime fields (runtime/request.py) as a Request."""
    try:
        return Request.from_dict(flat)
    except InvalidRequest as e:  # pragma: no cover - the keys are ours
        raise invalid(e.field, e.message) from None


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
