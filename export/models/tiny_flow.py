"""Tiny flow-matching transformer pipelines: Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline).

Real diffusers/transformers classes scaled down (../shared/reference/flow_models.md §5), random weights from a
seed, all offline: two CLIP encoders with projection over sdrt's locally trained CLIP tokenizer (tiny_tokenizer.py),
a T5 encoder over a SentencePiece-style Unigram tokenizer trained here with the `tokenizers` library (saved as
tokenizer.json + tokenizer_config.json, which transformers' T5Tokenizer loads; its post-processor appends </s>),
an SD3Transformer2DModel, a 16-channel AutoencoderKL with shift and scale, FlowMatchEulerDiscreteScheduler(shift 3).

Random weights hide mistakes (§5): the velocity barely depends on the timestep or the text and GroupNorm absorbs a
latent offset. So the timestep/pooled embedders, the AdaLN linears, the context embedder and the output projection
are scaled up, and the VAE's shift_factor is large against the latents' spread: a wrong shift, guidance, sequence
length or an ignored shift_factor then moves the image by tens of levels (tests/test_sd3.py checks it).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from sdrt.export.models.tiny_tokenizer import EOS, _CORPUS, write_clip_tokenizer

CLIP_WIDTH = 32
CLIP_PROJECTION = 32
T5_WIDTH = 96  # joint_attention_dim: at least the two CLIP widths side by side (diffusers pads them to it)
T5_VOCAB = 160
LATENT_CHANNELS = 16
SHIFT_FACTOR = 1.0  # large against the latents' spread (std ≈ 1.4 after 1/scaling; real SD3: 0.0609, 1.5305)
SCALING_FACTOR = 1.5
SCHEDULER_SHIFT = 3.0
# (module name pattern, gain): the layers §5 asks to scale up. The output projection is scaled *down* instead:
# with the AdaLN gains its velocity came out at std ≈ 17, which buried the VAE's shift under the latents' spread;
# at 0.3 the final latents have std ≈ 2 and every mistake below still moves the image by tens of levels
# (measured with diffusers, 5 steps, 48×32, guidance 4: shift 1 instead of 3 → 89 levels max, no shift_factor
# → 115, guidance 5 → 46, no negative prompt → 120, max_sequence_length 128 → 19).
_GAINS = (("time_text_embed", 3.0), ("norm1.linear", 2.5), ("norm1_context.linear", 2.5), ("norm_out.linear", 2.5),
          ("context_embedder", 3.0), ("proj_out", 0.3))


def write_t5_tokenizer(folder: Path, vocab_size: int = T5_VOCAB) -> int:
    """A Unigram tokenizer in T5's layout (<pad> 0, </s> 1, <unk> 2; Metaspace "▁" pieces; "$A </s>"), trained on
    sdrt's prompt corpus; saved through transformers' T5Tokenizer (tokenizer.json + tokenizer_config.json) with
    no extra ids. Returns the vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", shrinking_factor=0.75)
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()], trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    folder.mkdir(parents=True, exist_ok=True)
    fast = T5Tokenizer(tokenizer_object=tok, extra_ids=0, model_max_length=512)
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def _clip(root: Path, name: str, tok_name: str, pad: str, layers: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = write_clip_tokenizer(root / tok_name, pad_token=pad)
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=CLIP_WIDTH, intermediate_size=37, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                            projection_dim=CLIP_PROJECTION, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                            pad_token_id=1)
    return {name: CLIPTextModelWithProjection(config), tok_name: CLIPTokenizer.from_pretrained(root / tok_name)}


def _t5(root: Path):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = write_t5_tokenizer(root / "tokenizer_3")
    config = T5Config(vocab_size=vocab, d_model=T5_WIDTH, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return {"text_encoder_3": T5EncoderModel(config), "tokenizer_3": T5Tokenizer.from_pretrained(root / "tokenizer_3")}


def _transformer(sd35: bool = False):
    """SD3's MMDiT; `sd35`: SD3.5 medium's additions, a dual-attention first layer and RMSNorm on q and k."""
    from diffusers import SD3Transformer2DModel

    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}
    model = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_PROJECTION, out_channels=LATENT_CHANNELS, pos_embed_max_size=32, **extra)
    with torch.no_grad():
        for name, module in model.named_modules():
            gain = next((g for pattern, g in _GAINS if name.endswith(pattern) or f".{pattern}." in f".{name}."), None)
            if gain is not None and isinstance(module, torch.nn.Linear):
                module.weight.mul_(gain)
    return model


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
        norm_num_groups=32, sample_size=32, scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=False)


