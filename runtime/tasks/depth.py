"""Depth-to-image's depth channel (diffusers StableDiffusionDepth2ImgPipeline.prepare_depth_map), without transformers.

The depth comes from a given map or from the exported estimator (depth_estimator/model.onnx, a DPT) fed as its
image processor feeds it (depth_estimator/preprocessor_config.json: resize to a fixed size, rescale, normalise);
either way it is resized bicubically to the latent size and min-max normalised to [-1, 1]: [B, 1, h, w].
"""

from __future__ import annotations


import numpy as np
import torch
from PIL import Image

from sdrt.runtime import fields
from sdrt.runtime.conditioning.image_processors import DptInput
from sdrt.runtime.denoiser import feed
from sdrt.runtime.denoiser.call import ExtraChannels
from sdrt.runtime.errors import UserError
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.limits import Limits
from sdrt.runtime.request import Request
from sdrt.runtime.tasks import img2img
from sdrt.runtime.tasks.base import Common, Prepared


def map_tensor(depth: Image.Image) -> torch.Tensor:
    """A given depth map (any mode; 16-bit PNGs keep their range) → [1, H, W] float32 (its scale does not matter:
    the map is min-max normalised)."""
    return torch.from_numpy(np.asarray(depth.convert("F"), dtype=np.float32).copy())[None]


def normalised(depth: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """prepare_depth_map: [B, H, W] → bicubic to the latent size [B, 1, h, w] → 2·(d − min)/(max − min) − 1."""
    d = torch.nn.functional.interpolate(depth.float().unsqueeze(1), size=(height, width), mode="bicubic",
                                        align_corners=False)
    lo = torch.amin(d, dim=[1, 2, 3], keepdim=True)
    hi = torch.amax(d, dim=[1, 2, 3], keepdim=True)
    if bool((hi == lo).any()):
        raise UserError("the depth map is constant, which cannot be normalised; give a map with some depth in it")
    return 2.0 * (d - lo) / (hi - lo) - 1.0


# ---- the task (runtime/tasks/base.py): img2img with the depth channel -------------------------------------

NAME = "depth"


def applies(job, model_dir) -> bool:
    return model_dir.info.depth


def validate(request: Request, model_dir, limits: Limits) -> tuple[Request, dict]:
    """Depth-to-image's inputs: an init image, no mask, and a depth map or the exported estimator."""
    images, info = request.images, model_dir.info
    if not info.depth:
        if images.depth_map is not None:
            raise InvalidRequest("depth_map", f"applies to depth-to-image models only; this is a "
                                              f"{info.family.value} model ({info.pipeline_class})")
        return request, {}
    if images.init_image is None:
        raise InvalidRequest("init_image", "this is a depth-to-image model: give the image to start from")
    if images.mask is not None:
        raise InvalidRequest("mask", "depth-to-image models take no mask")
    depth = fields.image("depth_map", images.depth_map, "F")
    if depth is None and not model_dir.has("depth_estimator"):
        raise InvalidRequest("depth_map", "is needed: this engine directory has no depth_estimator (export it, "
                                          "or give a depth map)")
    if depth is not None:
        lo, hi = depth.getextrema()
        if lo == hi:
            raise InvalidRequest("depth_map", "is constant; give a map with some depth in it")
    return request, {"depth_map": depth}


def prepare(parts, job, common: Common) -> Prepared:
    """img2img's latents, and the depth channel: the given map, or the estimator on the init image."""
    n, _, h, w = common.shape
    if job.depth_map is not None:
        raw = map_tensor(job.depth_map)  # [1, H, W]
    else:
        pixels = DptInput.of(parts.dir.path / "depth_estimator").tensor(job.init_image)
        raw = feed.run(parts.component("depth_estimator"), pixel_values=pixels)["predicted_depth"]
    d = normalised(raw.cpu(), h, w).repeat(n, 1, 1, 1).to(parts.device)  # [N, 1, h, w]
    return img2img.prepare(parts, job, common, contributors=[ExtraChannels(common.guidance.batch(d))])


def finish(job, images: list) -> list:
    return images
