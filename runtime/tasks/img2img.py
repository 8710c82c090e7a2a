"""Image to image (diffusers StableDiffusion(XL)Img2ImgPipeline): the init image encoded (one posterior sample per
image), then noised to the first sigma of the strength window (flow matching: StableDiffusion3Img2ImgPipeline and
FluxImg2ImgPipeline, whose latents stay [N, C, h, w] here and are packed by runtime/denoiser/flux.py)."""

from __future__ import annotations

import torch

from sdrt.runtime import image_io
from sdrt.runtime.family import Family
from sdrt.runtime.samplers.schedules import Schedule
from sdrt.runtime.tasks.base import Common, Prepared

NAME = "img2img"
# the pipelines' __call__ defaults for `strength`: StableDiffusion(XL)Img2ImgPipeline 0.8, the SDXL refiner's 0.3,
# StableDiffusion3Img2Img/InpaintPipeline and FluxImg2Img/InpaintPipeline 0.6, SD inpainting 1.0
_FLOW_DEFAULT = {Family.SD3: 0.6, Family.FLUX: 0.6}


def applies(job, model_dir) -> bool:
    return job.init_image is not None and job.mask is None


def default_strength(family: Family, inpainting: bool) -> float:
    """The strength a request without one runs at: its diffusers pipeline's default."""
    if family in _FLOW_DEFAULT:
        return _FLOW_DEFAULT[family]
    return 1.0 if inpainting else 0.3 if family == Family.SDXL_REFINER else 0.8


def prepare(parts, job, common: Common, contributors=()) -> Prepared:
    image = image_io.to_tensor(job.init_image, job.width, job.height).to(parts.device)
    image_latents = parts.encode_image(image, common.generator, job.vae, job.tile_vae)
    drawn = parts.randn(common.shape, common.generator)
    return Prepared.of(noised(image_latents, drawn, common.schedule), common, contributors=list(contributors))


def noised(x0: torch.Tensor, noise: torch.Tensor, schedule: Schedule, index: int = 0) -> torch.Tensor:
    """x0 noised to the schedule's sigma s at `index` (0 past its end): x0 + s·noise in sigma space (diffusers'
    add_noise, read in sigma space); for flow matching s·noise + (1 - s)·x0 (FlowMatchEulerDiscreteScheduler.scale_noise,
    which the SD3/Flux img2img pipelines call at the first kept timestep and their inpaint loops at the next one),
    with s the float32 sigma as diffusers has it."""
    sigma = float(schedule.sigmas[index]) if index < len(schedule.sigmas) else 0.0
    if schedule.flow:
        s = torch.tensor(sigma, dtype=torch.float32)
        return s * noise + (1.0 - s) * x0
    return x0 + noise * sigma


def finish(job, images: list) -> list:
    return images
