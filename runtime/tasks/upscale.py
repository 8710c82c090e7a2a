"""The ×4 upscaler's own parts (diffusers StableDiffusionUpscalePipeline): the low-resolution image, its noising
with the pipeline's `low_res_scheduler` (DDPM) at `noise_level`, and the noise level as the UNet's class label.

The UNet runs at the low-resolution size (latents [N, 4, h, w] ‖ noised image [N, 3, h, w]: 7 channels) and the
VAE (scale factor 4) decodes to 4h x 4w.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from sdrt.runtime import fields, image_io
from sdrt.runtime.denoiser.call import ClassLabels, ExtraChannels
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.limits import Limits
from sdrt.runtime.request import Request
from sdrt.runtime.samplers import classic
from sdrt.runtime.samplers import schedules
from sdrt.runtime.tasks.base import Common, Prepared

DEFAULT_NOISE_LEVEL = 20  # StableDiffusionUpscalePipeline.__call__'s default
DEFAULT_MAX_NOISE_LEVEL = 350  # its register_to_config default


def low_res_image(image: Image.Image, factor: int) -> Image.Image:
    """diffusers' VaeImageProcessor(vae_scale_factor=factor, resample="bicubic").preprocess size rule: each side
    rounded down to a multiple of `factor`, bicubic resize only when that changes it."""
    w, h = (x - x % factor for x in image.size)
    image = image.convert("RGB")
    return image if (w, h) == image.size else image.resize((w, h), resample=Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class LowResNoise:
    """The low_res_scheduler's abar_t (float32 [T]) and the largest noise level the model accepts."""
    alphas_cumprod: torch.Tensor
    max_noise_level: int

    @classmethod
    def of(cls, engine_dir) -> "LowResNoise":
        path = Path(engine_dir.path) / "low_res_scheduler" / "scheduler_config.json"
        config = schedules.SchedulerConfig.from_diffusers_json(json.loads(path.read_text(encoding="utf-8")))
        abar = schedules.alphas_cumprod(config, "ddim")  # the DDPM betas → cumprod(1 - beta), float32
        top = int(engine_dir.model_index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL))
        return cls(abar, min(top, len(abar) - 1))

    def add_noise(self, image: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
        """DDPMScheduler.add_noise(image, noise, noise_level): √ᾱ·x + √(1 − ᾱ)·ε, float32."""
        abar = self.alphas_cumprod[level]
        return abar ** 0.5 * image + (1 - abar) ** 0.5 * noise


def class_labels(level: int, batch: int) -> torch.Tensor:
    """The UNet's class_labels: the noise level for every row of the (guidance-batched) batch, int64 [B(·2)]."""
    return torch.full((batch,), int(level), dtype=torch.int64)


# ---- the task (runtime/tasks/base.py) ---------------------------------------------------------------------

NAME = "upscale"


def applies(job, model_dir) -> bool:
    return job.low_res_image is not None


def validate(request: Request, model_dir, limits: Limits) -> tuple[Request, dict]:
    """For the ×4 upscaler: its low-resolution image (taken out of init_image, so nothing treats the request as
    img2img), the output size (4× that image) and the noise level; other models refuse a noise level."""
    images, info = request.images, model_dir.info
    if not info.upscaler:
        if images.noise_level is not None and not info.unclip:
            raise InvalidRequest("noise_level", f"applies to the ×4 upscaler and unCLIP variations only; this is a "
                                                f"{info.family.value} model ({info.pipeline_class})")
        return request, {}
    image = fields.image("init_image", images.init_image, "RGB")
    if image is None:
        raise InvalidRequest("init_image", "this is a ×4 upscaler: give the low-resolution image to upscale")
    for name in ("mask", "strength"):
        if getattr(images, name) is not None:
            raise InvalidRequest(name, "the ×4 upscaler takes no " + ("mask" if name == "mask" else
                                       "strength (it always starts from noise at the low-resolution size)"))
    size = request.size
    if size.width is not None or size.height is not None:
        raise InvalidRequest("width" if size.width is not None else "height",
                             "is 4× the low-resolution image's for the ×4 upscaler; leave it out")
    noise = LowResNoise.of(model_dir)
    level = DEFAULT_NOISE_LEVEL if images.noise_level is None else \
        fields.integer("noise_level", images.noise_level, 0, noise.max_noise_level,
             " (the model's max_noise_level, within its low-resolution scheduler's timesteps)")
    f = model_dir.vae_scale_factor
    low = low_res_image(image, f)
    width, height = low.width * f, low.height * f
    if width * height > limits.max_pixels:
        raise InvalidRequest("init_image", f"is {image.width}x{image.height}; upscaled ×{f} it would be {width}x"
                                           f"{height} = {width * height:,} pixels, more than {limits.max_pixels:,} "
                                           "(Limits.max_pixels); give a smaller image")
    request = replace(request, images=replace(images, init_image=None, noise_level=None),
                      size=replace(size, width=width, height=height))
    return request, {"low_res_image": low, "noise_level": level}


def prepare(parts, job, common: Common) -> Prepared:
    # diffusers StableDiffusionUpscalePipeline.__call__: the low-resolution image noised by low_res_scheduler
    # at noise_level (one draw), then prepare_latents (one draw); each image draws both with its own generator
    # (diffusers' batches noise the shared image with generator[0] only, which would tie image i to seed s).
    n = common.shape[0]
    guidance, generator = common.guidance, common.generator
    low = job.low_res_image
    image = image_io.to_tensor(low, low.width, low.height).to(parts.device)  # [1, 3, h, w] in [-1, 1]
    drawn = parts.randn((n, *image.shape[1:]), generator)
    noised = LowResNoise.of(parts.dir).add_noise(image, drawn, job.noise_level)  # [N, 3, h, w]
    x = classic.initial_latents(parts.randn(common.shape, generator), common.schedule)
    extra = guidance.batch(noised)
    labels = class_labels(job.noise_level, extra.shape[0])
    return Prepared.of(x, common, contributors=[ExtraChannels(extra), ClassLabels(labels)])


def finish(job, images: list) -> list:
    return images
