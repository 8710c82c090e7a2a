"""Tiny diffusers pipelines of every family sdrt supports: the project's test and demo models.

Each is made of the real diffusers/transformers classes, scaled down, with random weights from a seed,
and a CLIP-format BPE tokenizer trained locally (tiny_tokenizer.py). `write_tiny_pipeline` saves a
diffusers folder that `DiffusionPipeline.from_pretrained(folder)` loads. Images from these models are
noise: the weights are random.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from sdrt.export.models.tiny_tokenizer import EOS, write_clip_tokenizer

FAMILIES = ("sd15", "sd21v", "sdxl", "sdxl-refiner", "sd15-inpaint", "sdxl-lightning")

# Scheduler configs as the real models ship them (scaled_linear 0.00085→0.012, 1000 steps, offset 1).
_BASE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
_TEXT_WIDTH = 32
_PROJECTION = 32
FACEID_WIDTH = 24  # the tiny FaceID adapter's face-embedding width (insightface's is 512)


def _text_config(vocab_size: int, eos_id: int, hidden_act: str, layers: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=_TEXT_WIDTH, intermediate_size=37, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
        projection_dim=_PROJECTION, bos_token_id=eos_id - 1, eos_token_id=eos_id, pad_token_id=1,
    )


def _text_encoder(root: Path, name: str, hidden_act: str, layers: int) -> dict:
    """{text_encoder[_2]: model, tokenizer[_2]: tokenizer}; encoder 2 has SDXL's projection and pads with "!"."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    second = name == "text_encoder_2"
    tok_name = "tokenizer_2" if second else "tokenizer"
    vocab = write_clip_tokenizer(root / tok_name, pad_token="!" if second else EOS)
    cls = CLIPTextModelWithProjection if second else CLIPTextModel
    return {name: cls(_text_config(vocab, vocab - 1, hidden_act, layers)),
            tok_name: CLIPTokenizer.from_pretrained(root / tok_name)}


def _unet(cross_dim: int, in_channels: int = 4, linear_proj: bool = False, text_time: int | None = None):
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=(2, 4), use_linear_projection=linear_proj, norm_num_groups=32,
    )
    if text_time is not None:  # SDXL: add_embedding over [text_embeds ‖ fourier(time_ids)]
        kwargs.update(
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=_PROJECTION + 8 * text_time,
            transformer_layers_per_block=(1, 2),
        )
    return UNet2DConditionModel(**kwargs)


def _vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=32,
        scaling_factor=scaling_factor, force_upcast=force_upcast,
    )


def build_tiny_pipeline(family: str, root: Path, seed: int = 0):
    """Build the diffusers pipeline object of a tiny family; `root` holds its tokenizer files."""
    import diffusers
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler)

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    if family in ("sd15", "sd15-inpaint", "sd21v"):
        sd2 = family == "sd21v"
        parts = _text_encoder(root, "text_encoder", "gelu" if sd2 else "quick_gelu", 3 if sd2 else 4)
        unet = _unet(_TEXT_WIDTH, in_channels=9 if family == "sd15-inpaint" else 4, linear_proj=sd2)
        if sd2:
            scheduler = DDIMScheduler(**_BASE_SCHEDULER, clip_sample=False, set_alpha_to_one=False,
                                      prediction_type="v_prediction")
        else:
            scheduler = PNDMScheduler(**_BASE_SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False)
        cls = diffusers.StableDiffusionInpaintPipeline if family == "sd15-inpaint" else diffusers.StableDiffusionPipeline
        return cls(vae=_vae(0.18215, False), unet=unet, scheduler=scheduler, safety_checker=None,
                   feature_extractor=None, requires_safety_checker=False, **parts)

    refiner = family == "sdxl-refiner"
    parts = {} if refiner else _text_encoder(root, "text_encoder", "quick_gelu", 4)
    parts |= _text_encoder(root, "text_encoder_2", "gelu", 4)
    spacing = "trailing" if family == "sdxl-lightning" else "leading"
    scheduler = EulerDiscreteScheduler(**_BASE_SCHEDULER, timestep_spacing=spacing, prediction_type="epsilon")
    cross = _TEXT_WIDTH if refiner else 2 * _TEXT_WIDTH
    unet = _unet(cross, linear_proj=True, text_time=5 if refiner else 6)
    vae = _vae(0.13025, force_upcast=True)
    if refiner:
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, unet=unet, scheduler=scheduler, text_encoder=None, tokenizer=None,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, **parts)
    return diffusers.StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=scheduler, **parts)