def build_tiny_sd3(root: Path, seed: int = 0, sd35: bool = False):
    """The StableDiffusion3Pipeline object (`sd35`: SD3.5 medium's transformer layout); `root` holds its tokenizer
    files while it is built."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    parts = _clip(root, "text_encoder", "tokenizer", EOS, 3) | _clip(root, "text_encoder_2", "tokenizer_2", "!", 3)
    parts |= _t5(root)
    return StableDiffusion3Pipeline(transformer=_transformer(sd35), vae=_vae(),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT), **parts)


def write_tiny_sd3(folder: Path, seed: int = 0, sd35: bool = False) -> Path:
    """Save the tiny SD3 (or, `sd35`, SD3.5 medium-layout) pipeline as a diffusers folder (safetensors);
    `from_pretrained(folder)` loads it offline."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:
        pipe = build_tiny_sd3(Path(scratch), seed, sd35)
        pipe.save_pretrained(folder, safe_serialization=True)
    for name, pad in (("tokenizer", EOS), ("tokenizer_2", "!")):  # CLIP's own files beside tokenizer.json
        write_clip_tokenizer(folder / name, pad_token=pad)
    config = json.loads((folder / "tokenizer_3" / "tokenizer_config.json").read_text())
    assert config.get("eos_token") == "</s>", config  # what diffusers' T5 truncation relies on
    return folder


# ---- FLUX.1 (FluxPipeline) -----------------------------------------------------------------------------------------
# schnell: no guidance embedding, static shift 1; dev: guidance_embeds and dynamic shifting. The dev scheduler's
# sequence-length line is steep over the tiny images' packed lengths (tens to hundreds of tokens), so that a wrong
# sequence length (e.g. h·w instead of (h/2)·(w/2)) moves mu by whole units, not by the 0.05 the real line would.
FLUX_SCHEDULERS = {
    "schnell": {"shift": 1.0, "use_dynamic_shifting": False},
    "dev": {"shift": 3.0, "use_dynamic_shifting": True, "base_image_seq_len": 16, "max_image_seq_len": 256,
            "base_shift": 0.5, "max_shift": 3.0},
}
_FLUX_GAINS = (("time_text_embed", 3.0), ("norm1.linear", 2.5), ("norm1_context.linear", 2.5), ("norm.linear", 2.5),
               ("norm_out.linear", 2.5), ("context_embedder", 3.0), ("proj_out", 3.0))


def _flux_transformer(guidance: bool):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        axes_dims_rope=(4, 6, 6), guidance_embeds=guidance)
    with torch.no_grad():
        for name, module in model.named_modules():
            gain = next((g for pattern, g in _FLUX_GAINS if name.endswith(pattern)), None)
            if gain is not None and isinstance(module, torch.nn.Linear):
                module.weight.mul_(gain)
            elif name.startswith("time_text_embed") and isinstance(module, torch.nn.Linear):
                module.weight.mul_(3.0)
    return model


def build_tiny_flux(root: Path, variant: str = "schnell", seed: int = 0):
    """The FluxPipeline object (variant "schnell" or "dev"); `root` holds its tokenizer files while it is built."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if variant not in FLUX_SCHEDULERS:
        raise ValueError(f"variant must be one of {', '.join(FLUX_SCHEDULERS)}, not {variant!r}")
    torch.manual_seed(seed)
    vocab = write_clip_tokenizer(root / "tokenizer", pad_token=EOS)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=CLIP_WIDTH, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1,
        pad_token_id=1))
    t5 = _t5(root)  # SD3's tiny T5 (text_encoder_3 there), Flux's second encoder
    return FluxPipeline(transformer=_flux_transformer(variant == "dev"), vae=_vae(),
                        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[variant]),
                        text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
                        text_encoder_2=t5["text_encoder_3"], tokenizer_2=t5["tokenizer_3"])


def write_tiny_flux(folder: Path, variant: str = "schnell", seed: int = 0) -> Path:
    """Save a tiny FLUX.1 pipeline (schnell or dev) as a diffusers folder; `FluxPipeline.from_pretrained(folder)`
    loads it offline."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:
        pipe = build_tiny_flux(Path(scratch), variant, seed)
        pipe.save_pretrained(folder, safe_serialization=True)
    write_clip_tokenizer(folder / "tokenizer", pad_token=EOS)  # CLIP's own files beside tokenizer.json
    return folder
