"""Depth-to-image's depth channel (diffusers StableDiffusionDepth2ImgPipeline.prepare_depth_map), without transformers.

The depth comes from a given map or from the exported estimator (depth_estimator/model.onnx, a DPT) fed as its
image processor feeds it (depth_estimator/preprocessor_config.json: resize to a fixed size, rescale, normalise);
either way it is resized bicubically to the latent size and min-max normalised to [-1, 1]: [B, 1, h, w].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdrt.runtime import fields
from sdrt.runtime.denoiser import feed
from sdrt.runtime.denoiser.call import ExtraChannels
from sdrt.runtime.errors import UserError
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.limits import Limits
from sdrt.runtime.request import Request
from sdrt.runtime.tasks import img2img
from sdrt.runtime.tasks.base import Common, Prepared


@dataclass(frozen=True)
class EstimatorInput:
    """The estimator's image processor (transformers DPTImageProcessor with keep_aspect_ratio false)."""
    height: int
    width: int
    resample: int  # PIL resampling filter
    do_resize: bool
    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def of(cls, folder: Path) -> "EstimatorInput":
        path = Path(folder) / "preprocessor_config.json"
        try:
            c = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is missing or damaged ({e}); re-export the engine directory") from None
        if c.get("keep_aspect_ratio") or c.get("ensure_multiple_of", 1) != 1 or c.get("do_pad"):
            raise UserError(f"{path}: sdrt reproduces DPT preprocessing with keep_aspect_ratio false, "
                            "ensure_multiple_of 1 and no padding only")
        size = c.get("size", 384)  # an int, [h, w] (older DPTFeatureExtractor configs) or {"height", "width"}
        h, w = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, list) else \
            (size["height"], size["width"])
        return cls(int(h), int(w), int(c.get("resample", 3)), bool(c.get("do_resize", True)),
                   float(c.get("rescale_factor", 1 / 255)) if c.get("do_rescale", True) else None,
                   tuple(c["image_mean"]) if c.get("do_normalize", True) else None,
                   tuple(c["image_std"]) if c.get("do_normalize", True) else None)

    def tensor(self, image: Image.Image) -> torch.Tensor:
        """PIL → pixel_values [1, 3, H, W] float32: PIL resize of the uint8 image, × rescale (in float64, then
        float32, as transformers' image_transforms.rescale), (x − mean) / std in float32."""
        image = image.convert("RGB")
        if self.do_resize and image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), resample=self.resample)
        x = np.asarray(image, dtype=np.float32)
        if self.rescale_factor is not None:
            x = (np.asarray(image, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


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
    if depth is None and not (model_dir.path / "depth_estimator" / "model.onnx").exists():
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
        pixels = EstimatorInput.of(parts.dir.path / "depth_estimator").tensor(job.init_image)
        raw = feed.run(parts.component("depth_estimator"), pixel_values=pixels)["predicted_depth"]
    d = normalised(raw.cpu(), h, w).repeat(n, 1, 1, 1).to(parts.device)  # [N, 1, h, w]
    return img2img.prepare(parts, job, common, contributors=[ExtraChannels(common.guidance.batch(d))])


def finish(job, images: list) -> list:
    return images
