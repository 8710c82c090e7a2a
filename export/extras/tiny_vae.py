"""A tiny VAE (TAESD/TAESDXL as diffusers' `AutoencoderTiny`) exported beside the full one.

`vae_decoder_tiny`: latent_sample [B, 4, h, w] → sample [B, 3, h·f, w·f] in [−1, 1]. `AutoencoderTiny.decode` is
`DecoderTiny.forward`: 3·tanh(x/3), the conv stack, then ·2 − 1 (diffusers models/autoencoders/vae.py). Its
config's scaling_factor is 1.0, so the runtime's `latents / scaling_factor` feeds UNet-space latents unchanged,
as the pipelines do (`vae.decode(latents / vae.config.scaling_factor)`).
`vae_encoder_tiny`: sample [B, 3, H, W] in [−1, 1] → latents [B, 4, H/f, W/f]: `EncoderTiny.forward` maps the
image to [0, 1] first. It returns latents, not a distribution: diffusers' `retrieve_latents` takes
`encoder_output.latents` and draws no noise, then multiplies by scaling_factor (1.0).
Reference: ../shared/reference/customization.md §6.2.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from sdrt.runtime.errors import UserError

from sdrt.export.components import ComponentSpec, Shape, vae_scale_factor

TINY_DECODER, TINY_ENCODER = "vae_decoder_tiny", "vae_encoder_tiny"


class _TinyDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):  # [B, 4, h, w] (UNet-space: scaling_factor 1.0) → [B, 3, H, W] in [−1, 1]
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _TinyEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, sample):  # [B, 3, H, W] in [−1, 1] → latents [B, 4, H/f, W/f]
        return self.encoder(sample)


def tiny_scale_factor(vae) -> int:
    """DecoderTiny upsamples after every block but the last (models/autoencoders/vae.py)."""
    return vae.config.upsampling_scaling_factor ** (len(vae.config.decoder_block_out_channels) - 1)


def load_tiny_vae(source: str):
    """An AutoencoderTiny from a diffusers folder (its config.json names the class) or a hub id."""
    from diffusers import AutoencoderTiny

    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"the tiny VAE {source} is a file; give a diffusers AutoencoderTiny folder (config.json "
                        "and weights), e.g. a download of madebyollin/taesd")
    if path.is_dir() and not (path / "config.json").exists():
        raise UserError(f"the tiny VAE folder {source} has no config.json; give a diffusers AutoencoderTiny folder")
    try:
        return AutoencoderTiny.from_pretrained(str(path) if path.is_dir() else source).eval()
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tiny VAE {source}: {first}") from None


def check_matches(tiny, pipe, source: str) -> None:
    """The tiny VAE must read and write the pipeline's latents: same channels, same scale factor."""
    channels, full = tiny.config.latent_channels, pipe.vae.config.latent_channels
    if channels != full:
        raise UserError(f"the tiny VAE {source} has {channels} latent channels, the model's VAE {full}; use the "
                        "tiny VAE made for this model family (taesd for SD 1.x/2.x, taesdxl for SDXL, taesd3 for "
                        "SD3 / SD3.5, taef1 for FLUX.1)")
    if tiny_scale_factor(tiny) != vae_scale_factor(pipe):
        raise UserError(f"the tiny VAE {source} scales by {tiny_scale_factor(tiny)}, the model's VAE by "
                        f"{vae_scale_factor(pipe)}; use the tiny VAE made for this model family")


def source_signature(source: str) -> str:
    """What the tiny components' export keys depend on: the folder's files, or the hub id."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return f"|tiny:{source}"
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and ".cache" not in q.parts):
        h.update(str(p.relative_to(path)).encode())
        h.update(p.read_bytes())
    return f"|tiny:{h.hexdigest()}"


def tiny_specs() -> dict[str, ComponentSpec]:
    """Specs over `pipe.vae_tiny` (set by the exporter), in optimum's VAE I/O names."""

    def decoder_inputs(pipe, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch)
        channels = pipe.vae_tiny.config.latent_channels
        return ((torch.randn(shape.batch, channels, shape.latent_height, shape.latent_width, generator=g) * 2)
                .to(dtype),)

    def encoder_inputs(pipe, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch)
        f = tiny_scale_factor(pipe.vae_tiny)
        return ((torch.rand(shape.batch, 3, shape.latent_height * f, shape.latent_width * f, generator=g) * 2 - 1)
                .to(dtype),)

    dec_axes = {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                "sample": {0: "batch_size", 2: "height", 3: "width"}}
    enc_axes = {"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"},
                "latents": {0: "batch_size", 2: "latent_height", 3: "latent_width"}}
    return {
        TINY_DECODER: ComponentSpec(TINY_DECODER, ("latent_sample",), ("sample",), dec_axes,
                                    lambda p: _TinyDecoder(p.vae_tiny), decoder_inputs),
        TINY_ENCODER: ComponentSpec(TINY_ENCODER, ("sample",), ("latents",), enc_axes,
                                    lambda p: _TinyEncoder(p.vae_tiny), encoder_inputs),
    }


def build_tiny_vae(scale_factor: int = 2, seed: int = 0, full_size: bool = False, latent_channels: int = 4,
                   scaling_factor: float = 1.0, shift_factor: float = 0.0):
    """A random-weight AutoencoderTiny for tests: 16-channel blocks, one upsampler per factor of 2; with
    `full_size`, AutoencoderTiny's default config, which is TAESD's (64 channels, 1.2 M parameters per half), for
    benchmarks. `latent_channels`, `scaling_factor`, `shift_factor`: a TAESD3/TAEF1-like one for the 16-channel
    flow families (the pipelines scale and shift with the tiny VAE's own config).

    Its last decoder conv is rescaled and biased so the decoded image spans [0, 1] (DecoderTiny's x·2 − 1 then
    spans [−1, 1]) instead of sitting at black, so parity tests compare real pixel values.
    """
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    blocks = 1 + (scale_factor.bit_length() - 1)
    if full_size:
        vae = AutoencoderTiny().eval()
        if tiny_scale_factor(vae) != scale_factor:
            raise ValueError(f"TAESD scales by {tiny_scale_factor(vae)}, not {scale_factor}")
    else:
        vae = AutoencoderTiny(encoder_block_out_channels=(16,) * blocks, decoder_block_out_channels=(16,) * blocks,
                              num_encoder_blocks=(1,) * blocks, num_decoder_blocks=(1,) * blocks,
                              latent_channels=latent_channels, scaling_factor=scaling_factor,
                              shift_factor=shift_factor).eval()
    last = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(4.0)
        last.bias.fill_(0.5)
    return vae


def write_tiny_vae(folder: Path, scale_factor: int = 2, seed: int = 0, full_size: bool = False, **config) -> Path:
    folder = Path(folder)
    build_tiny_vae(scale_factor, seed, full_size, **config).save_pretrained(folder, safe_serialization=True)
    return folder