def write_tiny_pipeline(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny pipeline as a diffusers folder (safetensors weights) and return the folder."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:
        pipe = build_tiny_pipeline(family, Path(scratch), seed)
        pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # transformers 5 saves tokenizer.json only; add CLIP's own files
        if (folder / name).is_dir():
            write_clip_tokenizer(folder / name, pad_token="!" if name == "tokenizer_2" else EOS)
    return folder


def write_tiny_controlnet(model_folder: Path, folder: Path, seed: int = 0, gain: float = 0.5) -> Path:
    """A ControlNet for a tiny pipeline: diffusers' ControlNetModel.from_unet (the UNet's encoder copied), its
    conditioning embedding sized to the tiny VAE's factor, and the zero-initialised convolutions (the condition's
    conv_out, the residual 1×1 convs) drawn at random × `gain` so that the control image visibly moves the output."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_folder) / "unet")
    factor = 2 ** (len(_vae(0.18215, False).config.block_out_channels) - 1)
    channels = (8, 16, 16, 32)[: factor.bit_length()]  # one stride-2 conv per factor of 2
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    g = torch.Generator().manual_seed(seed)
    zeroed = [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]
    with torch.no_grad():
        for conv in zeroed:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * gain / conv.weight[0].numel() ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * gain * 0.1)
    net.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def write_tiny_ip_adapter(model_folder: Path, folder: Path, seed: int = 0, gain: float = 1.0,
                          plus: bool = False, full: bool = False, faceid: bool = False) -> tuple[Path, Path]:
    """A tiny CLIP image encoder (CLIPVisionModelWithProjection, 32×32 input) and an IP-Adapter for the tiny
    pipeline in diffusers' format (`image_proj.proj/norm` of ImageProjection with 4 tokens, `ip_adapter.{1,3,…}.
    to_k_ip/to_v_ip` for every cross-attention in `attn_processors` order, as _convert_ip_adapter_attn_to_diffusers
    numbers them), with random weights × `gain`. `plus`: an IP-Adapter Plus instead (diffusers'
    IPAdapterPlusImageProjection, a 4-layer Resampler with 8 queries, written in the `layers.N.attn.to_q/to_kv/to_out`
    form _convert_ip_adapter_image_proj_to_diffusers reads). `full`: an IP-Adapter Full Face (proj.0 / proj.2 /
    proj.3: IPAdapterFullImageProjection, one token per hidden state). `faceid`: an IP-Adapter FaceID (IPAdapterFaceIDImageProjection
    over FACEID_WIDTH-wide face embeddings: proj.0 / proj.2 / norm, 4 tokens) with its LoRA on every attention
    (`ip_adapter.K.to_{q,k,v,out}_lora.{down,up}`, rank 4, K over all attn_processors, as diffusers'
    _load_ip_adapter_loras reads it). Returns (image encoder folder, adapter file)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=_TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=_PROJECTION))
    encoder.save_pretrained(folder / "image_encoder")
    unet = UNet2DConditionModel.from_pretrained(Path(model_folder) / "unet")
    cross, tokens = unet.config.cross_attention_dim, 4
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * gain / shape[-1] ** 0.5  # noqa: E731
    state = {"image_proj.proj.weight": rand(tokens * cross, _PROJECTION) * 4, "image_proj.proj.bias": torch.zeros(tokens * cross),
             "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    if plus:
        from diffusers.models.embeddings import IPAdapterPlusImageProjection

        resampler = IPAdapterPlusImageProjection(embed_dims=_TEXT_WIDTH, output_dims=cross, hidden_dims=64, heads=1,
                                                 num_queries=8)
        state = {}
        for key, value in resampler.state_dict().items():
            if ".attn.to_k." in key:
                state["image_proj." + key.replace("to_k", "to_kv")] = torch.cat(
                    [value, resampler.state_dict()[key.replace("to_k", "to_v")]])
            elif ".attn.to_v." not in key:
                state["image_proj." + key.replace("to_out.0", "to_out")] = value.detach().clone()
    if full:  # FeedForward(width → width, GELU) → Linear(width → cross) → LayerNorm(cross), in the original key names
        state = {"image_proj.proj.0.weight": rand(_TEXT_WIDTH, _TEXT_WIDTH) * 2, "image_proj.proj.0.bias": torch.zeros(_TEXT_WIDTH),
                 "image_proj.proj.2.weight": rand(cross, _TEXT_WIDTH) * 2, "image_proj.proj.2.bias": torch.zeros(cross),
                 "image_proj.proj.3.weight": torch.ones(cross), "image_proj.proj.3.bias": torch.zeros(cross)}
    if faceid:  # FeedForward(FACEID_WIDTH → 2·FACEID_WIDTH, GELU) → Linear(→ tokens·cross) → LayerNorm(cross)
        state = {"image_proj.proj.0.weight": rand(2 * FACEID_WIDTH, FACEID_WIDTH) * 2,
                 "image_proj.proj.0.bias": torch.zeros(2 * FACEID_WIDTH),
                 "image_proj.proj.2.weight": rand(tokens * cross, 2 * FACEID_WIDTH) * 2,
                 "image_proj.proj.2.bias": torch.zeros(tokens * cross),
                 "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
        for key_id, name in enumerate(unet.attn_processors):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            for proj, linear in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("out", attn.to_out[0])):
                state[f"ip_adapter.{key_id}.to_{proj}_lora.down.weight"] = rand(4, linear.in_features)
                state[f"ip_adapter.{key_id}.to_{proj}_lora.up.weight"] = rand(linear.out_features, 4)
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape[0]
            state[f"ip_adapter.{key}.to_k_ip.weight"] = rand(hidden, cross)
            state[f"ip_adapter.{key}.to_v_ip.weight"] = rand(hidden, cross) * 4
            key += 2
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "ip-adapter.safetensors"))
    return folder / "image_encoder", folder / "ip-adapter.safetensors"


def write_tiny_t2i_adapter(folder: Path, seed: int = 0, gain: float = 3.0) -> Path:
    """A T2I-Adapter for the tiny SD pipelines: diffusers' T2IAdapter of type full_adapter_xl with channels
    (32, 64, 64, 64) and pixel-unshuffle 4, whose first two features fit the tiny UNet's two down blocks (DownBlock2D
    adds its feature after down-sampling, CrossAttnDownBlock2D before); random weights × `gain`."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=4,
                         adapter_type="full_adapter_xl")
    with torch.no_grad():
        for p in adapter.parameters():
            p.mul_(gain)
    adapter.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def write_tiny_instantid(model_folder: Path, folder: Path, seed: int = 0, gain: float = 1.0) -> Path:
    """InstantID for the tiny SDXL pipeline, laid out as InstantX/InstantID ships it (reference/identity.md §4):
    `ControlNetModel/` (IdentityNet: write_tiny_controlnet, the UNet's encoder with random zero-convs) and
    `ip-adapter.bin` = {"image_proj": InstantID's Resampler in its own key layout (latents, proj_in, proj_out,
    norm_out, layers.N.0.{norm1, norm2, to_q, to_kv, to_out}, layers.N.1.{0, 1, 3}: depth 4, 2 heads × 64, 16
    queries, over FACEID_WIDTH-wide face embeddings), "ip_adapter": `<i>.to_{k,v}_ip.weight` for every
    cross-attention}, random weights × `gain`. Returns the folder."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    folder = Path(folder)
    write_tiny_controlnet(model_folder, folder / "ControlNetModel", seed, gain=0.5)
    unet = UNet2DConditionModel.from_pretrained(Path(model_folder) / "unet")
    cross = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    resampler = IPAdapterPlusImageProjection(embed_dims=FACEID_WIDTH, output_dims=cross, hidden_dims=128, heads=2,
                                             num_queries=16)
    theirs = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out",
              "ff.0": "1.0", "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}  # diffusers' name → InstantID's
    diffusers_state = resampler.state_dict()
    proj = {}
    for key, value in diffusers_state.items():
        if ".attn.to_v." in key:
            continue
        if ".attn.to_k." in key:  # InstantID keeps k and v in one to_kv
            proj[key.replace("attn.to_k", "0.to_kv")] = torch.cat([value, diffusers_state[key.replace("to_k", "to_v")]])
            continue
        for ours, original in theirs.items():
            key = key.replace(f".{ours}.", f".{original}.")
        proj[key] = value.detach().clone() * (gain if value.dim() > 1 else 1.0)
    g = torch.Generator().manual_seed(seed + 1)
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape[0]
            layers[f"{key}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * gain / cross ** 0.5
            layers[f"{key}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 4 * gain / cross ** 0.5
            key += 2
    torch.save({"image_proj": proj, "ip_adapter": layers}, folder / "ip-adapter.bin")
    return folder
