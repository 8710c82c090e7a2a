"""Tiled VAE decoding and encoding over the ONNX engines, as diffusers' AutoencoderKL does after `enable_tiling()`.

Reproduces diffusers models/autoencoders/autoencoder_kl.py (0.42): `tiled_decode`, `_tiled_encode`, `blend_v`,
`blend_h`, and the thresholds in `_decode` / `_encode`. Tiles overlap by `overlap` (0.25) of a tile; each tile
is decoded (encoded) alone, then blended linearly into its upper and left neighbours, which were themselves
blended first (diffusers blends in place, row by row), and cropped to `row_limit`. The exported decoder includes
post_quant_conv and the encoder quant_conv (export/components.py), applied per tile as diffusers does.
Memory then scales with the tile, not the image: what lets SDXL decode 2048² (runtime/limits.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Engine = Callable[[torch.Tensor], torch.Tensor]  # one tile in, one tile out ([B, C, h, w] → [B, C', h', w'])


@dataclass(frozen=True)
class Tiles:
    sample_size: int  # tile_sample_min_size: tile side in pixels
    latent_size: int  # tile_latent_min_size: tile side in latents
    overlap: float = 0.25  # tile_overlap_factor

    @classmethod
    def of_vae(cls, vae_config: dict) -> "Tiles":
        """diffusers AutoencoderKL.__init__: sample_size (its first entry if a list) and sample_size / 2^(blocks − 1)."""
        sample = vae_config.get("sample_size", 512)
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        blocks = len(vae_config.get("block_out_channels", [0, 0, 0, 0]))
        return cls(int(sample), int(sample / (2 ** (blocks - 1))))

    def decode_tiles(self, latent_h: int, latent_w: int) -> bool:
        """AutoencoderKL._decode tiles when either latent side exceeds tile_latent_min_size."""
        return latent_w > self.latent_size or latent_h > self.latent_size

    def encode_tiles(self, height: int, width: int) -> bool:
        """AutoencoderKL._encode tiles when either image side exceeds tile_sample_min_size."""
        return width > self.sample_size or height > self.sample_size

    def count(self, height: int, width: int, latent: bool = True) -> int:
        """How many tiles a decode (latent sides) or an encode (pixel sides) runs."""
        size = self.latent_size if latent else self.sample_size
        step = int(size * (1 - self.overlap))
        return len(range(0, height, step)) * len(range(0, width, step))


def blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """AutoencoderKL.blend_v: b's first rows fade in from a's last rows (b modified in place)."""
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)
    return b


def blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """AutoencoderKL.blend_h: the same across columns."""
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
    return b


def _tiled(run: Engine, x: torch.Tensor, tile_in: int, tile_out: int, overlap: float) -> torch.Tensor:
    """The loop both tiled_decode and _tiled_encode share, with input and output tile sides swapped."""
    step = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    limit = tile_out - extent
    rows = [[run(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], step)]
            for i in range(0, x.shape[2], step)]
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend_v(rows[i - 1][j], tile, extent)
            if j > 0:
                tile = blend_h(row[j - 1], tile, extent)
            out_row.append(tile[:, :, :limit, :limit])
        out_rows.append(torch.cat(out_row, dim=3))
    return torch.cat(out_rows, dim=2)


def tiled_decode(decode: Engine, z: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """AutoencoderKL.tiled_decode: latents [B, 4, h, w] (already / scaling_factor) → [B, 3, h·f, w·f]."""
    return _tiled(decode, z, tiles.latent_size, tiles.sample_size, tiles.overlap)


def tiled_encode(encode: Engine, x: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """AutoencoderKL._tiled_encode: image [B, 3, H, W] → moments [B, 8, H/f, W/f] (mean ‖ logvar)."""
    return _tiled(encode, x, tiles.sample_size, tiles.latent_size, tiles.overlap)
