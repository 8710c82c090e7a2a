"""ControlNets at export: each a component `controlnet/NAME` (reference/customization.md §4.3, separate graphs),
plus `unet_controlnet`, the UNet with the residual inputs (plain runs keep the plain UNet graph).

controlnet/NAME: sample [B,4,h,w], timestep (rank 0, fp32), encoder_hidden_states [B,S,D] (S dynamic: 77 text tokens, InstantID 16),
controlnet_cond [B,3,H,W] in [0,1], conditioning_scale (rank 0, fp32) [, text_embeds, time_ids]
→ down_block_res_sample_0…k, mid_block_res_sample: diffusers' ControlNetModel.forward at scale 1 (its own
`sample * 1.0`, exact), each output × conditioning_scale (as its non-guess branch, L787-788). Guess mode's
per-residual logspace factors are applied by the runtime with conditioning_scale 1 (runtime/conditioning/controlnet.py).
unet_controlnet: the UNet's inputs + down_block_additional_residual_0…k, mid_block_additional_residual → out_sample
(UNet2DConditionModel's down_block_additional_residuals / mid_block_additional_residual).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from sdrt.runtime.conditioning.controlnet import (MID, MID_INPUT, NAME_PATTERN, PREFIX, UNET_CONTROLNET, down_input,
    down_output, residual_shapes)
from sdrt.runtime.errors import UserError

from sdrt.export.components import ComponentSpec, Shape, _unet_spec, split_added_cond, vae_scale_factor
from sdrt.export.load import SINGLE_FILE_SUFFIXES, sha256_of_files

_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "SDXL refiner"}


@dataclass(frozen=True)
class ControlNetSource:
    source: str
    name: str


def parse_arg(text: str) -> ControlNetSource:
    """`SRC` or `SRC=NAME`; NAME defaults to the folder's name or the file's stem."""
    src, _, name = text.rpartition("=")
    if not src:
        src, name = text, ""
    name = name or Path(src.rstrip("/")).stem
    if not NAME_PATTERN.match(name):
        raise UserError(f"--controlnet {text}: the name {name!r} must be letters, digits, '_', '.' or '-' "
                        "(give one with SRC=NAME)")
    return ControlNetSource(src, name)


def check_source(src: ControlNetSource) -> None:
    """Before the model loads: a local source must exist and look like a ControlNet."""
    path = Path(src.source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--controlnet {src.source}: not a diffusers ControlNet folder (no config.json)")
        return
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise UserError(f"--controlnet {src.source}: no such file")
        return
    if path.exists() or "/" not in src.source or src.source.startswith((".", "/", "~")):
        raise UserError(f"--controlnet {src.source}: not a ControlNet folder, .safetensors/.ckpt file or hub id")


def load(src: ControlNetSource):
    """(ControlNetModel in fp32, sha256 of its files or hub id)."""
    from diffusers import ControlNetModel

    path = Path(src.source).expanduser()
    try:
        if path.is_dir():
            net = ControlNetModel.from_pretrained(path, torch_dtype=torch.float32)
            digest = sha256_of_files([p for p in path.rglob("*") if p.is_file()], path)
        elif path.is_file():
            net = ControlNetModel.from_single_file(str(path), torch_dtype=torch.float32)
            digest = sha256_of_files([path], path.parent)
        else:
            net = ControlNetModel.from_pretrained(src.source, torch_dtype=torch.float32)
            digest = hashlib.sha256(f"hub:{src.source}".encode()).hexdigest()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"--controlnet {src.source}: cannot load a ControlNet ({str(e).splitlines()[0]})") from None
    return net.eval(), digest


def _width_text(width: int) -> str:
    return f"{width} ({_WIDTHS[width]})" if width in _WIDTHS else str(width)


def check_compatible(net, unet_config: dict, vae_factor: int, src: ControlNetSource) -> None:
    """The ControlNet must produce the residuals this UNet adds: same text width, added conditioning, down blocks."""
    c, u = net.config, unet_config
    what = f"--controlnet {src.source}"
    if c.cross_attention_dim != u["cross_attention_dim"]:
        raise UserError(f"{what} has cross-attention width {_width_text(c.cross_attention_dim)}; this model's UNet "
                        f"has {_width_text(u['cross_attention_dim'])}: give a ControlNet made for this family")
    if (c.addition_embed_type or None) != (u.get("addition_embed_type") or None):
        kinds = {True: "SDXL", False: "SD 1.x/2.x"}
        raise UserError(f"{what} is an {kinds[c.addition_embed_type == 'text_time']} ControlNet; this model is "
                        f"{kinds[u.get('addition_embed_type') == 'text_time']}: give a ControlNet made for this "
                        "family")
    same = (list(c.block_out_channels) == list(u["block_out_channels"])
            and c.layers_per_block == u["layers_per_block"])
    if not same:
        raise UserError(f"{what} has down blocks {list(c.block_out_channels)} × {c.layers_per_block} layers; this "
                        f"UNet has {list(u['block_out_channels'])} × {u['layers_per_block']}: its residuals would "
                        "not fit")
    factor = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
    if factor != vae_factor:
        raise UserError(f"{what} downsamples its control image by {factor}; this model's VAE by {vae_factor}")


class _ControlNet(torch.nn.Module):
    def __init__(self, net, added: bool):
        super().__init__()
        self.net = net
        self.added = added

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.added else None
        down, mid = self.net(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                             added_cond_kwargs=added, return_dict=False)
        scale = conditioning_scale.to(mid.dtype)
        return (*[d * scale for d in down], mid * scale)


class _UNetResiduals(torch.nn.Module):
    def __init__(self, unet, added: bool):
        super().__init__()
        self.unet = unet
        self.added = added

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added, rest = split_added_cond(rest, self.added)
        *down, mid = rest
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid,
                         return_dict=False)[0]


def _dim(name: str, div: int) -> str:
    return name if div == 1 else f"{name}_div{div}"


def _residual_axes(shapes) -> list[dict]:
    return [{0: "batch_size", 2: _dim("height", d), 3: _dim("width", d)} for _, _, _, d in shapes]


def _residuals(unet_config: dict, shape: Shape, dtype, g) -> list[torch.Tensor]:
    return [torch.randn(shape.batch, c, h, w, generator=g).to(dtype)
            for c, h, w, _ in residual_shapes(unet_config, shape.latent_height, shape.latent_width)]


def unet_residual_spec(pipe) -> ComponentSpec:
    added = pipe.unet.config.addition_embed_type == "text_time"
    base = _unet_spec(added)
    config = dict(pipe.unet.config)
    shapes = residual_shapes(config, 8, 8)
    names = tuple(down_input(i) for i in range(len(shapes) - 1)) + (MID_INPUT,)

    def make_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch * 7 + shape.latent_width)
        return base.make_inputs(p, shape, dtype) + tuple(_residuals(config, shape, dtype, g))

    axes = base.dynamic_axes | dict(zip(names, _residual_axes(shapes)))
    return ComponentSpec(UNET_CONTROLNET, base.input_names + names, base.output_names, axes,
                         lambda p: _UNetResiduals(p.unet, added), make_inputs, base.float_inputs_fp32,
                         owner=lambda p: p.unet)


def controlnet_spec(pipe, name: str, net) -> ComponentSpec:
    added = net.config.addition_embed_type == "text_time"
    base = _unet_spec(added)
    shapes = residual_shapes(dict(pipe.unet.config), 8, 8)
    outputs = tuple(down_output(i) for i in range(len(shapes) - 1)) + (MID,)
    inputs = base.input_names[:3] + ("controlnet_cond", "conditioning_scale") + base.input_names[3:]
    factor = vae_scale_factor(pipe)
    channels = net.config.in_channels

    def make_inputs(p, shape: Shape, dtype):
        sample, timestep, states, *rest = base.make_inputs(p, shape, dtype)
        g = torch.Generator().manual_seed(shape.batch * 31 + shape.latent_height)
        b, h, w = shape.batch, shape.latent_height, shape.latent_width
        sample = torch.randn(b, channels, h, w, generator=g).to(dtype)
        cond = torch.rand(b, 3, h * factor, w * factor, generator=g).to(dtype)
        return (sample, timestep, states, cond, torch.tensor(0.75), *rest)

    axes = {k: v for k, v in base.dynamic_axes.items() if k != "out_sample"}
    axes |= {"controlnet_cond": {0: "batch_size", 2: "sample_height", 3: "sample_width"}}
    axes |= dict(zip(outputs, _residual_axes(shapes)))
    return ComponentSpec(PREFIX + name, inputs, outputs, axes, lambda p: _ControlNet(net, added), make_inputs,
                         ("timestep", "conditioning_scale"), owner=lambda p: net)


def record(src: ControlNetSource, net, digest: str) -> dict:
    """The manifest's `controlnets` entry."""
    c = net.config
    return {"name": src.name, "source": src.source, "sha256": digest,
            "cross_attention_dim": c.cross_attention_dim,
            "global_pool_conditions": bool(c.global_pool_conditions),
            "conditioning_channel_order": c.controlnet_conditioning_channel_order}


def load_checked(pipe, sources) -> dict:
    """{ControlNetSource: (ControlNetModel, sha256)}, each checked against this pipeline's UNet and VAE."""
    nets = {}
    for src in sources:
        net, digest = load(src)
        check_compatible(net, dict(pipe.unet.config), vae_scale_factor(pipe), src)
        nets[src] = (net, digest)
    return nets


def specs_for(pipe, nets: dict, any_net: bool) -> dict:
    """{component: (spec, config.json content, key digest)}: the residual UNet (when any ControlNet will be in
    the directory) and one per new ControlNet."""
    out = {}
    if any_net:
        out[UNET_CONTROLNET] = (unet_residual_spec(pipe), dict(pipe.unet.config), "|residuals")
    for src, (net, digest) in nets.items():
        out[PREFIX + src.name] = (controlnet_spec(pipe, src.name, net), dict(net.config), "|cn:" + digest)
    return out
