"""Outpainting: extend the canvas of an init image, build the mask, and inpaint (runtime/pipeline.py's inpaint path).

The rule, which tests rebuild independently:
- canvas: (left + W + right) x (top + H + bottom); the original is pasted at (left, top). Margins are
  non-negative multiples of 8, at least one of them positive.
- fill of the new area: `edge` repeats the nearest border pixel (numpy.pad mode "edge"); `blur` is that edge
  fill blurred with PIL's GaussianBlur(radius 16), the original pixels kept; `noise` is uniform RGB noise
  `numpy.random.default_rng(seed).integers(0, 256, (H', W', 3), uint8)` (seed: the request's first seed).
- mask (L, white = repaint): 255 outside the original; with a soft border of B pixels it also covers a band of
  B pixels of the original along each extended side (the seam is repainted), and the decoded image is laid over
  the padded original through that mask blurred with GaussianBlur(radius B / 2), as diffusers'
  VaeImageProcessor.apply_overlay does (original where the blurred mask is 0, generated where it is 255).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdrt.runtime import fields
from sdrt.runtime.fields import MAX_SEED, InvalidRequest
from sdrt.runtime.limits import Limits
from sdrt.runtime.request import Request
from sdrt.runtime.tasks import inpaint
from sdrt.runtime.tasks.base import Common, Prepared

FILLS = ("edge", "blur", "noise")
SIDES = ("left", "right", "top", "bottom")
MARGIN_MULTIPLE = 8
BLUR_FILL_RADIUS = 16


class OutpaintError(ValueError):
    """A bad outpaint specification; the message says what would be right."""


@dataclass(frozen=True)
class Outpaint:
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    fill: str = "edge"
    blur: int = 0  # soft border in pixels (0: a hard mask, no overlay)

    def canvas(self, width: int, height: int) -> tuple[int, int]:
        return self.left + width + self.right, self.top + height + self.bottom


def parse(value) -> Outpaint:
    """An Outpaint from a mapping ({"left": 64, "fill": "edge", "blur": 8}) or the CLI's "left=64,top=8" text."""
    if isinstance(value, Outpaint):
        spec = value
    elif isinstance(value, str):
        items = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            m = re.fullmatch(r"(\w+)\s*=\s*(\S+)", part)
            if m is None:
                raise OutpaintError(f"expects SIDE=PIXELS pairs separated by commas (left=64,right=64,top=0,"
                                    f"bottom=32), not {part!r}")
            items[m.group(1)] = m.group(2)
        spec = _from_mapping({k: _int_text(k, v) if k in SIDES or k == "blur" else v for k, v in items.items()})
    elif isinstance(value, Mapping):
        spec = _from_mapping(value)
    else:
        raise OutpaintError(f"must be an object with left/right/top/bottom margins, not {type(value).__name__}")
    return check(spec)


def _int_text(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise OutpaintError(f"{key} must be a whole number of pixels, not {text!r}") from None


def _from_mapping(value: Mapping) -> Outpaint:
    known = SIDES + ("fill", "blur")
    unknown = [k for k in value if k not in known]
    if unknown:
        raise OutpaintError(f"{unknown[0]!r} is not an outpaint setting; known: {', '.join(known)}")
    return Outpaint(**value)


def check(spec: Outpaint) -> Outpaint:
    for side in SIDES + ("blur",):
        v = getattr(spec, side)
        if isinstance(v, bool) or not isinstance(v, int):
            raise OutpaintError(f"{side} must be a whole number of pixels, not {v!r}")
        if v < 0:
            raise OutpaintError(f"{side} must not be negative (got {v})")
    for side in SIDES:
        v = getattr(spec, side)
        if v % MARGIN_MULTIPLE:
            lower = v // MARGIN_MULTIPLE * MARGIN_MULTIPLE
            raise OutpaintError(f"{side} must be a multiple of {MARGIN_MULTIPLE} (got {v}; {lower or lower + 8} or "
                                f"{lower + 8} would do)")
    if not any(getattr(spec, s) for s in SIDES):
        raise OutpaintError("every margin is 0; give at least one of left, right, top, bottom")
    if spec.fill not in FILLS:
        raise OutpaintError(f"fill must be one of {', '.join(FILLS)}, not {spec.fill!r}")
    return spec


def padded_image(image: Image.Image, spec: Outpaint, seed: int) -> Image.Image:
    """The canvas [H', W'] with the original at (left, top) and the new area filled as `spec.fill` says."""
    rgb = np.asarray(image.convert("RGB"))
    pad = ((spec.top, spec.bottom), (spec.left, spec.right), (0, 0))
    canvas = np.pad(rgb, pad, mode="edge")
    if spec.fill == "blur":
        canvas = np.asarray(Image.fromarray(canvas).filter(ImageFilter.GaussianBlur(BLUR_FILL_RADIUS))).copy()
    elif spec.fill == "noise":
        canvas = np.random.default_rng(seed).integers(0, 256, canvas.shape, dtype=np.uint8)
    h, w = rgb.shape[:2]
    canvas[spec.top:spec.top + h, spec.left:spec.left + w] = rgb
    return Image.fromarray(canvas)


def mask(width: int, height: int, spec: Outpaint) -> Image.Image:
    """The inpainting mask over the canvas of a width x height original: 255 = repaint."""
    w, h = spec.canvas(width, height)
    band = {s: spec.blur if getattr(spec, s) else 0 for s in SIDES}
    out = np.full((h, w), 255, dtype=np.uint8)
    out[spec.top + band["top"]:spec.top + height - band["bottom"],
        spec.left + band["left"]:spec.left + width - band["right"]] = 0
    return Image.fromarray(out, mode="L")


def soft_mask(hard: Image.Image, spec: Outpaint) -> Image.Image | None:
    """The overlay mask for a soft border (None without one)."""
    return hard.filter(ImageFilter.GaussianBlur(spec.blur / 2)) if spec.blur else None


def overlay(generated: Image.Image, original: Image.Image, soft: Image.Image) -> Image.Image:
    """diffusers VaeImageProcessor.apply_overlay(mask, init_image, image) without crop: the original laid over the
    generated image through the inverted soft mask (premultiplied-alpha paste, then alpha_composite)."""
    masked = Image.new("RGBa", original.size)
    masked.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(soft.convert("L")))
    masked = masked.convert("RGBA")
    out = generated.convert("RGBA")
    out.alpha_composite(masked)
    return out.convert("RGB")


