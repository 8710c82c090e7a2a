"""The ×4 upscaler's own parts (diffusers StableDiffusionUpscalePipeline): the low-resolution image, its noising
with the pipeline's `low_res_scheduler` (DDPM) at `noise_level`, and the noise level as the UNet's class label.

The UNet runs at the low-resolution size (latents [N, 4, h, w] ‖ noised image [N, 3, h, w]: 7 channels) and the
VAE (scale factor 4) decodes to 4h x 4w.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sdrt.runtime.samplers import schedules

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
