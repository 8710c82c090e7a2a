"""The image processors of the image encoders sdrt feeds, ported from transformers (PIL backend) so the runtime does
without it: CLIPImageProcessor (unCLIP's and IP-Adapter's image encoders) and DPTImageProcessor (depth-to-image's
estimator). Each reads the component's preprocessor_config.json and turns a PIL image into pixel_values
[1, 3, H, W] float32 equal to transformers' (tests/test_unclip.py, test_ip_adapter.py, test_depth.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdrt.runtime.errors import UserError


def read_config(path: Path) -> dict:
    """A component's JSON config (preprocessor_config.json, scheduler_config.json …), or a UserError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is missing or damaged ({e}); re-export the engine directory") from None


def _hw(value, what: str) -> tuple[int, int] | int:
    if isinstance(value, int):
        return value
    if isinstance(value, list):  # [h, w] in older configs
        return int(value[0]), int(value[1])
    if "shortest_edge" in value and what == "size":
        return int(value["shortest_edge"])
    return int(value["height"]), int(value["width"])


@dataclass(frozen=True)
class ClipInput:
    """transformers' CLIPImageProcessor (PIL backend): resize the shortest edge (bicubic), centre crop, × rescale
    (float64, then float32), (x − mean) / std."""
    size: int | tuple[int, int]  # shortest edge, or (height, width)
    crop: tuple[int, int] | None
    resample: int
    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def of(cls, folder: Path) -> "ClipInput":
        """From a component folder's preprocessor_config.json (image_encoder/)."""
        return cls.of_config(read_config(Path(folder) / "preprocessor_config.json"))

    @classmethod
    def of_config(cls, c: dict) -> "ClipInput":
        crop = c.get("crop_size") if c.get("do_center_crop", True) else None
        crop = (crop, crop) if isinstance(crop, int) else (None if crop is None else _hw(crop, "crop"))
        return cls(_hw(c.get("size", 224), "size") if c.get("do_resize", True) else 0, crop,
                   int(c.get("resample", 3)),
                   float(c.get("rescale_factor", 1 / 255)) if c.get("do_rescale", True) else None,
                   tuple(c["image_mean"]) if c.get("do_normalize", True) else None,
                   tuple(c["image_std"]) if c.get("do_normalize", True) else None)

    def tensor(self, image: Image.Image) -> torch.Tensor:
        """PIL → pixel_values [1, 3, H, W] float32."""
        image = image.convert("RGB")
        w, h = image.size
        if isinstance(self.size, tuple):
            image = image.resize((self.size[1], self.size[0]), resample=self.resample)
        elif self.size:  # transformers get_resize_output_image_size(default_to_square=False)
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            image = image.resize(size, resample=self.resample)
        a = np.asarray(image)
        if self.crop is not None:
            ch, cw = self.crop
            top, left = (a.shape[0] - ch) // 2, (a.shape[1] - cw) // 2
            a = a[max(top, 0):max(top, 0) + ch, max(left, 0):max(left, 0) + cw]
        x = a.astype(np.float32)
        if self.rescale_factor is not None:
            x = (a.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def preprocess(image: Image.Image, config: dict) -> torch.Tensor:
    """PIL → pixel_values [1, 3, S, S] float32, as CLIPImageProcessor configured by `config` (a parsed
    preprocessor_config.json)."""
    return ClipInput.of_config(config).tensor(image)


@dataclass(frozen=True)
class DptInput:
    """The estimator's image processor (transformers DPTImageProcessor with keep_aspect_ratio false)."""
    height: int
    width: int
    resample: int  # PIL resampling filter
    do_resize: bool
    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def of(cls, folder: Path) -> "DptInput":
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
