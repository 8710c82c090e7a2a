"""IP-Adapter at export (reference/customization.md §7): the CLIP image encoder as `image_encoder/model.onnx` and
`unet_ip/model.onnx`, the UNet with the adapter loaded (diffusers' load_ip_adapter) taking the image embeddings and
the adapter's scale as inputs. Plain runs keep the plain UNet graph.

image_encoder: pixel_values [B,3,S,S] (CLIPImageProcessor output) → image_embeds [B,D] (CLIPVisionModelWithProjection's
projection; plain adapters) and penultimate_hidden_states [B,T,W] (hidden_states[-2]; "plus" adapters).
unet_ip: the UNet's inputs + ip_image_embeds_0 ([B, images, D] plain, [B, images, T, W] plus) and ip_scale_0 (rank 0,
fp32) → out_sample. The scale is a graph input: every IPAdapterAttnProcessor2_0 gets it as a tensor while tracing
(diffusers keeps a Python float, which a trace would bake in); hidden += scale · attention(ip) is then the graph's
own multiply, and scale 0 adds exact zeros where diffusers skips the branch.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sdrt.runtime.errors import UserError

from .components import ComponentSpec, Shape, _unet_spec, split_added_cond
from .load import sha256_of_files

IMAGE_ENCODER = "image_encoder"
UNET_IP = "unet_ip"
UNET_CONTROLNET_IP = "unet_controlnet_ip"  # both: ControlNet residual inputs and the image prompt


@dataclass(frozen=True)
class IpAdapterSource:
    adapter: str  # .safetensors / .bin in diffusers' IP-Adapter format (image_proj.* and ip_adapter.* keys)
    image_encoder: str | None  # CLIPVisionModelWithProjection folder


def check_source(src: IpAdapterSource) -> None:
    """Before the model loads: both files there, and an image encoder given."""
    path = Path(src.adapter).expanduser()
    if not path.is_file():
        raise UserError(f"--ip-adapter {src.adapter}: no such file (give the adapter's .safetensors or .bin)")
    if src.image_encoder is None:
        raise UserError(f"--ip-adapter {src.adapter} needs --image-encoder: the CLIP vision model (a diffusers/"
                        "transformers folder) the adapter was trained with")
    enc = Path(src.image_encoder).expanduser()
    if not (enc / "config.json").is_file():
        raise UserError(f"--image-encoder {src.image_encoder}: not a CLIPVisionModelWithProjection folder "
                        "(no config.json)")


def kind(state_dict_keys) -> str:
    """From the image_proj keys, as diffusers' _convert_ip_adapter_image_proj_to_diffusers tells them apart:
    plain (ImageProjection: proj.weight), full (IP-Adapter Full Face, IPAdapterFullImageProjection: proj.0/proj.3)
    or plus (Resampler: latents; IP-Adapter Plus and Plus Face share it). plain takes the encoder's image_embeds,
    full and plus its penultimate hidden states."""
    keys = list(state_dict_keys)
    if "proj.weight" in keys:
        return "plain"
    if "proj.3.weight" in keys and "perceiver_resampler.proj_in.weight" not in keys:
        return "full"
    if "latents" in keys:
        return "plus"
    raise UserError("this IP-Adapter's image projection is not IP-Adapter (proj.weight), Full Face (proj.3.weight) "
                    "or Plus / Plus Face (latents); sdrt exports those (FaceID takes face-recognition embeddings "
                    "that no exported encoder computes)")


def uses_hidden_states(adapter_kind: str) -> bool:
    """diffusers' prepare_ip_adapter_image_embeds: every projection but ImageProjection takes hidden_states[-2]."""
    return adapter_kind != "plain"


def load(pipe, src: IpAdapterSource) -> dict:
    """Load the image encoder and the adapter (into a copy of the UNet: the plain UNet stays as it is).
    Returns {"unet": adapted UNet, "encoder": CLIPVisionModelWithProjection, "processor": CLIPImageProcessor config,
    "record": manifest entry}."""
    from diffusers.models.modeling_utils import load_state_dict
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    adapter = Path(src.adapter).expanduser()
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(Path(src.image_encoder).expanduser(),
                                                                torch_dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"--image-encoder {src.image_encoder}: cannot load ({str(e).splitlines()[0]})") from None
    try:
        if adapter.suffix == ".safetensors":
            from safetensors import safe_open

            state = {"image_proj": {}, "ip_adapter": {}}
            with safe_open(str(adapter), framework="pt") as f:
                for key in f.keys():
                    head, _, rest = key.partition(".")
                    if head in state:
                        state[head][rest] = f.get_tensor(key)
        else:
            state = load_state_dict(str(adapter))
    except Exception as e:  # safetensors/torch raise their own errors on damaged files
        raise UserError(f"--ip-adapter {src.adapter}: cannot read ({str(e).splitlines()[0]})") from None
    if not state.get("image_proj") or not state.get("ip_adapter"):
        raise UserError(f"--ip-adapter {src.adapter}: no image_proj.* and ip_adapter.* weights; give an adapter in "
                        "diffusers' IP-Adapter format")
    adapter_kind = kind(state["image_proj"])
    embed_dim = state["image_proj"][{"plain": "proj.weight", "full": "proj.0.weight",
                                     "plus": "proj_in.weight"}[adapter_kind]].shape[-1]
    expected = encoder.config.projection_dim if adapter_kind == "plain" else encoder.config.hidden_size
    if embed_dim != expected:
        raise UserError(f"--ip-adapter {src.adapter} takes image embeddings of width {embed_dim}; the image encoder "
                        f"gives {expected}: give the image encoder the adapter was trained with")
    unet = copy.deepcopy(pipe.unet)
    try:
        unet._load_ip_adapter_weights([state])
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"--ip-adapter {src.adapter} does not fit this model's UNet ({str(e).splitlines()[0]}); "
                        "give an adapter made for this family") from None
    unet.eval()
    unet.encoder_hid_proj.lora_target = False  # the adapter's own layers: no LoRA patches them (export/weights_map)
    for p in unet.attn_processors.values():
        if isinstance(p, torch.nn.Module):
            p.lora_target = False
    processor = pipe.feature_extractor if getattr(pipe, "feature_extractor", None) is not None else \
        CLIPImageProcessor(size=encoder.config.image_size, crop_size=encoder.config.image_size)  # load_ip_adapter's
    record = {"source": src.adapter, "sha256": sha256_of_files([adapter], adapter.parent), "kind": adapter_kind,
              "image_encoder": src.image_encoder}
    return {"unet": unet, "encoder": encoder, "processor": processor.to_dict(), "record": record}


