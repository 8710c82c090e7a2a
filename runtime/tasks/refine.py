"""SDXL base → refiner: the refiner continues from the latents the base handed over at denoising_end
(diffusers' `output_type="latent"` → `image=latents, denoising_start=…`)."""

from __future__ import annotations

import torch

from sdrt.runtime.tasks.base import Common, Prepared

NAME = "refine"


def applies(job, model_dir) -> bool:
    return job.init_latents is not None


def prepare(parts, job, common: Common) -> Prepared:
    n = common.shape[0]
    x = job.init_latents.to(parts.device, torch.float32).repeat_interleave(n // job.init_latents.shape[0], dim=0)
    return Prepared.of(x, common)


def finish(job, images: list) -> list:
    return images
