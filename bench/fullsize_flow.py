"""Full-width SD3.5-medium and FLUX.1-schnell architectures from their published configs (bench/configs/sd35m.json,
flux-schnell.json), random weights, written one component at a time so that building never holds the whole pipeline.

What does not fit this 24 GiB machine keeps its full width at reduced depth, as each config's "reduced" entry says
(FLUX.1's transformer: 2 double + 4 single blocks; T5-XXL: 4 layers). The tokenizers are sdrt's locally trained
ones (export/models/tiny_tokenizer.py, tiny_flow.write_t5_tokenizer); their ids stay below the real tables' sizes.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

FLOW_ARCHITECTURES = ("sd35m", "flux-schnell")
CLIP_VOCAB = 49408
T5_VOCAB = 32128


def config(arch: str, full_depth: bool = False) -> dict:
    """The architecture's config; with the "reduced" overrides applied unless `full_depth`."""
    cfg = json.loads((Path(__file__).parent / "configs" / f"{arch}.json").read_text())
    if not full_depth:
        for component, changes in cfg.get("reduced", {}).items():
            cfg[component] = {**cfg[component], **changes}
    return cfg


def _clip(cfg: dict, with_projection: bool, vocab: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text = CLIPTextConfig(**cfg, vocab_size=CLIP_VOCAB, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(text)


def _t5(cfg: dict):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**cfg, vocab_size=T5_VOCAB, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


def write(arch: str, folder: Path, seed: int = 0, full_depth: bool = False) -> Path:
    """Write the random-weight pipeline folder; `from_pretrained(folder)` loads it offline."""
    import diffusers
    import transformers

    from sdrt.export.models.tiny_flow import write_t5_tokenizer
    from sdrt.export.models.tiny_tokenizer import write_clip_tokenizer

    if arch not in FLOW_ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(FLOW_ARCHITECTURES)}")
    cfg = config(arch, full_depth)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sd3 = arch == "sd35m"
    index = {"_class_name": cfg["pipeline_class"], "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", cfg["scheduler"]["_class_name"]], "vae": ["diffusers", "AutoencoderKL"],
             "transformer": ["diffusers", "SD3Transformer2DModel" if sd3 else "FluxTransformer2DModel"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    clip_vocab = write_clip_tokenizer(folder / "tokenizer", pad_token=cfg["pad_tokens"]["tokenizer"])
    encoders = [("text_encoder", "tokenizer", sd3)] + ([("text_encoder_2", "tokenizer_2", True)] if sd3 else [])
    for enc, tok, projection in encoders:
        vocab = write_clip_tokenizer(folder / tok, pad_token=cfg["pad_tokens"][tok]) if tok != "tokenizer" else clip_vocab
        module = _clip(cfg[enc], projection, vocab)
        module.save_pretrained(folder / enc, safe_serialization=True)
        index[enc], index[tok] = ["transformers", type(module).__name__], ["transformers", "CLIPTokenizer"]
        del module
    t5_enc, t5_tok = ("text_encoder_3", "tokenizer_3") if sd3 else ("text_encoder_2", "tokenizer_2")
    write_t5_tokenizer(folder / t5_tok)
    (folder / t5_tok / "config.json").unlink(missing_ok=True)
    module = _t5(cfg[t5_enc])
    module.save_pretrained(folder / t5_enc, safe_serialization=True)
    index[t5_enc] = ["transformers", "T5EncoderModel"]
    index[t5_tok] = ["transformers", "T5Tokenizer"]
    del module
    gc.collect()
    transformer_cls = diffusers.SD3Transformer2DModel if sd3 else diffusers.FluxTransformer2DModel
    module = transformer_cls(**cfg["transformer"])
    module.save_pretrained(folder / "transformer", safe_serialization=True)
    del module
    gc.collect()
    diffusers.AutoencoderKL(**cfg["vae"]).save_pretrained(folder / "vae", safe_serialization=True)
    scheduler_cfg = dict(cfg["scheduler"])
    getattr(diffusers, scheduler_cfg.pop("_class_name"))(**scheduler_cfg).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    assert transformers  # the classes named in model_index.json come from it
    return folder


def parameters(arch: str, full_depth: bool = False) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory)."""
    import diffusers

    cfg = config(arch, full_depth)
    sd3 = arch == "sd35m"
    with torch.device("meta"):
        parts = {"transformer": (diffusers.SD3Transformer2DModel if sd3 else diffusers.FluxTransformer2DModel)(
            **cfg["transformer"]), "text_encoder": _clip(cfg["text_encoder"], sd3, CLIP_VOCAB),
            ("text_encoder_3" if sd3 else "text_encoder_2"): _t5(cfg["text_encoder_3" if sd3 else "text_encoder_2"]),
            "vae": diffusers.AutoencoderKL(**cfg["vae"])}
        if sd3:
            parts["text_encoder_2"] = _clip(cfg["text_encoder_2"], True, CLIP_VOCAB)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
