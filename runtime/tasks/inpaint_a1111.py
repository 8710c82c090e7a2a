"""Inpainting as AUTOMATIC1111 does it (modules/processing.py StableDiffusionProcessingImg2Img.init, masking.py,
images.resize_image, apply_overlay): the mask binarized (> 128), optionally inverted, blurred; the masked area
filled; "only masked" crops the mask's box to the output's aspect and inpaints it at the output size; the result is
pasted back through the blurred mask. The request field is `inpaint` (runtime/request.py ImageInputs):

    Request.of(prompt=…, init_image=img, mask=m, strength=0.75,
               inpaint={"mask_blur": 4, "fill": "fill", "only_masked": True, "padding": 32, "invert": False})

The rules, written from A1111's source and rebuilt independently by the tests:
- mask: L, 255 where > 128 else 0; `invert` flips it; blur: a Gaussian of sigma `blur_x` along x, then `blur_y`
  along y, kernel 2·int(2.5σ + 0.5) + 1 taps, borders mirrored without repeating the edge (OpenCV's default).
- only masked: the box of the blurred mask's non-zero pixels, widened by `padding` (clipped to the image), then
  grown to the output's aspect (A1111 masking.expand_crop_region); image and mask cropped to it and resized to the
  output size ("resize and fill"); the generated image is resized back ("crop and resize") and pasted at the box.
  A blank mask turns the request into plain img2img, as A1111 does.
- whole picture: image and mask resized to the output size; the paste mask is the blurred mask doubled (clipped).
- fill (A1111 inpainting_fill): `fill` (0) replaces the masked pixels by the unmasked ones blurred at radii 256, 64,
  16, 4, 2, 0 and stacked; `original` (1) keeps them; `latent_noise` (2) puts the request's initial noise in the
  masked latents; `latent_nothing` (3) zeroes them.
- finish: the original (unmasked part) laid over the generated image through the paste mask (premultiplied alpha),
  so pixels the blurred mask leaves at 0 are the original's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdrt.runtime import fields
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.limits import Limits
from sdrt.runtime.request import Request
from sdrt.runtime.tasks import inpaint
from sdrt.runtime.tasks.base import Common, Prepared

NAME = "inpaint_a1111"
FILLS = ("fill", "original", "latent_noise", "latent_nothing")  # A1111 inpainting_fill 0, 1, 2, 3
_FILL_RADII = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # (GaussianBlur radius, times composited)


@dataclass(frozen=True)
class Inpaint:
    mask_blur: int | tuple[int, int] = 4  # pixels (sigma); (x, y) blurs the axes differently
    fill: str = "fill"
    only_masked: bool = True
    padding: int = 0  # pixels around the mask's box ("only masked")
    invert: bool = False

    @property
    def blur_xy(self) -> tuple[int, int]:
        return self.mask_blur if isinstance(self.mask_blur, tuple) else (self.mask_blur, self.mask_blur)


def parse(value) -> Inpaint:
    """An Inpaint from itself or a mapping; InvalidRequest naming `inpaint.KEY` otherwise."""
    if isinstance(value, Inpaint):
        spec = value
    elif isinstance(value, Mapping):
        known = ("mask_blur", "fill", "only_masked", "padding", "invert")
        for key in value:
            if key not in known:
                raise InvalidRequest(f"inpaint.{key}", f"is not an inpaint setting; known: {', '.join(known)}")
        spec = Inpaint(**{k: tuple(v) if k == "mask_blur" and isinstance(v, list) else v for k, v in value.items()})
    else:
        raise InvalidRequest("inpaint", f"must be an object of inpaint settings, not {type(value).__name__}")
    blur = spec.blur_xy
    if len(blur) != 2:
        raise InvalidRequest("inpaint.mask_blur", f"must be pixels or [x, y] pixels, not {spec.mask_blur!r}")
    for v in blur:
        fields.integer("inpaint.mask_blur", v, 0, 256)
    fields.integer("inpaint.padding", spec.padding, 0, 4096)
    if spec.fill not in FILLS:
        raise InvalidRequest("inpaint.fill", f"must be one of {', '.join(FILLS)}, not {spec.fill!r}")
    for key in ("only_masked", "invert"):
        if not isinstance(getattr(spec, key), bool):
            raise InvalidRequest(f"inpaint.{key}", f"must be true or false, not {getattr(spec, key)!r}")
    return spec


# ---- the image arithmetic (pure) -------------------------------------------------------------------------------

def binary_mask(mask: Image.Image) -> Image.Image:
    """A1111 create_binary_mask: grey levels above 128 → 255, others 0."""
    return mask.convert("L").point(lambda v: 255 if v > 128 else 0)


def _gaussian_1d(array: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    taps = 2 * int(2.5 * sigma + 0.5) + 1
    r = taps // 2
    x = np.arange(taps, dtype=np.float64) - r
    kernel = np.exp(-(x * x) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    pad = [(0, 0)] * array.ndim
    pad[axis] = (r, r)
    padded = np.pad(array.astype(np.float64), pad, mode="reflect")  # OpenCV BORDER_REFLECT_101
    n = array.shape[axis]
    out = np.zeros(array.shape, dtype=np.float64)
    for i, w in enumerate(kernel):
        out += w * np.take(padded, np.arange(i, i + n), axis=axis)
    return out


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """A1111's mask blur: cv2.GaussianBlur along x with sigma blur_x, then along y (each rounded to uint8)."""
    array = np.asarray(mask.convert("L"))
    if blur_x > 0:
        array = np.clip(np.round(_gaussian_1d(array, blur_x, 1)), 0, 255).astype(np.uint8)
    if blur_y > 0:
        array = np.clip(np.round(_gaussian_1d(array, blur_y, 0)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array), mode="L")


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) of the mask's non-zero pixels widened by `padding`, clipped; None if blank."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    w, h = mask.size
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, w), min(y2 + padding, h)


