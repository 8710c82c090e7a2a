"""T2I-Adapters at export: each `t2i_adapter/NAME` (image → feature_0…k, diffusers' T2IAdapter.forward), plus
`unet_t2i`, the UNet with the features it consumes as inputs down_intrablock_additional_residual_0…m
(UNet2DConditionModel's down_intrablock_additional_residuals: popped one per down block, and by the mid block when
the next one has its shape). The adapter runs once per request; the runtime scales and batches its features
(runtime/conditioning/t2i_adapter.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from sdrt.runtime.errors import UserError

from sdrt.export.components import ComponentSpec, Shape, _unet_spec, split_added_cond, vae_scale_factor
from sdrt.export.extras.controlnet import ControlNetSource, parse_arg
from sdrt.export.load import sha256_of_files

PREFIX = "t2i_adapter/"
UNET_T2I = "unet_t2i"


def parse(text: str) -> ControlNetSource:
    """`SRC[=NAME]` as for ControlNets."""
    try:
        return parse_arg(text)
    except UserError as e:
        raise UserError(str(e).replace("--controlnet", "--t2i-adapter")) from None


def load(src: ControlNetSource):
    from diffusers import T2IAdapter

    path = Path(src.source).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"--t2i-adapter {src.source}: not a diffusers T2IAdapter folder (no config.json)")
    try:
        adapter = T2IAdapter.from_pretrained(path, torch_dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"--t2i-adapter {src.source}: cannot load ({str(e).splitlines()[0]})") from None
    digest = sha256_of_files([p for p in path.rglob("*") if p.is_file()], path)
    return adapter, hashlib.sha256(digest.encode()).hexdigest()


def multiple(pipe, adapter) -> int:
    """Latent sizes must be multiples of this: the adapter's total down-scaling over the VAE's, and the UNet's."""
    return max(adapter.total_downscale_factor // vae_scale_factor(pipe), 1)


def consumed(pipe, adapter, unet_config: dict) -> int:
    """How many of the adapter's features the UNet adds (probed with one forward at a valid size)."""
    f, m = vae_scale_factor(pipe), multiple(pipe, adapter)
    h = max(m, 2 ** (len(unet_config["block_out_channels"]) - 1)) * 2
    with torch.no_grad():
        feats = list(adapter(torch.rand(1, adapter.config.in_channels, h * f, h * f)))
        dims = unet_config["cross_attention_dim"]
        added = None
        if unet_config.get("addition_embed_type") == "text_time":
            text = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
            added = {"text_embeds": torch.zeros(1, text), "time_ids": torch.zeros(1, 6)}
        remaining = list(feats)
        pipe.unet(torch.zeros(1, 4, h, h), torch.tensor(1.0), torch.zeros(1, 77, dims), added_cond_kwargs=added,
                  down_intrablock_additional_residuals=remaining)
    return len(feats) - len(remaining)


class _Adapter(torch.nn.Module):
    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, image):
        return tuple(self.adapter(image))


class _UNetT2i(torch.nn.Module):
    def __init__(self, unet, added: bool):
        super().__init__()
        self.unet = unet
        self.added = added

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added, rest = split_added_cond(rest, self.added)
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         down_intrablock_additional_residuals=list(rest), return_dict=False)[0]


def gate_shapes(pipe, adapter) -> tuple[Shape, Shape]:
    m = max(multiple(pipe, adapter), 2 ** (len(pipe.unet.config.block_out_channels) - 1))
    return Shape(1, m, 2 * m), Shape(2, 2 * m, m)


def adapter_spec(pipe, name: str, adapter) -> ComponentSpec:
    f = vae_scale_factor(pipe)
    count = len(adapter(torch.rand(1, adapter.config.in_channels, 64, 64)))
    outputs = tuple(f"feature_{i}" for i in range(count))

    def make_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch)
        return (torch.rand(shape.batch, adapter.config.in_channels, shape.latent_height * f, shape.latent_width * f,
                           generator=g).to(dtype),)

    axes = {"image": {0: "batch_size", 2: "sample_height", 3: "sample_width"}}
    axes |= {o: {0: "batch_size", 2: f"feature_height_{i}", 3: f"feature_width_{i}"} for i, o in enumerate(outputs)}
    return ComponentSpec(PREFIX + name, ("image",), outputs, axes, lambda p: _Adapter(adapter), make_inputs,
                         owner=lambda p: adapter)


def unet_spec(pipe, adapter, used: int) -> ComponentSpec:
    added = pipe.unet.config.addition_embed_type == "text_time"
    base = _unet_spec(added)
    f = vae_scale_factor(pipe)
    names = tuple(f"down_intrablock_additional_residual_{i}" for i in range(used))

    def make_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch * 3 + shape.latent_width)
        with torch.no_grad():
            feats = adapter(torch.rand(1, adapter.config.in_channels, shape.latent_height * f, shape.latent_width * f,
                                       generator=g))[:used]
        return base.make_inputs(p, shape, dtype) + tuple(
            torch.randn(shape.batch, *x.shape[1:], generator=g).to(dtype) for x in feats)

    axes = base.dynamic_axes | {n: {0: "batch_size", 2: f"feature_height_{i}", 3: f"feature_width_{i}"}
                                for i, n in enumerate(names)}
    return ComponentSpec(UNET_T2I, base.input_names + names, base.output_names, axes,
                         lambda p: _UNetT2i(p.unet, added), make_inputs, base.float_inputs_fp32, owner=lambda p: p.unet)


def record(src: ControlNetSource, adapter, digest: str, used: int, pipe) -> dict:
    return {"name": src.name, "source": src.source, "sha256": digest, "in_channels": adapter.config.in_channels,
            "features_used": used, "latent_multiple": multiple(pipe, adapter)}
