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

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0

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