def expand_crop_region(box, width: int, height: int, image_width: int, image_height: int):
    """The box grown along one axis to the aspect width:height, shifted back inside the image (A1111
    masking.expand_crop_region, including its integer rounding)."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _grow(y1, y2, grow, image_height)
    else:
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _grow(x1, x2, grow, image_width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    lo, hi = lo - grow // 2, hi + grow - grow // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111 images.resize_image without an upscaler (Lanczos): 0 just resize; 1 crop and resize (cover, centred);
    2 resize and fill (fit, centred, the borders stretched from the edge rows/columns). Modes 1, 2 answer RGB."""
    if mode == 0:
        return image.resize((width, height), resample=Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    cover = mode == 1
    wide = ratio > src_ratio if cover else ratio < src_ratio
    src_w = width if wide else image.width * height // image.height
    src_h = height if not wide else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2:
        if ratio < src_ratio:
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                          box=(0, fill + src_h))
        elif ratio > src_ratio:
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill + src_w, 0))
    return out


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 masking.fill: the masked pixels replaced by the unmasked ones blurred at decreasing radii, stacked."""
    out = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, times in _FILL_RADII:
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def overlay_of(image: Image.Image, paste_mask: Image.Image) -> Image.Image:
    """The original where the paste mask is 0, transparent where it is 255 (premultiplied, as A1111)."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(paste_mask.convert("L")))
    return kept.convert("RGBA")


def apply_overlay(generated: Image.Image, paste_to, overlay: Image.Image) -> Image.Image:
    """A1111 apply_overlay: the generated image (resized into the box `paste_to` = (x, y, w, h) on a transparent
    canvas of the overlay's size, when only the masked area was inpainted), the overlay composited over it."""
    if paste_to is not None:
        x, y, w, h = paste_to
        canvas = Image.new("RGBA", overlay.size)
        canvas.paste(resize_image(1, generated, w, h), (x, y))
        generated = canvas
    out = generated.convert("RGBA")
    out.alpha_composite(overlay)
    return out.convert("RGB")


@dataclass(frozen=True)
class Inputs:
    """The inpainting inputs at the output size, and what `finish` pastes back."""

    image: Image.Image  # the init image to encode (filled when fill is "fill")
    mask: Image.Image | None  # L, blurred; None: a blank mask with only_masked, which runs as plain img2img
    overlay: Image.Image | None  # RGBA at the original's size (only masked) or the output size (whole picture)
    paste_to: tuple[int, int, int, int] | None  # (x, y, w, h) of the crop in the original