@dataclass(frozen=True)
class Outpainted:
    image: Image.Image  # the padded canvas (the init image of the inpainting job)
    mask: Image.Image
    soft: Image.Image | None  # overlay mask for a soft border

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def outpaint(image: Image.Image, spec: Outpaint, seed: int = 0) -> Outpainted:
    """(padded image, mask, overlay mask) for `image` extended by `spec`; the new size is `.size`."""
    width, height = image.size
    if spec.blur and spec.blur * 2 > min(width, height):
        raise OutpaintError(f"blur {spec.blur} is more than half the init image's smaller side ({min(width, height)} "
                            f"px); give at most {min(width, height) // 2}")
    hard = mask(width, height, spec)
    return Outpainted(padded_image(image, spec, seed), hard, soft_mask(hard, spec))


# ---- the task (runtime/tasks/base.py): inpainting on the extended canvas, then the soft border laid over --------

NAME = "outpaint"


def applies(job, model_dir) -> bool:
    return job.mask is not None and job.overlay is not None


def validate(request: Request, model_dir, limits: Limits) -> tuple[Request, dict]:
    """An outpainting request as the inpainting request it is (padded init image, mask, canvas size), and the
    soft border's overlay (runtime/tasks/outpaint.py); other requests unchanged."""
    images = request.images
    if images.outpaint is None:
        return request, {}
    try:
        spec = parse(images.outpaint)
    except OutpaintError as e:
        raise InvalidRequest("outpaint", str(e)) from None
    init = fields.image("init_image", images.init_image, "RGB")
    if init is None:
        raise InvalidRequest("outpaint", "needs an init image to extend")
    if images.mask is not None:
        raise InvalidRequest("mask", "outpainting builds its own mask; give a mask or outpaint margins, not both")
    size = request.size
    if size.width is not None or size.height is not None:
        raise InvalidRequest("width" if size.width is not None else "height",
                             "is set by the outpaint margins (init image plus margins); leave it out")
    width, height = spec.canvas(*init.size)
    multiple = model_dir.vae_scale_factor * model_dir.latent_multiple
    if width % multiple or height % multiple:
        raise InvalidRequest("outpaint", f"the extended canvas is {width}x{height}, not a multiple of {multiple} "
                                         f"for this model; the init image is {init.width}x{init.height}: crop or "
                                         f"resize it to a multiple of {multiple} first")
    if width * height > limits.max_pixels:
        raise InvalidRequest("outpaint", f"the extended canvas {width}x{height} is {width * height:,} pixels; at "
                                         f"most {limits.max_pixels:,} per image (Limits.max_pixels)")
    seed = fields.integer("seed", request.seeds.seed)
    if seed == -1:  # resolved here: the noise fill and the generation use the same seed
        seed = secrets.randbelow(MAX_SEED - limits.max_batch + 2)
        request = replace(request, seeds=replace(request.seeds, seed=seed))
    seed = fields.seeds(seed, 1)[0]  # range checked
    try:
        out = outpaint(init, spec, seed)
    except OutpaintError as e:
        raise InvalidRequest("outpaint", str(e)) from None
    request = replace(request, images=replace(images, init_image=out.image, mask=out.mask, outpaint=None),
                      size=replace(size, width=width, height=height))
    return request, {"overlay": None if out.soft is None else (out.image, out.soft)}


def prepare(parts, job, common: Common) -> Prepared:
    return inpaint.prepare(parts, job, common)


def finish(job, images: list) -> list:
    original, soft = job.overlay
    return [overlay(image, original, soft) for image in images]
