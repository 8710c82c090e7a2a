"""Tiny models of the UNet layouts and formulations people bring, beside the four base families (tiny.py).

Each is the real diffusers classes at the tiny widths of tiny.py, random weights from a seed, in the layout or with
the scheduler and VAE settings of the published model it stands for (configs restated from the models' own
config.json files; none of their weights):

- `sd15-4level`: SD 1.5's four levels (CrossAttnDown ×3 + Down; Up + CrossAttnUp ×3), whose first up block up-samples
  without attention, the layout that crashed fp32 exports at odd latent sizes.
- `bk-sdm`: BK-SDM's compression (Kim et al. 2023, nota-ai/bk-sdm-small): SD 1.5's levels without the mid block.
- `ssd-1b`: Segmind SSD-1B / Vega's SDXL with a different transformer depth per level and per up-block layer
  (`transformer_layers_per_block`, `reverse_transformer_layers_per_block`).
- `playground-v2.5`: Playground v2.5's SDXL: EDMDPMSolverMultistepScheduler (EDM preconditioning, sigma_data 0.5,
  karras sigmas 0.002–80) and a VAE with per-channel latents_mean / latents_std (scaling_factor 0.5).
- `lcm`: an LCM-distilled SD 1.5 UNet (`time_cond_proj_dim`: the guidance-scale embedding) saved as
  LatentConsistencyModelPipeline with LCMScheduler, as SimianLuo/LCM_Dreamshaper_v7 ships;
  `lcm-sd`: the same UNet in a StableDiffusionPipeline folder with an LCM scheduler.
- `zsnr-vpred`: a zero-terminal-SNR v-prediction fine-tune ("Common Diffusion Noise Schedules are Flawed", Lin et
  al. 2024): DDIMScheduler with rescale_betas_zero_snr and trailing spacing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from sdrt.export.models.tiny import _BASE_SCHEDULER, _TEXT_WIDTH, _text_encoder, _unet, _vae
from sdrt.export.models.tiny_tokenizer import EOS, write_clip_tokenizer

VARIANTS = ("sd15-4level", "bk-sdm", "ssd-1b", "playground-v2.5", "lcm", "lcm-sd", "zsnr-vpred")

# Playground v2.5's VAE (playgroundai/playground-v2.5-1024px-aesthetic, vae/config.json)
PLAYGROUND_LATENTS_MEAN = (-1.6574, 1.886, -1.383, 2.5155)
PLAYGROUND_LATENTS_STD = (8.4927, 5.9022, 6.5498, 5.2299)
LCM_COND_DIM = 32  # the tiny UNet's time_cond_proj_dim (LCM Dreamshaper's is 256)
LCM_COND_GAIN = 12.0


def _four_level_unet(mid_block: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=_TEXT_WIDTH,
        attention_head_dim=(2, 2, 4, 4), norm_num_groups=32, mid_block_type="UNetMidBlock2DCrossAttn" if mid_block
        else None)


def _sd15(root: Path, unet, scheduler, cls_name: str = "StableDiffusionPipeline"):
    import diffusers

    parts = _text_encoder(root, "text_encoder", "quick_gelu", 4)
    extra = {} if cls_name == "LatentConsistencyModelPipeline" else {"requires_safety_checker": False}
    return getattr(diffusers, cls_name)(vae=_vae(0.18215, False), unet=unet, scheduler=scheduler,
                                        safety_checker=None, feature_extractor=None, **extra, **parts)


def _sdxl(root: Path, unet, scheduler, vae):
    import diffusers

    parts = _text_encoder(root, "text_encoder", "quick_gelu", 4) | _text_encoder(root, "text_encoder_2", "gelu", 4)
    return diffusers.StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=scheduler, **parts)


def _lcm_scheduler():
    from diffusers import LCMScheduler

    return LCMScheduler(**_BASE_SCHEDULER, original_inference_steps=50, set_alpha_to_one=True, clip_sample=False,
                        timestep_spacing="leading", prediction_type="epsilon")


def _lcm_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**{**_unet(_TEXT_WIDTH).config, "time_cond_proj_dim": LCM_COND_DIM})
    with torch.no_grad():  # a trained LCM leans on the embedding; at default init it barely moves the tiny UNet
        unet.time_embedding.cond_proj.weight.mul_(LCM_COND_GAIN)
    return unet


def build_tiny_variant(name: str, root: Path, seed: int = 0):
    """The diffusers pipeline object of a tiny variant; `root` holds its tokenizer files while it is built."""
    from diffusers import (DDIMScheduler, EDMDPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           UNet2DConditionModel)

    if name not in VARIANTS:
        raise ValueError(f"unknown tiny variant {name!r}; choose one of {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    pndm = PNDMScheduler(**_BASE_SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False)
    if name in ("sd15-4level", "bk-sdm"):
        return _sd15(root, _four_level_unet(mid_block=name == "sd15-4level"), pndm)
    if name == "zsnr-vpred":
        ddim = DDIMScheduler(**_BASE_SCHEDULER, clip_sample=False, set_alpha_to_one=False, rescale_betas_zero_snr=True,
                             timestep_spacing="trailing", prediction_type="v_prediction")
        return _sd15(root, _unet(_TEXT_WIDTH), ddim)
    if name in ("lcm", "lcm-sd"):
        cls_name = "LatentConsistencyModelPipeline" if name == "lcm" else "StableDiffusionPipeline"
        return _sd15(root, _lcm_unet(), _lcm_scheduler(), cls_name)
    base = _unet(2 * _TEXT_WIDTH, linear_proj=True, text_time=6)
    if name == "ssd-1b":  # per-level depths; each up-block layer its own (SSD-1B's config has [1, 2, 4] and lists)
        unet = UNet2DConditionModel(**{**base.config, "transformer_layers_per_block": (1, 3),
                                       "reverse_transformer_layers_per_block": ((2, 1), 1)})
        euler = EulerDiscreteScheduler(**_BASE_SCHEDULER, timestep_spacing="leading", prediction_type="epsilon")
        return _sdxl(root, unet, euler, _vae(0.13025, force_upcast=True))
    # playground-v2.5: its scheduler_config.json (EDMDPMSolverMultistepScheduler, dpmsolver++ 2M, karras sigmas)
    edm = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, num_train_timesteps=1000,
                                         prediction_type="epsilon", rho=7.0, solver_order=2, final_sigmas_type="zero")
    vae = _vae(0.5, force_upcast=False)
    vae.register_to_config(latents_mean=list(PLAYGROUND_LATENTS_MEAN), latents_std=list(PLAYGROUND_LATENTS_STD))
    return _sdxl(root, base, edm, vae)


def write_tiny_variant(name: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny variant as a diffusers folder (safetensors weights) and return the folder."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:
        build_tiny_variant(name, Path(scratch), seed).save_pretrained(folder, safe_serialization=True)
    for tok in ("tokenizer", "tokenizer_2"):  # transformers 5 saves tokenizer.json only; add CLIP's own files
        if (folder / tok).is_dir():
            write_clip_tokenizer(folder / tok, pad_token="!" if tok == "tokenizer_2" else EOS)
    return folder
