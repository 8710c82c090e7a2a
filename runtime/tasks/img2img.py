"""Image to image (diffusers StableDiffusion(XL)Img2ImgPipeline): the init image encoded (one posterior sample per
image), then noised to the first sigma of the strength window."""

from __future__ import annotations

from sdrt.runtime import image_io
from sdrt.runtime.tasks.base import Common, Prepared

NAME = "img2img"


def applies(job, model_dir) -> bool:
    return job.init_image is not None and job.mask is None


def prepare(parts, job, common: Common, contributors=()) -> Prepared:
    image = image_io.to_tensor(job.init_image, job.width, job.height).to(parts.device)
    image_latents = parts.encode_image(image, common.generator, job.vae, job.tile_vae)
    drawn = parts.randn(common.shape, common.generator)
    return Prepared.of(image_latents + drawn * float(common.schedule.sigmas[0]), common,
                       contributors=list(contributors))


def finish(job, images: list) -> list:
    return images
