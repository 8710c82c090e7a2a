"""Classifier-free guidance, chosen once per request: batched cond+uncond when scale > 1, none otherwise.

diffusers enables CFG only for guidance_scale > 1 (pipeline_stable_diffusion_xl.py `do_classifier_free_guidance`),
so Lightning/Turbo (guidance 0) run the UNet at batch B. The uncond half comes first, as in diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Guidance:
    scale: float
    rescale: float = 0.0  # guidance_rescale (arXiv 2305.08891 §3.4), 0 = off
    # LCM-distilled UNets (time_cond_proj_dim) take the scale as an input embedding and never batch for CFG
    # (diffusers' StableDiffusionPipeline: do_classifier_free_guidance needs time_cond_proj_dim None)
    embedded: bool = False

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0 and not self.embedded

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """[B, ...] → [2B, ...] (uncond half first) when guidance is on."""
        return torch.cat([x, x]) if self.enabled else x

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """UNet output [2B, ...] → guided [B, ...]; identity when guidance is off."""
        if not self.enabled:
            return out
        uncond, cond = out.chunk(2)
        guided = uncond + self.scale * (cond - uncond)
        return rescale_noise_cfg(guided, cond, self.rescale) if self.rescale > 0 else guided


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """diffusers' rescale_noise_cfg: match the guided prediction's std to the conditional one's, then mix."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def guidance_scale_embedding(scale: float, batch: int, dim: int) -> torch.Tensor:
    """diffusers' get_guidance_scale_embedding(w = scale - 1 repeated over the batch, dim), float32 [batch, dim]:
    the sinusoidal embedding of 1000·w (LatentConsistencyModelPipeline and StableDiffusionPipeline for LCM UNets)."""
    w = torch.tensor(scale - 1).repeat(batch) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(torch.float32)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb


@dataclass(frozen=True)
class GuidanceEmbedding:
    """A contributor (runtime/denoiser/call.py): the LCM UNet's timestep_cond, [B, time_cond_proj_dim]."""
    embedding: torch.Tensor

    def contribute(self, feed, step):
        return feed | {"timestep_cond": self.embedding}
