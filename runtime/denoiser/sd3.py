"""Stable Diffusion 3 / 3.5 around its transformer (diffusers 0.42's StableDiffusion3Pipeline.__call__).

The composed call (runtime/denoiser/call.py) feeds the latent as `sample` and the timestep σ·1000 (the flow
schedule's timesteps; runtime/denoiser/x0.py feeds the latent unscaled); SD3Transformer2DModel takes them as
hidden_states [B, C, h, w] and timestep [B] (the call expands the scalar for a rank-1 input, as diffusers'
t.expand(B)), the text sequence as encoder_hidden_states (the text contributor) and the two CLIP projections
concatenated as pooled_projections [B, P]. `Sd3Feed` is the contributor that renames the latent input and adds the
pooled projections; the output (out_hidden_states) is the velocity in the latents' own layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdrt.runtime.family import Family


@dataclass(frozen=True)
class Sd3Feed:
    pooled: torch.Tensor  # [B(·2), P]: CLIP-L's and CLIP-G's text_embeds side by side, guidance-batched
    latent_input: str = "hidden_states"

    def contribute(self, feed, step):
        out = {k: v for k, v in feed.items() if k != "sample"}
        return out | {self.latent_input: feed["sample"], "pooled_projections": self.pooled}


def contributors(model_dir, cond) -> list:
    """The family's contributors for a job on `model_dir` (none for other families)."""
    if model_dir.info.family != Family.SD3:
        return []
    return [Sd3Feed(cond.pooled, model_dir.info.layout.latent_input)]
