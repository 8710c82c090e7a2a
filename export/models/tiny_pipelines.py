"""Tiny diffusers pipelines beside the families of export/models/tiny.py: the ×4 upscaler (StableDiffusionUpscalePipeline)
depth-to-image (StableDiffusionDepth2ImgPipeline, with a tiny ViT DPTForDepthEstimation) and unCLIP image variations
(StableUnCLIPImg2ImgPipeline, with a tiny CLIP vision encoder).

Made like tiny.py's (real classes, scaled down, random weights from a seed, the locally trained CLIP tokenizer)
and saved as diffusers folders; configs follow stabilityai/stable-diffusion-x4-upscaler's where they matter
(7-channel UNet with 1000 class embeddings for the noise level, a VAE with scale factor 4 and scaling factor
0.08333, DDIM v-prediction, the DDPM low-resolution scheduler, max_noise_level 350).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from sdrt.export.models.tiny import _BASE_SCHEDULER, _TEXT_WIDTH, _text_encoder
from sdrt.export.models.tiny_tokenizer import EOS, write_clip_tokenizer

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


def build_tiny_depth2img(root: Path, seed: int = 0):
    """SD 2 depth's layout: a 5-channel UNet (latents ‖ depth), the DPT depth estimator and its image processor
    (resize to a fixed square, bicubic, normalised to [-1, 1]; 32 px here, 384 in the real model)."""
    import diffusers
    from diffusers import DDIMScheduler
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    from sdrt.export.models.tiny import _unet, _vae

    torch.manual_seed(seed)
    parts = _text_encoder(root, "text_encoder", "gelu", 3)
    unet = _unet(_TEXT_WIDTH, in_channels=5, linear_proj=True)
    estimator = DPTForDepthEstimation(DPTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=37, backbone_out_indices=(0, 1, 2, 3), neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=16, is_hybrid=False, initializer_range=0.15)).eval()
    with torch.no_grad():  # random weights (wider than the 0.02 default, and a positive final bias): a depth map
        # with a real spread, which the pipeline then normalises
        estimator.head.head[-2].bias.fill_(1.0)
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False, do_normalize=True,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    scheduler = DDIMScheduler(**_BASE_SCHEDULER, clip_sample=False, set_alpha_to_one=False)
    return diffusers.StableDiffusionDepth2ImgPipeline(
        vae=_vae(0.18215, False), unet=unet, scheduler=scheduler, depth_estimator=estimator,
        feature_extractor=processor, **parts)


def build_tiny_unclip(root: Path, seed: int = 0):
    """SD 2.1 unCLIP's layout (as diffusers' own tests scale it down): CLIP vision encoder with projection, the image
    normaliser (random mean/std here, so that it matters), the cosine DDPM image-noising scheduler, and a UNet whose
    class embedding projects [image embedding ‖ noise-level embedding]."""
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from sdrt.export.models.tiny import _vae

    torch.manual_seed(seed)
    parts = _text_encoder(root, "text_encoder", "gelu", 3)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=_TEXT_WIDTH, projection_dim=_TEXT_WIDTH, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, intermediate_size=37, patch_size=4)).eval()
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=_TEXT_WIDTH)
    with torch.no_grad():
        normalizer.mean.copy_(torch.randn(1, _TEXT_WIDTH) * 0.5)
        normalizer.std.copy_(torch.rand(1, _TEXT_WIDTH) + 0.5)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_TEXT_WIDTH, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
        class_embed_type="projection", projection_class_embeddings_input_dim=2 * _TEXT_WIDTH)
    scheduler = DDIMScheduler(**_BASE_SCHEDULER, clip_sample=False, set_alpha_to_one=False,
                              prediction_type="v_prediction")
    return diffusers.StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32), image_encoder=encoder,
        image_normalizer=normalizer, image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        unet=unet, scheduler=scheduler, vae=_vae(0.18215, False), **parts)


BUILDERS = {"x4-upscaler": build_tiny_upscaler, "depth2img": build_tiny_depth2img, "unclip": build_tiny_unclip}


def write_tiny(kind: str, folder: Path, seed: int = 0) -> Path:
    """Save the tiny pipeline `kind` (a key of BUILDERS) as a diffusers folder and return the folder."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:
        pipe = BUILDERS[kind](Path(scratch), seed)
        pipe.save_pretrained(folder, safe_serialization=True)
    if (folder / "tokenizer").is_dir():  # transformers 5 saves tokenizer.json only (as in tiny.py)
        write_clip_tokenizer(folder / "tokenizer", pad_token=EOS)
    return folder
