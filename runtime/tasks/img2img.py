"""Image to image (diffusers StableDiffusion(XL)Img2ImgPipeline): the init image encoded (one posterior sample per
image), then noised to the first sigma of the strength window (flow matching: StableDiffusion3Img2ImgPipeline)."""

from __future__ import annotations

import torch

from sdrt.runtime import image_io
from sdrt.runtime.samplers.schedules import Schedule
from sdrt.runtime.tasks.base import Common, Prepared

NAME = "img2img"


def applies(job, model_dir) -> bool:
    return job.init_image is not None and job.mask is None


def prepare(parts, job, common: Common, contributors=()) -> Prepared:
    image = image_io.to_tensor(job.init_image, job.width, job.height).to(parts.device)
    image_latents = parts.encode_image(image, common.generator, job.vae, job.tile_vae)
    drawn = parts.randn(common.shape, common.generator)
    return Prepared.of(noised(image_latents, drawn, common.schedule), common, contributors=list(contributors))


def noised(x0: torch.Tensor, noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The start latent at the schedule's first sigma s: x0 + s·noise in sigma space (diffusers' add_noise, read in
    sigma space); for flow matching s·noise + (1 - s)·x0 (FlowMatchEulerDiscreteScheduler.scale_noise, which
    StableDiffusion3Img2ImgPipeline calls at the first kept timestep), with s the float32 sigma as diffusers has it."""
    if schedule.flow:
        s = torch.tensor(float(schedule.sigmas[0]), dtype=torch.float32)
        return s * noise + (1.0 - s) * x0
    return x0 + noise * float(schedule.sigmas[0])


def finish(job, images: list) -> list:
    return images
