"""Tiny diffusers pipelines beside the families of export/tiny.py: the ×4 upscaler (StableDiffusionUpscalePipeline).

Made like tiny.py's (real classes, scaled down, random weights from a seed, the locally trained CLIP tokenizer)
and saved as diffusers folders; configs follow stabilityai/stable-diffusion-x4-upscaler's where they matter
(7-channel UNet with 1000 class embeddings for the noise level, a VAE with scale factor 4 and scaling factor
0.08333, DDIM v-prediction, the DDPM low-resolution scheduler, max_noise_level 350).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .tiny import _BASE_SCHEDULER, _TEXT_WIDTH, _text_encoder
from .tiny_tokenizer import EOS, write_clip_tokenizer

UPSCALER_LOW_RES_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                              "beta_schedule": "scaled_linear", "clip_sample": False}


def build_tiny_upscaler(root: Path, seed: int = 0):
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    parts = _text_encoder(root, "text_encoder", "gelu", 3)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_TEXT_WIDTH, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
        num_class_embeds=1000)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.08333)
    scheduler = DDIMScheduler(**_BASE_SCHEDULER, clip_sample=False, set_alpha_to_one=False,
                              prediction_type="v_prediction")
    return diffusers.StableDiffusionUpscalePipeline(
        vae=vae, unet=unet, scheduler=scheduler, low_res_scheduler=DDPMScheduler(**UPSCALER_LOW_RES_SCHEDULER),
        safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350, **parts)


BUILDERS = {"x4-upscaler": build_tiny_upscaler}


def write_tiny(kind: str, folder: Path, seed: int = 0) -> Path:
    """Save the tiny pipeline `kind` (a key of BUILDERS) as a diffusers folder and return the folder."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:
        pipe = BUILDERS[kind](Path(scratch), seed)
        pipe.save_pretrained(folder, safe_serialization=True)
    if (folder / "tokenizer").is_dir():  # transformers 5 saves tokenizer.json only (as in tiny.py)
        write_clip_tokenizer(folder / "tokenizer", pad_token=EOS)
    return folder
