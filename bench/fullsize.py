"""Full-size SD 1.5 / SD 2.1 / SDXL architectures from their published configs (bench/configs/*.json), random weights.

Speed and memory do not depend on weight values, so benchmarks need no download. The tokenizer is the
small locally trained CLIP tokenizer (ids stay below the real 49408-entry embedding table).
"""

from __future__ import annotations

import json
import tempfile
from importlib.resources import files
from pathlib import Path

import torch

from sdrt.bench.scenarios import ARCHITECTURES


def config(arch: str) -> dict:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return json.loads(files("sdrt.bench").joinpath("configs", f"{arch}.json").read_text())


def pad_token(cfg: dict, tokenizer: str) -> str:
    """As the published tokenizer pads: "<|endoftext|>" (CLIP-L) or "!" (OpenCLIP: SD 2.x, SDXL's second)."""
    return cfg["pad_tokens"][tokenizer]


def build_scheduler(cfg: dict):
    """from_config, like loading the published folder: it ignores keys another scheduler class wrote
    (SD 2.1's DDIM config carries PNDM's skip_prk_steps)."""
    import diffusers

    scheduler_cfg = dict(cfg["scheduler"])
    return getattr(diffusers, scheduler_cfg.pop("_class_name")).from_config(scheduler_cfg)


def build(arch: str, seed: int = 0):
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdrt.export.models.tiny_tokenizer import write_clip_tokenizer

    cfg = config(arch)
    torch.manual_seed(seed)
    parts = {}
    with tempfile.TemporaryDirectory() as scratch:
        for enc, tok, cls in (("text_encoder", "tokenizer", CLIPTextModel),
                              ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)):
            if enc not in cfg:
                continue
            vocab = write_clip_tokenizer(Path(scratch) / tok, pad_token=pad_token(cfg, tok))
            text_cfg = CLIPTextConfig(**{**cfg[enc], "bos_token_id": vocab - 2, "eos_token_id": vocab - 1})
            parts[enc] = cls(text_cfg)
            parts[tok] = CLIPTokenizer.from_pretrained(Path(scratch) / tok)
    unet = diffusers.UNet2DConditionModel(**cfg["unet"])
    vae = diffusers.AutoencoderKL(**cfg["vae"])
    scheduler = build_scheduler(cfg)
    pipeline_cls = getattr(diffusers, cfg["pipeline_class"])
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if cfg["pipeline_class"] == "StableDiffusionPipeline" else {}
    return pipeline_cls(unet=unet, vae=vae, scheduler=scheduler, **parts, **extra)


def write(arch: str, folder: Path, seed: int = 0) -> Path:
    from sdrt.bench import fullsize_flow
    from sdrt.export.models.tiny_tokenizer import write_clip_tokenizer

    if arch in fullsize_flow.FLOW_ARCHITECTURES:  # written one component at a time
        return fullsize_flow.write(arch, Path(folder), seed)

    build(arch, seed).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if (Path(folder) / name).is_dir():
            write_clip_tokenizer(Path(folder) / name, pad_token=pad_token(config(arch), name))
    return Path(folder)


PULID_TOKENS, PULID_LAYERS, PULID_HIDDEN = 5, 5, 1024  # PuLID's IDEncoder: 5 body tokens, 5 EVA layers, 1024-wide MLPs
PULID_ID_COND = 512 + 768  # ArcFace ‖ EVA-CLIP


def _pulid_mlp(prefix: str, widths: tuple[int, ...], g: torch.Generator) -> dict:
    """Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear at the file's indices 0, 1, 3, 4, 6."""
    state, (w_in, h1, h2, w_out) = {}, widths
    for index, (fan_in, fan_out) in zip((0, 3, 6), ((w_in, h1), (h1, h2), (h2, w_out))):
        state[f"{prefix}.{index}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
        state[f"{prefix}.{index}.bias"] = torch.zeros(fan_out)
    for index, width in ((1, h1), (4, h2)):
        state[f"{prefix}.{index}.weight"], state[f"{prefix}.{index}.bias"] = torch.ones(width), torch.zeros(width)
    return state


def pulid_state(model_folder: Path, seed: int = 0) -> dict:
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(model_folder / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    cross = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    state = _pulid_mlp("id_adapter.body", (PULID_ID_COND, PULID_HIDDEN, PULID_HIDDEN, cross * PULID_TOKENS), g)
    for j in range(PULID_LAYERS):
        state |= _pulid_mlp(f"id_adapter.mapping_{j}", (PULID_HIDDEN, PULID_HIDDEN, PULID_HIDDEN, cross), g)
        state |= _pulid_mlp(f"id_adapter.mapping_patch_{j}", (PULID_HIDDEN, PULID_HIDDEN, PULID_HIDDEN, cross), g)
    for i, name in enumerate(unet.attn_processors):  # the file's <i>: the position in attn_processors
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape[0]
            for proj in ("id_to_k", "id_to_v"):
                state[f"id_adapter_attn_layers.{i}.{proj}.weight"] = torch.randn(hidden, cross, generator=g) / cross ** 0.5
    return state


def write_pulid(model_folder: Path, out: Path, seed: int = 0) -> str:
    """A PuLID v1 file at full size for the folder's UNet (random weights): the layout of guozinan/PuLID's
    pulid_v1.bin (reference/identity.md §3: IDEncoder 54.9 M params, 70 id_to_k/id_to_v pairs 340.8 M on SDXL), for
    `sdrt bench --conditioning`. Returns a one-line summary."""
    state = pulid_state(Path(model_folder), seed)
    partial = Path(out).with_name(Path(out).name + ".partial")
    torch.save(state, partial)
    partial.rename(out)
    params = sum(v.numel() for v in state.values())
    return f"{out}: {params / 1e6:.1f} M parameters, {Path(out).stat().st_size / 1e9:.2f} GB"


if __name__ == "__main__":  # python -m sdrt.bench.fullsize --pulid MODEL_FOLDER OUT.bin
    import argparse

    parser = argparse.ArgumentParser(description="a full-size random-weight PuLID v1 file for a model folder's UNet")
    parser.add_argument("--pulid", nargs=2, metavar=("MODEL_FOLDER", "OUT"), type=Path, required=True)
    args = parser.parse_args()
    print(write_pulid(*args.pulid))
