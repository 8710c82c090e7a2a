"""unCLIP image variations' own parts (diffusers StableUnCLIPImg2ImgPipeline), without transformers or diffusers.

The image is fed to the exported CLIP image encoder (image_encoder/model.onnx) as its CLIPImageProcessor feeds it
(shortest edge resized, centre crop, rescale, normalise); the embedding is noised at `noise_level`
(`noise_image_embeddings`: normalised by the StableUnCLIPImageNormalizer's mean/std, DDPM add_noise with the
pipeline's image_noising_scheduler, un-normalised) and joined by the noise level's sinusoidal embedding; that
[image embedding ‖ noise-level embedding] is the UNet's class label (zeros for the unconditional half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdrt.runtime import fields
from sdrt.runtime.conditioning.image_processors import ClipInput, read_config
from sdrt.runtime.denoiser import feed
from sdrt.runtime.denoiser.call import ClassLabels
from sdrt.runtime.errors import UserError
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.limits import Limits
from sdrt.runtime.request import Request
from sdrt.runtime.samplers import classic, noise
from sdrt.runtime.samplers import schedules
from sdrt.runtime.tasks.base import Common, Prepared

DEFAULT_NOISE_LEVEL = 0  # StableUnCLIPImg2ImgPipeline.__call__'s default


def timestep_embedding(levels: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """diffusers get_timestep_embedding(levels, dim, flip_sin_to_cos=True, downscale_freq_shift=0): [B] → [B, dim]."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half
    emb = levels[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)  # sin ‖ cos, flipped
    return torch.nn.functional.pad(emb, (0, 1, 0, 0)) if dim % 2 else emb


@dataclass(frozen=True)
class EmbeddingNoise:
    """The image normaliser's mean/std [1, D] and the image-noising scheduler's abar_t (float32 [T])."""
    mean: torch.Tensor
    std: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def max_noise_level(self) -> int:
        return len(self.alphas_cumprod) - 1

    @classmethod
    def of(cls, engine_dir: Path) -> "EmbeddingNoise":
        from safetensors.torch import load_file

        path = Path(engine_dir) / "image_normalizer" / "diffusion_pytorch_model.safetensors"
        try:
            weights = load_file(str(path))
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is missing or damaged ({e}); re-export the engine directory") from None
        config = schedules.SchedulerConfig.from_diffusers_json(
            read_config(Path(engine_dir) / "image_noising_scheduler" / "scheduler_config.json"))
        return cls(weights["mean"].float(), weights["std"].float(), schedules.alphas_cumprod(config, "ddim"))

    @classmethod
    def levels(cls, engine_dir: Path) -> int:
        """The largest noise level (the image-noising scheduler's last timestep), read without the weights."""
        cfg = read_config(Path(engine_dir) / "image_noising_scheduler" / "scheduler_config.json")
        return int(cfg.get("num_train_timesteps", 1000)) - 1

    def noised(self, embeds: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
        """noise_image_embeddings: embeds [1 or N, D], noise [N, D] → [N, 2D] = unscale(add_noise(scale(e), ε, level)) ‖ embedding(level)."""
        scaled = (embeds - self.mean) * 1.0 / self.std
        abar = self.alphas_cumprod[level]
        noisy = abar ** 0.5 * scaled + (1 - abar) ** 0.5 * noise
        unscaled = noisy * self.std + self.mean
        levels = torch.full((unscaled.shape[0],), int(level), dtype=torch.int64)
        return torch.cat([unscaled, timestep_embedding(levels, unscaled.shape[-1])], dim=1)


# ---- the task (runtime/tasks/base.py) ---------------------------------------------------------------------

NAME = "unclip"


def applies(job, model_dir) -> bool:
    return job.variation_image is not None


def validate(request: Request, model_dir, limits: Limits) -> tuple[Request, dict]:
    """For unCLIP image variations: the image to vary (taken out of init_image: the size is the model's unless
    given, as diffusers) and the embedding's noise level."""
    images = request.images
    if not model_dir.info.unclip:
        return request, {}
    image = fields.image("init_image", images.init_image, "RGB")
    if image is None:
        raise InvalidRequest("init_image", "this is an unCLIP model: give the image to make variations of")
    for name in ("mask", "strength"):
        if getattr(images, name) is not None:
            raise InvalidRequest(name, "unCLIP variations take no " + ("mask" if name == "mask" else
                                       "strength (they start from noise; the image enters as an embedding)"))
    top = EmbeddingNoise.levels(model_dir.path)
    level = DEFAULT_NOISE_LEVEL if images.noise_level is None else \
        fields.integer("noise_level", images.noise_level, 0, top, " (the image-noising scheduler's last timestep)")
    return replace(request, images=replace(images, init_image=None, noise_level=None)), \
        {"variation_image": image, "noise_level": level}


def prepare(parts, job, common: Common) -> Prepared:
    # diffusers StableUnCLIPImg2ImgPipeline: _encode_image → noise_image_embeddings (one draw), then
    # prepare_latents (one draw); each image draws both with its own generator (diffusers' batches noise the
    # one embedding with generator[0] only). Unconditional class labels are zeros, as diffusers.
    n = common.shape[0]
    guidance, generator = common.guidance, common.generator
    pixels = ClipInput.of(parts.dir.path / "image_encoder").tensor(job.variation_image)
    embeds = feed.run(parts.component("image_encoder"), pixel_values=pixels)["image_embeds"].cpu()  # [1, D]
    drawn = noise.randn((n, embeds.shape[-1]), generator)  # [N, D], CPU as diffusers' generators
    labels = EmbeddingNoise.of(parts.dir.path).noised(embeds, drawn, job.noise_level)  # [N, 2D]
    if guidance.enabled:
        labels = torch.cat([torch.zeros_like(labels), labels])
    x = classic.initial_latents(parts.randn(common.shape, generator), common.schedule)
    return Prepared.of(x, common, contributors=[ClassLabels(labels.to(parts.device))])


def finish(job, images: list) -> list:
    return images
