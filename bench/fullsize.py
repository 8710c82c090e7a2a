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
