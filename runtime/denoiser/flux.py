"""FLUX.1 around its transformer (diffusers 0.42's pipelines/flux/pipeline_flux.py; reference/flow_models.md §2).

The sampler keeps the latents in sdrt's layout [B, C, h, w]: FluxPipeline draws its noise in that shape and packs it,
and every flow-matching step is elementwise, so packing only around each transformer call gives diffusers' numbers.
`FluxFeed` is the contributor (runtime/denoiser/call.py) that turns the composed call's feed — the latent as
`sample`, the timestep σ·1000, the T5 sequence as encoder_hidden_states — into the transformer's: the latent packed
2×2 into hidden_states [B, (h/2)(w/2), 4C], timestep σ (diffusers passes t / 1000), the CLIP pooled
pooled_projections, the RoPE positions img_ids / txt_ids and, for guidance-distilled models (dev), the guidance
[B]; its `restore` unpacks the velocity back to [B, C, h, w]. No classifier-free guidance batch (Layout.guidance_batch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sdrt.runtime.family import Family

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's max_sequence_length default: the T5 sequence every prompt is padded to


def pack(x: torch.Tensor) -> torch.Tensor:
    """diffusers' FluxPipeline._pack_latents: [B, C, h, w] → [B, (h/2)(w/2), 4C]."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """diffusers' FluxPipeline._unpack_latents: [B, (h/2)(w/2), 4C] → [B, C, h, w] (h, w: latent sides)."""
    b, _, packed = x.shape
    return x.view(b, height // 2, width // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5) \
        .reshape(b, packed // 4, height, width)


@functools.lru_cache(maxsize=8)  # the same ids every step of a size: made once, not per transformer call
def image_ids(latent_height: int, latent_width: int) -> torch.Tensor:
    """diffusers' FluxPipeline._prepare_latent_image_ids: [(h/2)·(w/2), 3] = (0, row, column), float32 (shared:
    read, never written)."""
    ids = torch.zeros(latent_height // 2, latent_width // 2, 3)
    ids[..., 1] += torch.arange(latent_height // 2)[:, None]
    ids[..., 2] += torch.arange(latent_width // 2)[None, :]
    return ids.reshape(-1, 3)


def sequence_length(height: int, width: int, vae_scale_factor: int) -> int:
    """The packed image sequence length of a width × height image: what dynamic shifting's mu is read at."""
    return (height // vae_scale_factor // 2) * (width // vae_scale_factor // 2)


@dataclass(frozen=True)
class FluxFeed:
    """The contributor that makes the composed call's feed the Flux transformer's (see the module's text)."""
    pooled: torch.Tensor  # CLIP's pooler_output [B, P]
    guidance: torch.Tensor | None  # [B] float32 (dev); None where the model has no guidance embedding (schnell)

    def contribute(self, feed, step):
        latent = "sample" if "sample" in feed else "hidden_states"
        x = feed[latent]
        out = {k: v for k, v in feed.items() if k != latent}
        out |= {"hidden_states": pack(x), "timestep": feed["timestep"] / 1000, "pooled_projections": self.pooled,
                "img_ids": image_ids(x.shape[2], x.shape[3]),
                "txt_ids": torch.zeros(feed["encoder_hidden_states"].shape[1], 3)}
        return out | ({"guidance": self.guidance} if self.guidance is not None else {})

    def restore(self, out: torch.Tensor, step) -> torch.Tensor:
        """The transformer's packed velocity back in the sampler's layout."""
        return unpack(out, step.latents.shape[2], step.latents.shape[3])


def contributors(model_dir, guidance: float, count: int, cond) -> list:
    """The family's contributors for a job on `model_dir` (none for other families)."""
    if model_dir.info.family != Family.FLUX:
        return []
    embedded = bool(model_dir.unet_config.get("guidance_embeds"))  # diffusers: torch.full([1], scale).expand(B)
    return [FluxFeed(cond.pooled, torch.full((count,), float(guidance), dtype=torch.float32) if embedded else None)]
