"""LoRA file keys → the model's modules (reference/customization.md §1.1, §1.3), for sdrt's own matcher.

A model is described by its *targets*: per component (`unet`, `text_encoder`, `text_encoder_2`), every module a
LoRA may patch (each Linear and Conv2d) with its weight's shape, named by its diffusers/transformers module path.
Text-encoder paths are canonical: without transformers' `text_model.` prefix (transformers 5 flattened
CLIPTextModel but not CLIPTextModelWithProjection), so files written against either layout match.

Rather than repairing a file's key string by string (diffusers' `_convert_unet_lora_key`), the matcher builds,
for the model at hand, every name a module may carry in a file and looks the file's keys up:
- kohya / AUTOMATIC1111: `lora_unet_<path with "." → "_">`, `lora_te_`/`lora_te1_` + `text_model_<path>` (the
  first text encoder), `lora_te2_…` (SDXL's second); for the UNet also the sgm/LDM spelling that kohya's SDXL
  trainer writes (`input_blocks_4_1_…`, `middle_block_…`, `output_blocks_…`, `in_layers_2`, `emb_layers_1`,
  `out_layers_3`, `skip_connection`, `op`, `time_embed_0`, `label_emb_0_0`, `out_2`), by the block arithmetic of
  diffusers' `_maybe_map_sgm_blocks_to_diffusers` run backwards;
- diffusers / PEFT: `unet.<path>.lora_A.weight` / `lora_B`, `text_encoder[_2].[text_model.]<path>…`, and the
  older `…processor.to_q_lora.down.weight` and `…lora_linear_layer.down.weight` spellings;
- the transformer families (SD3, FLUX.1): `transformer.<path>…`, `text_encoder_3.` (SD3's T5), and their kohya
  names, FLUX.1's over Black Forest Labs' module names: runtime/lora/flow_keys.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdrt.runtime.lora import flow_keys

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")  # transformer: SD3, FLUX.1
TEXT_PREFIX = "text_model."

Targets = dict  # component → {module path: weight shape (tuple)}


def canonical(component: str, module_path: str) -> str:
    """A torch module path as targets name it (text encoders without `text_model.`)."""
    if component != "unet" and module_path.startswith(TEXT_PREFIX):
        return module_path[len(TEXT_PREFIX):]
    return module_path


@dataclass(frozen=True)
class UnetLayout:
    """What the sgm block arithmetic needs from the UNet's config."""

    layers_per_block: int
    up_has_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: dict) -> "UnetLayout":
        lpb = config.get("layers_per_block", 2)
        lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
        ups = tuple("CrossAttn" in t for t in config.get("up_block_types", ()))
        return cls(int(lpb), ups)


_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_TOP_SGM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}


def sgm_path(path: str, layout: UnetLayout) -> str | None:
    """The sgm/LDM module path of a diffusers UNet module path (None where there is none)."""
    if path in _TOP_SGM:
        return _TOP_SGM[path]
    step = layout.layers_per_block + 1

    def resnet_rest(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return _RESNET_SGM.get(rest, _RESNET_SGM.get(head, head) + ("." + tail if tail else ""))

    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", path)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * step}.0.{'op' if rest == 'conv' else rest}"
        if kind == "resnets":
            return f"input_blocks.{1 + b * step + j}.0.{resnet_rest(rest)}"
        return f"input_blocks.{1 + b * step + j}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if j == 0 else 2}.{resnet_rest(rest)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", path)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            has_attn = layout.up_has_attention[b] if b < len(layout.up_has_attention) else True
            return f"output_blocks.{b * step + layout.layers_per_block}.{2 if has_attn else 1}.{rest}"
        if kind == "resnets":
            return f"output_blocks.{b * step + j}.0.{resnet_rest(rest)}"
        return f"output_blocks.{b * step + j}.1.{rest}"
    return None


def _u(path: str) -> str:
    return path.replace(".", "_")


def kohya_names(component: str, path: str, layout: UnetLayout | None, family: str = "") -> list[str]:
    """Every kohya/AUTOMATIC1111 module name (the part before `.lora_down.weight`) of one target."""
    if family in flow_keys.KOHYA_PREFIXES:  # SD3, FLUX.1: runtime/lora/flow_keys.py
        return flow_keys.kohya_names(family, component, path)
    if component == "unet":
        names = ["lora_unet_" + _u(path)]
        sgm = sgm_path(path, layout) if layout is not None else None
        if sgm is not None:
            names.append("lora_unet_" + _u(sgm))
        return names
    full = path if path.startswith("text_projection") else TEXT_PREFIX + path
    prefixes = ("lora_te_", "lora_te1_") if component == "text_encoder" else ("lora_te2_",)
    return [p + _u(full) for p in prefixes]