def prepare_inputs(image: Image.Image, mask: Image.Image, width: int, height: int, spec: Inpaint) -> Inputs:
    """What A1111's img2img init makes of an init image and a mask for a width x height generation."""
    image = image.convert("RGB")
    mask = binary_mask(mask)
    if mask.size != image.size:
        mask = mask.resize(image.size, resample=Image.Resampling.LANCZOS)
    if spec.invert:
        mask = ImageOps.invert(mask)
    mask = blur_mask(mask, *spec.blur_xy)
    paste_to = None
    if spec.only_masked:
        box = crop_region(mask, spec.padding)
        if box is None:  # A1111: "Unable to perform Inpaint Only mask because mask is blank, switch to img2img"
            return Inputs(image, None, None, None)
        box = expand_crop_region(box, width, height, *mask.size)
        x1, y1, x2, y2 = box
        paste_mask = mask
        mask = resize_image(2, mask.crop(box), width, height).convert("L")
        overlay = overlay_of(image, paste_mask)
        image = resize_image(2, image.crop(box), width, height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
    else:
        mask = resize_image(0, mask, width, height)
        image = resize_image(0, image, width, height)
        doubled = np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        overlay = overlay_of(image, Image.fromarray(doubled, mode="L"))
    if spec.fill == "fill":
        image = fill(image, mask)
    return Inputs(image, mask, overlay, paste_to)


@dataclass(frozen=True)
class Finish:
    """A Job's record (Job.a1111_inpaint): the latent fill, and the overlay to paste through."""

    fill: str
    overlay: Image.Image
    paste_to: tuple[int, int, int, int] | None


def latent_fill(kind: str):
    """A1111's latent fills (inpainting_fill 2, 3) as inpaint.prepare's `fill_latents(latents, mask, noise)`."""
    if kind == "latent_noise":
        return lambda latents, mask, noise: latents * (1 - mask) + noise * mask
    if kind == "latent_nothing":
        return lambda latents, mask, noise: latents * (1 - mask)
    return None


# ---- the task (runtime/tasks/base.py) ----------------------------------------------------------------------------

def applies(job, model_dir) -> bool:
    return job.mask is not None and job.a1111_inpaint is not None


def validate(request: Request, model_dir, limits: Limits) -> tuple[Request, dict]:
    """A request with `inpaint` settings as the inpainting request A1111 would run (image and mask at the output
    size) plus the Finish record; other requests unchanged."""
    images = request.images
    if images.inpaint is None:
        return request, {}
    spec = parse(images.inpaint)
    init = fields.image("init_image", images.init_image, "RGB")
    mask = fields.image("mask", images.mask, "L")
    if init is None or mask is None:
        raise InvalidRequest("inpaint" if init is not None else "init_image",
                             "inpainting settings need an init image and a mask")
    if images.outpaint is not None:
        raise InvalidRequest("inpaint", "outpainting builds its own mask; give inpaint settings or outpaint margins")
    multiple = model_dir.vae_scale_factor * model_dir.latent_multiple
    size = request.size
    width = fields.integer("width", size.width, 1) if size.width is not None else \
        max(init.width // multiple * multiple, multiple)
    height = fields.integer("height", size.height, 1) if size.height is not None else \
        max(init.height // multiple * multiple, multiple)
    out = prepare_inputs(init, mask, width, height, spec)
    request = replace(request, images=replace(images, init_image=out.image, mask=out.mask, inpaint=None),
                      size=replace(size, width=width, height=height))
    finish_record = None if out.mask is None else Finish(spec.fill, out.overlay, out.paste_to)
    return request, {"a1111_inpaint": finish_record}


def prepare(parts, job, common: Common) -> Prepared:
    return inpaint.prepare(parts, job, common, fill_latents=latent_fill(job.a1111_inpaint.fill))


def finish(job, images: list) -> list:
    record = job.a1111_inpaint
    return [apply_overlay(image, record.paste_to, record.overlay) for image in images]