class _ImageEncoder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):
        out = self.encoder(pixel_values, output_hidden_states=True, return_dict=True)
        return out.image_embeds, out.hidden_states[-2]


class _UNetIp(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids][, residuals…], ip_image_embeds_0,
    ip_scale_0) → out_sample; `residuals` down-block residuals and the mid one when ControlNets feed it."""

    def __init__(self, unet, added: bool, residuals: int = 0):
        super().__init__()
        self.unet = unet
        self.added = added
        self.residuals = residuals

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        added, rest = split_added_cond(rest, self.added)
        control = {}
        if self.residuals:
            *down, mid = rest[:self.residuals]
            rest = rest[self.residuals:]
            control = {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
        embeds, scale = rest
        processors = [p for p in self.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
        saved = [p.scale for p in processors]
        for p in processors:
            p.scale = [scale]
        try:
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=(added or {}) | {"image_embeds": [embeds]},
                             return_dict=False, **control)[0]
        finally:
            for p, s in zip(processors, saved):
                p.scale = s


def image_encoder_spec(loaded: dict) -> ComponentSpec:
    encoder = loaded["encoder"]
    size = encoder.config.image_size

    def make_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch)
        return (torch.randn(shape.batch, 3, size, size, generator=g).to(dtype),)

    axes = {"pixel_values": {0: "batch_size"}, "image_embeds": {0: "batch_size"},
            "penultimate_hidden_states": {0: "batch_size"}}
    return ComponentSpec(IMAGE_ENCODER, ("pixel_values",), ("image_embeds", "penultimate_hidden_states"), axes,
                         lambda p: _ImageEncoder(encoder), make_inputs, owner=lambda p: encoder)


def unet_ip_spec(pipe, loaded: dict, with_residuals: bool = False) -> ComponentSpec:
    """unet_ip, or with_residuals unet_controlnet_ip (the residual inputs of export/controlnet.py too)."""
    unet = loaded["unet"]
    added = unet.config.addition_embed_type == "text_time"
    base = _unet_spec(added)
    if with_residuals:
        from .controlnet import unet_residual_spec

        base = unet_residual_spec(pipe)
    residuals = len(base.input_names) - len(_unet_spec(added).input_names)
    enc = loaded["encoder"].config
    plus = uses_hidden_states(loaded["record"]["kind"])
    tokens = (enc.image_size // enc.patch_size) ** 2 + 1

    def make_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch * 13 + shape.latent_height)
        dims = (shape.batch, 1, tokens, enc.hidden_size) if plus else (shape.batch, 1, enc.projection_dim)
        return base.make_inputs(p, shape, dtype) + (torch.randn(*dims, generator=g).to(dtype), torch.tensor(0.8))

    axes = base.dynamic_axes | {"ip_image_embeds_0": {0: "batch_size", 1: "ip_images"}}
    return ComponentSpec(UNET_CONTROLNET_IP if with_residuals else UNET_IP,
                         base.input_names + ("ip_image_embeds_0", "ip_scale_0"), base.output_names, axes,
                         lambda p: _UNetIp(unet, added, residuals), make_inputs, ("timestep", "ip_scale_0"),
                         owner=lambda p: unet)


def write_configs(tmp: Path, loaded: dict) -> None:
    (tmp / IMAGE_ENCODER).mkdir(parents=True, exist_ok=True)
    (tmp / IMAGE_ENCODER / "config.json").write_text(loaded["encoder"].config.to_json_string())
    (tmp / IMAGE_ENCODER / "preprocessor_config.json").write_text(json.dumps(loaded["processor"], indent=2,
                                                                             default=str))
    for name in (UNET_IP, UNET_CONTROLNET_IP):
        if (tmp / name).is_dir():
            (tmp / name / "config.json").write_text(json.dumps(dict(loaded["unet"].config), indent=2, default=str))
