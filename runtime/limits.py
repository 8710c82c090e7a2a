"""Resource limits, checked before any work: a request that would not fit is refused with the estimate.

The estimate is of the largest transient tensors a generation holds, which is what makes large sizes fail:
- UNet self-attention at the finest attended resolution: the exported graph computes softmax(QKᵀ) as a full
  [B·heads, T, T] matrix (MatMul → Softmax → MatMul; T = latent tokens at that level), scores and probabilities
  both alive: 2·B·heads·T²·4 bytes in fp32 (B doubles with classifier-free guidance).
- The VAE decoder: its mid-block attention is single-head at the latent size (2·N·T²·4 bytes) and its last
  up-block runs at full resolution with block_out_channels[0] channels (about 3 live maps: N·C·H·W·4·3).
Weights are already loaded and not counted. It is an estimate for refusing what cannot run, not a prediction
of the peak: SD 1.5 at 512² with guidance estimates 1.1 GiB of attention.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 2 ** 30


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 4096 * 4096  # width × height of one image
    max_batch: int = 16  # images in one request
    max_steps: int = 1000  # the training schedule's length, the most any sampler here can use
    max_memory_bytes: int | None = None  # None: what the machine has available when the request arrives
    memory_fraction: float = 0.8  # of the available memory a request's estimate may use


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else physical memory; None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _heads(unet_config: dict, level: int, channels: int) -> int:
    heads = unet_config.get("num_attention_heads") or unet_config.get("attention_head_dim") or 8
    if isinstance(heads, (list, tuple)):
        heads = heads[min(level, len(heads) - 1)]
    # diffusers' SD 1.x/2.x configs name the head count attention_head_dim (its own legacy quirk)
    return max(int(heads), 1) if heads else max(channels // 64, 1)


def unet_attention_bytes(unet_config: dict, batch: int, latent_h: int, latent_w: int) -> int:
    """2·B·heads·T²·4 at the finest level whose down block has attention."""
    blocks = unet_config.get("down_block_types") or ["CrossAttnDownBlock2D"]
    channels = unet_config.get("block_out_channels") or [320]
    h, w = latent_h, latent_w
    for level, kind in enumerate(blocks):
        if "Attn" in kind:
            tokens = h * w
            return 2 * batch * _heads(unet_config, level, channels[level]) * tokens * tokens * 4
        h, w = (h + 1) // 2, (w + 1) // 2
    return 0


def vae_decoder_bytes(vae_config: dict, images: int, latent_h: int, latent_w: int, scale: int) -> int:
    tokens = latent_h * latent_w
    attention = 2 * images * tokens * tokens * 4 if vae_config.get("mid_block_add_attention", True) else 0
    first = (vae_config.get("block_out_channels") or [128])[0]
    full_res = images * first * (latent_h * scale) * (latent_w * scale) * 4 * 3
    return attention + full_res


def tiled_vae_decoder_bytes(vae_config: dict, images: int, latent_h: int, latent_w: int, scale: int,
                            tile: int) -> int:
    """Tiled decoding (runtime/vae_tiling.py): one tile's decoder buffers, plus every decoded tile and the
    assembled image kept in fp32 (about 2 · N·3·H·W·4)."""
    one_tile = vae_decoder_bytes(vae_config, images, min(latent_h, tile), min(latent_w, tile), scale)
    return one_tile + 2 * images * 3 * (latent_h * scale) * (latent_w * scale) * 4


def estimate_bytes(unet_config: dict, vae_config: dict, images: int, unet_batch: int, height: int, width: int,
                   scale: int, vae_tile: int | None = None) -> int:
    """Peak transient memory of one request (see the module docstring): the larger of the UNet and VAE phases.
    `vae_tile`: the VAE decodes in tiles of this many latents a side."""
    lh, lw = height // scale, width // scale
    latents = images * 4 * lh * lw * 4 * 8  # the loop's latents, noise and history: a few copies
    vae = vae_decoder_bytes(vae_config, images, lh, lw, scale) if vae_tile is None else \
        tiled_vae_decoder_bytes(vae_config, images, lh, lw, scale, vae_tile)
    return latents + max(unet_attention_bytes(unet_config, unet_batch, lh, lw), vae)


def memory_budget(limits: Limits) -> int | None:
    """Bytes a request may use: the configured limit, or a fraction of what is available now."""
    if limits.max_memory_bytes is not None:
        return limits.max_memory_bytes
    free = available_bytes()
    return None if free is None else int(free * limits.memory_fraction)
