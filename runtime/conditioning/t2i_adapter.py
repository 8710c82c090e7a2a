"""T2I-Adapter at run time (export/extras/t2i_adapter.py): the adapter runs once on the request's image; a UNet-call
contributor feeds its features to `unet_t2i` at every step. Reproduces diffusers' StableDiffusionAdapterPipeline:
_preprocess_adapter_image (Lanczos resize to the output size, [0, 1], NCHW; one channel for 1-channel adapters),
features × adapter_conditioning_scale, repeated to the batch, doubled for guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from sdrt.runtime.conditioning.graphs import T2I_ADAPTER, graph_for
from sdrt.runtime.denoiser import feed as feed_mod
from sdrt.runtime.errors import UserError
from sdrt.runtime import fields
from sdrt.runtime.fields import InvalidRequest

PREFIX = "t2i_adapter/"
UNET_T2I = graph_for({T2I_ADAPTER})
NAME, FIELD = T2I_ADAPTER, "t2i_adapter"  # its name in Job.uses and graphs.py, the Job field of its use


@dataclass(frozen=True, eq=False)
class AdapterJob:
    name: str
    image: Image.Image
    scale: float

    def key(self) -> tuple:
        return (self.name, id(self.image), self.scale)


def _record(model_dir, name: str) -> dict:
    return next((r for r in (model_dir.manifest or {}).get("t2i_adapters", []) if r["name"] == name), {})


def validate(request, model_dir, context) -> AdapterJob | None:
    """The request's T2I-Adapter checked against the directory's adapters and the image size; None without one."""
    group, width, height = request.t2i, context.width, context.height
    others, loras = bool(context.earlier), context.loras
    scale = fields.number("adapter_scale", group.adapter_scale)
    if group.adapter_name is None and group.adapter_image is None:
        return None
    have = [c[len(PREFIX):] for c in (model_dir.manifest or {}).get("components", {}) if c.startswith(PREFIX)]
    if group.adapter_name not in have:
        listed = f"this model has {', '.join(have)}" if have else \
            "this engine directory has none (export one with --t2i-adapter)"
        raise InvalidRequest("adapter_name", f"unknown T2I-Adapter {group.adapter_name!r}; {listed}")
    record = _record(model_dir, group.adapter_name)
    image = fields.image("adapter_image", group.adapter_image, "L" if record.get("in_channels") == 1 else "RGB")
    if image is None:
        raise InvalidRequest("adapter_image", "is required: the T2I-Adapter's condition image")
    multiple = int(record.get("latent_multiple", 1)) * model_dir.vae_scale_factor
    for field, v in (("width", width), ("height", height)):
        if v % multiple:
            raise InvalidRequest(field, f"must be a multiple of {multiple} for the T2I-Adapter {group.adapter_name} "
                                        f"(got {v})")
    if others:
        raise InvalidRequest("adapter_name", "a T2I-Adapter together with ControlNets or an IP-Adapter is not "
                                             "supported yet; give one kind")
    if loras:  # unet_t2i is traced at the adapter's sizes, where the weights map cannot follow the up-samplers
        raise InvalidRequest("loras", "LoRAs do not reach the T2I-Adapter UNet yet; fuse them at export (sdrt export "
                                      "--lora) or drop them")
    return AdapterJob(group.adapter_name, image, scale)


def adapter_image(image: Image.Image, width: int, height: int, channels: int) -> torch.Tensor:
    """diffusers' _preprocess_adapter_image: [1, C, H, W] float32 in [0, 1]."""
    image = image.convert("L" if channels == 1 else "RGB")
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]


@dataclass(frozen=True)
class T2iAdapterContributor:
    features: tuple[torch.Tensor, ...]  # each [B(·2), C, h_i, w_i], already scaled

    def contribute(self, feed, step):
        return feed | {f"down_intrablock_additional_residual_{i}": f for i, f in enumerate(self.features)}


def attach(parts, job, prep):
    """`prep` unchanged without a T2I-Adapter; else with a T2iAdapterContributor holding the adapter's features."""
    use = job.t2i_adapter
    if use is None:
        return prep
    if parts.adapters.base:
        raise UserError("LoRAs applied at load do not reach the T2I-Adapter UNet yet; fuse them at export instead")
    engine = parts.component(PREFIX + use.name)
    unet = parts.component(UNET_T2I)
    used = sum(1 for n in unet.inputs if n.startswith("down_intrablock_additional_residual_"))
    channels = int(_record(parts.dir, use.name).get("in_channels", 3))
    out = feed_mod.run(engine, image=adapter_image(use.image, job.width, job.height, channels))
    features = []
    for i in range(used):
        f = out[f"feature_{i}"] * use.scale  # adapter_state[k] = v * adapter_conditioning_scale
        f = f.repeat(job.count, 1, 1, 1)  # num_images_per_prompt
        features.append(torch.cat([f] * 2) if prep.guidance.enabled else f)
    return replace(prep, contributors=[*prep.contributors, T2iAdapterContributor(tuple(features))])
