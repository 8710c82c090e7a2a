"""LoRA key names of the flow-matching transformer families (FLUX.1, SD3 / SD3.5), for runtime/lora/keys.py.

Components and the names files give them:
- transformer: diffusers/PEFT and AI-toolkit `transformer.<diffusers path>.lora_A/lora_B`; the "mixture" spelling
  `lora_transformer_<path with "." → "_">`; and for FLUX.1, kohya/sd-scripts' `lora_unet_<BFL module>` over the
  original Black Forest Labs module names (below).
- CLIP encoders: `text_encoder[_2].…` and kohya `lora_te1_…` (CLIP-L), `lora_te2_…` (SD3's CLIP-G).
- T5 (`text_encoder_2` in FLUX.1, `text_encoder_3` in SD3): `text_encoder_2.` / `text_encoder_3.` + the
  T5EncoderModel path, and sd-scripts' `lora_te3_` + that path ("." → "_"); early sd-scripts FLUX.1 files used
  `lora_te2_` for T5 (FLUX.1 has no CLIP-G, so the name is unambiguous there). diffusers itself drops T5 keys.

The BFL names (FLUX.1's reference code; diffusers' `_convert_kohya_flux_lora_to_diffusers` documents the same
mapping, restated here): double block i (`transformer_blocks.i`): `img_attn_qkv` is one Linear producing q, k and
v side by side (diffusers: attn.to_q, to_k, to_v), `txt_attn_qkv` the same for the text stream (add_q_proj,
add_k_proj, add_v_proj), `img_attn_proj` / `txt_attn_proj` (attn.to_out.0 / attn.to_add_out), `img_mlp_0` /
`img_mlp_2` (ff.net.0.proj / ff.net.2), `txt_mlp_*` (ff_context.…), `img_mod_lin` / `txt_mod_lin` (norm1.linear /
norm1_context.linear); single block i (`single_transformer_blocks.i`): `linear1` produces q, k, v and the MLP input
side by side (attn.to_q, to_k, to_v, proj_mlp), `linear2` (proj_out), `modulation_lin` (norm.linear); the
embedders `img_in` (x_embedder), `txt_in` (context_embedder), `time_in_in_layer`/`_out_layer`
(time_text_embed.timestep_embedder.linear_1/2), `vector_in_*` (text_embedder), `guidance_in_*` (guidance_embedder);
`final_layer_linear` (proj_out) and `final_layer_adaLN_modulation_1` (norm_out.linear), whose output halves are
(shift, scale) where diffusers' are (scale, shift): its up weight's two row halves are swapped.

A fused key's delta is split by rows: up @ down has the fused Linear's output rows, and the rows of each diffusers
Linear (in the order above, each as wide as its weight) are its delta. diffusers splits the factors instead (the
down copied to each part, the up split by rows; or, when the up is block-sparse, both chunked), which gives the
same product.
"""

from __future__ import annotations

import re

T5_COMPONENT = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}
# kohya prefixes per component of the transformer families (the UNet families' are in keys.py)
KOHYA_PREFIXES = {
    "flux": {"transformer": ("lora_transformer_",), "text_encoder": ("lora_te_", "lora_te1_"),
             "text_encoder_2": ("lora_te3_", "lora_te2_")},
    "sd3": {"transformer": ("lora_transformer_",), "text_encoder": ("lora_te_", "lora_te1_"),
            "text_encoder_2": ("lora_te2_",), "text_encoder_3": ("lora_te3_",)},
}

# diffusers path (in a block) → (BFL name, its place among the parts of a fused Linear)
_DOUBLE = {"attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
           "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
           "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_out.0": ("img_attn_proj", 0),
           "attn.to_add_out": ("txt_attn_proj", 0), "ff.net.0.proj": ("img_mlp_0", 0), "ff.net.2": ("img_mlp_2", 0),
           "ff_context.net.0.proj": ("txt_mlp_0", 0), "ff_context.net.2": ("txt_mlp_2", 0),
           "norm1.linear": ("img_mod_lin", 0), "norm1_context.linear": ("txt_mod_lin", 0)}
_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
           "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0), "norm.linear": ("modulation_lin", 0)}
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
        "proj_out": "final_layer_linear", "norm_out.linear": "final_layer_adaLN_modulation_1"}
SWAPPED = {"lora_unet_final_layer_adaLN_modulation_1"}  # (shift, scale) in BFL's order, (scale, shift) in diffusers'


def bfl_name(path: str) -> tuple[str, int] | None:
    """(kohya `lora_unet_…` name, place in the fused Linear) of a FLUX.1 transformer module path, or None."""
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", path)
    if m:
        table, kind = (_DOUBLE, "double_blocks") if m[1] == "transformer_blocks" else (_SINGLE, "single_blocks")
        part = table.get(m[3])
        return (f"lora_unet_{kind}_{m[2]}_{part[0]}", part[1]) if part else None
    return ("lora_unet_" + _TOP[path], 0) if path in _TOP else None


def flux_groups(paths) -> dict[str, tuple[str, ...]]:
    """kohya BFL name → the transformer module paths it covers, in the order of their rows in its up weight."""
    placed: dict[str, dict[int, str]] = {}
    for path in paths:
        found = bfl_name(path)
        if found is not None:
            placed.setdefault(found[0], {})[found[1]] = path
    return {name: tuple(parts[i] for i in sorted(parts)) for name, parts in placed.items()}


def kohya_names(family: str, component: str, path: str) -> list[str]:
    """The kohya names (with `.` → `_`) of one module of a transformer-family component (BFL names aside)."""
    prefixes = KOHYA_PREFIXES[family].get(component, ())
    full = path if component in ("transformer", T5_COMPONENT[family]) or path.startswith("text_projection") \
        else "text_model." + path
    return [p + full.replace(".", "_") for p in prefixes]
