"""IP-Adapter at run time: the image prompt encoded by `image_encoder` and fed to `unet_ip` by a UNet-call
contributor (runtime/unet_call.py). Engines: export/ip_adapter.py.

Reproduces diffusers' StableDiffusion[XL]Pipeline with load_ip_adapter + set_ip_adapter_scale:
- preprocessing: CLIPImageProcessor as the export recorded it (image_encoder/preprocessor_config.json): RGB, shortest
  edge resized (PIL, its `resample`), center crop, × rescale_factor, (x − mean) / std;
- embeddings (encode_image / prepare_ip_adapter_image_embeds): plain adapters take image_embeds and zeros as the
  negative; plus (Plus, Plus Face) and full (Full Face) adapters take hidden_states[-2] and the encoder's output
  for an all-zero pixel tensor; each [None]-expanded to [1, images, …], repeated to the batch, with guidance
  [negative ‖ positive];
- several images for the one adapter (diffusers: ip_adapter_image=[[a, b]]) are encoded as one batch and become
  ip_image_embeds_0 [B, images, …]: the adapter's attention then sees all their tokens (IPAdapterAttnProcessor2_0
  views them as one sequence);
- the adapter's scale is the graph input ip_scale_0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from . import feed as feed_mod

IMAGE_ENCODER = "image_encoder"
UNET_IP = "unet_ip"
UNET_CONTROLNET_IP = "unet_controlnet_ip"
MAX_IMAGES = 16  # image prompts for the one adapter in a request


@dataclass(frozen=True, eq=False)
class ImagePromptJob:
    images: tuple[Image.Image, ...]
    scale: float

    def key(self) -> tuple:
        return (tuple(id(i) for i in self.images), self.scale)


def validate_image_prompt(group, model_dir, loras=(), controls=None) -> ImagePromptJob | None:
    from .validate import InvalidRequest, _float, _image

    scale = _float("ip_scale", group.ip_scale)
    if group.ip_image is None:
        return None
    given = group.ip_image
    if isinstance(given, (list, tuple)):
        if not 1 <= len(given) <= MAX_IMAGES:
            raise InvalidRequest("ip_image", f"takes 1 to {MAX_IMAGES} images for the one adapter (got {len(given)})")
        images = tuple(_image(f"ip_image[{i}]", x, "RGB") for i, x in enumerate(given))
    else:
        images = (_image("ip_image", given, "RGB"),)
    if not (model_dir.path / UNET_IP / "model.onnx").is_file() or \
            not (model_dir.path / IMAGE_ENCODER / "model.onnx").is_file():
        raise InvalidRequest("ip_image", "this engine directory has no IP-Adapter (export one with --ip-adapter and "
                                         "--image-encoder)")
    if controls is not None and not (model_dir.path / UNET_CONTROLNET_IP / "model.onnx").is_file():
        raise InvalidRequest("ip_image", "this engine directory has no UNet for ControlNets and an IP-Adapter together "
                                         "(export the ControlNets and the adapter into it again); give one of them")
    return ImagePromptJob(images, scale)


def preprocess(image: Image.Image, config: dict) -> torch.Tensor:
    """PIL → pixel_values [1, 3, S, S] float32, as transformers' CLIPImageProcessor (PIL backend) with `config`."""
    image = image.convert("RGB") if config.get("do_convert_rgb", True) else image
    if config.get("do_resize", True):
        size = config["size"]
        if "shortest_edge" in size:  # get_resize_output_image_size(default_to_square=False)
            short, long = sorted(image.size)
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            w, h = (new_short, new_long) if image.width <= image.height else (new_long, new_short)
        else:
            w, h = size["width"], size["height"]
        image = image.resize((w, h), resample=Image.Resampling(config.get("resample", 3)))
    array = np.asarray(image)
    if config.get("do_center_crop", True):
        ch, cw = config["crop_size"]["height"], config["crop_size"]["width"]
        top, left = (array.shape[0] - ch) // 2, (array.shape[1] - cw) // 2
        array = array[top:top + ch, left:left + cw]
    out = array.astype(np.float32)
    if config.get("do_rescale", True):
        out = (array.astype(np.float64) * config.get("rescale_factor", 1 / 255)).astype(np.float32)
    if config.get("do_normalize", True):
        mean = np.asarray(config["image_mean"], dtype=np.float32)
        std = np.asarray(config["image_std"], dtype=np.float32)
        out = (out - mean) / std
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))[None]


@dataclass(frozen=True)
class IpAdapterContributor:
    """ip_image_embeds_0 [B(·2), 1, …] and ip_scale_0 into the UNet feed."""
    embeds: torch.Tensor
    scale: float

    def contribute(self, feed, step):
        return feed | {"ip_image_embeds_0": self.embeds, "ip_scale_0": torch.tensor(self.scale, dtype=torch.float32)}


def image_embeds(encoder, images, config: dict, plus: bool, count: int, guided: bool) -> torch.Tensor:
    """[count (·2), n, D] (plain) or [count (·2), n, T, W] (plus) for n images, negatives first with guidance."""
    pixels = torch.cat([preprocess(image, config) for image in images])  # [n, 3, S, S]
    output = "penultimate_hidden_states" if plus else "image_embeds"
    positive = feed_mod.run(encoder, pixel_values=pixels)[output]
    negative = feed_mod.run(encoder, pixel_values=torch.zeros_like(pixels))[output] if plus else torch.zeros_like(positive)
    positive, negative = (x[None].repeat(count, *[1] * x.dim()) for x in (positive, negative))
    return torch.cat([negative, positive]) if guided else positive


def attach(pipe, job, prep):
    """`prep` unchanged without an image prompt; else fed through `unet_ip` by an IpAdapterContributor."""
    ip = getattr(job, "image_prompt", None)
    if ip is None:
        return prep
    encoder = pipe.component(IMAGE_ENCODER)
    unet = UNET_CONTROLNET_IP if prep.unet == "unet_controlnet" else UNET_IP  # runtime/controlnet_call.py went first
    pipe.component(unet)
    config = json.loads((pipe.dir.path / IMAGE_ENCODER / "preprocessor_config.json").read_text())
    plus = ((pipe.dir.manifest or {}).get("ip_adapter") or {}).get("kind") in ("plus", "full")  # hidden states
    embeds = image_embeds(encoder, ip.images, config, plus, job.count, prep.guidance.enabled)
    return replace(prep, contributors=[*prep.contributors, IpAdapterContributor(embeds, ip.scale)], unet=unet)
