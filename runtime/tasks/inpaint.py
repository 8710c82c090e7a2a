"""Inpainting (diffusers StableDiffusion(XL)InpaintPipeline): 9-channel inpainting UNets take the mask and the masked
image's latents as extra input channels; ordinary 4-channel UNets re-impose the noised original outside the mask
after every step. The flow-matching transformers (StableDiffusion3InpaintPipeline, FluxInpaintPipeline with its
4·16-channel transformer) inpaint as the 4-channel UNets do, noised by scale_noise (runtime/tasks/img2img.noised);
their draws come in the same order: the image's posterior, the noise, the masked image's posterior."""

from __future__ import annotations

import torch

from sdrt.runtime import image_io
from sdrt.runtime.denoiser.call import ExtraChannels
from sdrt.runtime.samplers import classic
from sdrt.runtime.tasks import img2img
from sdrt.runtime.tasks.base import Common, Prepared

NAME = "inpaint"


def applies(job, model_dir) -> bool:
    return job.mask is not None


def prepare(parts, job, common: Common, fill_latents=None) -> Prepared:
    """`fill_latents(image_latents, latent_mask, noise)`: a change to the init latents under the mask (AUTOMATIC1111's
    latent fills, runtime/tasks/inpaint_a1111.py), made before the first latents are."""
    # diffusers StableDiffusionInpaintPipeline: prepare_latents, then prepare_mask_latents (both draw RNG).
    # Each image samples its own posteriors with its own generator: for one image that is diffusers' draw;
    # diffusers' batches sample the shared encodings with generator[0] only, which would tie image i to seed s.
    n, _, h, w = common.shape
    schedule, guidance, generator = common.schedule, common.guidance, common.generator
    image = image_io.to_tensor(job.init_image, job.width, job.height).to(parts.device)
    mask = image_io.mask_to_tensor(job.mask, image.shape[-1], image.shape[-2]).to(parts.device)
    masked_image = image * (mask < 0.5)
    strength = img2img.default_strength(parts.dir.info.family, True) if job.strength is None else job.strength
    nine_channel = parts.dir.info.inpaint
    image_latents = None
    if not nine_channel or strength < 1.0:
        image_latents = parts.encode_image(image, generator, job.vae, job.tile_vae)
    drawn = parts.randn(common.shape, generator)
    latent_mask = torch.nn.functional.interpolate(mask, size=(h, w)).repeat(n, 1, 1, 1)
    if fill_latents is not None and image_latents is not None:
        image_latents = fill_latents(image_latents, latent_mask, drawn)
    if strength >= 1.0:
        x = classic.initial_latents(drawn, schedule)
    else:
        x = img2img.noised(image_latents, drawn, schedule)
    masked_latents = parts.encode_image(masked_image, generator, job.vae, job.tile_vae)
    if nine_channel:
        extra = guidance.batch(torch.cat([latent_mask, masked_latents], dim=1))
        return Prepared.of(x, common, contributors=[ExtraChannels(extra)])
    return Prepared.of(x, common, after_step=_blend(latent_mask, image_latents, drawn, schedule))


def _blend(mask: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor, schedule):
    """Ordinary (4-channel) UNets inpaint by re-imposing the noised original outside the mask each step."""
    def after_step(x: torch.Tensor, i: int) -> torch.Tensor:
        proper = img2img.noised(image_latents, noise, schedule, i + 1)  # at the next sigma; the image itself at the end
        return (1 - mask) * proper + mask * x
    return after_step


def finish(job, images: list) -> list:
    return images