# ---- parsing one key ---------------------------------------------------------------------------------------

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "transformer.")
# kohya part → role
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid"}
# LyCORIS parts that are not LoRA: named in the refusal
LYCORIS_PARTS = {"hada_w1_a": "LoHa", "hada_w1_b": "LoHa", "hada_w2_a": "LoHa", "hada_w2_b": "LoHa",
                 "hada_t1": "LoHa", "hada_t2": "LoHa", "lokr_w1": "LoKr", "lokr_w2": "LoKr", "lokr_w1_a": "LoKr",
                 "lokr_w1_b": "LoKr", "lokr_w2_a": "LoKr", "lokr_w2_b": "LoKr", "lokr_t2": "LoKr",
                 "oft_blocks": "OFT", "oft_diag": "OFT", "diff": "full-weight difference", "diff_b": "bias difference",
                 "w_norm": "norm", "b_norm": "norm", "on_input": "IA3", "weight": "IA3", "dora_scale": "DoRA",
                 "lora_magnitude_vector": "DoRA"}
_DIFFUSERS_PART = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
    r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|lora_A\.bias|lora_B\.bias|alpha|"
    r"lora_magnitude_vector(?:\.weight)?)$")
_DIFFUSERS_ROLE = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
                   "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up", "alpha": "alpha",
                   "lora_A.bias": "bias", "lora_B.bias": "bias", "lora_magnitude_vector": "dora",
                   "lora_magnitude_vector.weight": "dora"}
_PROC_PART = re.compile(r"^(?P<module>.+_lora)\.(?P<role>down|up)\.weight$")
_ATTN_PROC = re.compile(r"^(?P<head>.*)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora$")
_TEXT_PROC = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


@dataclass(frozen=True)
class KeyPart:
    """One tensor of a LoRA file: which module (as the file names it), which role."""

    key: str
    style: str  # "kohya" | "diffusers"
    component: str | None  # diffusers style: from the prefix; kohya: decided by the lookup
    module: str  # kohya: the lora name (`lora_unet_…`); diffusers: the canonical module path
    role: str  # down | up | alpha | mid | bias | dora | other:<part>


def parse_key(key: str) -> KeyPart | None:
    """The role of one key, or None for a key that is neither kohya nor diffusers LoRA."""
    if key.startswith(KOHYA_PREFIXES):
        name, _, part = key.partition(".")
        role = KOHYA_PARTS.get(part)
        if role is None:
            role = "other:" + part
        return KeyPart(key, "kohya", None, name, role)
    if key.startswith(DIFFUSERS_PREFIXES):
        component, _, rest = key.partition(".")
        old = _PROC_PART.match(rest)  # `…to_q_lora.down.weight` (attention processors, older text encoders)
        m = _DIFFUSERS_PART.match(rest)
        if old is not None:
            module, role = old["module"], old["role"]
        elif m is not None:
            module, role = m["module"], _DIFFUSERS_ROLE[m["part"]]
        else:
            return KeyPart(key, "diffusers", component, rest, "other:" + rest.rsplit(".", 1)[-1])
        proc = _ATTN_PROC.match(module)
        if proc:  # diffusers' attention-processor format
            module = proc["head"] + "." + ("to_out.0" if proc["proj"] == "to_out" else proc["proj"])
        else:
            head, _, last = module.rpartition(".")
            if last in _TEXT_PROC and component != "unet":
                module = head + "." + _TEXT_PROC[last]
        return KeyPart(key, "diffusers", component, canonical(component, module), role)
    return None


def lookup_table(targets: Targets, layout: UnetLayout | None, family: str = "") -> dict[str, tuple]:
    """kohya module name → (component, module paths, swap): for every target of the model its own names, and for
    FLUX.1 the BFL names, one of which may cover several modules (its rows split among them, in that order;
    `swap`: the up weight's two row halves exchanged; runtime/lora/flow_keys.py)."""
    table = {}
    for component, modules in targets.items():
        for path in modules:
            for name in kohya_names(component, path, layout, family):
                table.setdefault(name, (component, (path,), False))
    if family == "flux" and "transformer" in targets:
        for name, paths in flow_keys.flux_groups(targets["transformer"]).items():
            table.setdefault(name, ("transformer", paths, name in flow_keys.SWAPPED))
    return table
