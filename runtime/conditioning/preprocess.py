"""Control-image preprocessors applied before a ControlNet sees the image: `canny[:LOW:HIGH]`, the recipe of
diffusers' ControlNet documentation (cv2.Canny on the RGB uint8 photo with thresholds LOW and HIGH, default 100
and 200; the one-channel edge map stacked into three channels). OpenCV is an optional extra:
`pip install 'sdrt[canny]'` (opencv-python-headless). Other preprocessors (depth, pose, …) are the user's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from sdrt.runtime.fields import InvalidRequest

NAMES = ("canny",)


@dataclass(frozen=True)
class Canny:
    low: float = 100.0
    high: float = 200.0

    def __call__(self, image: Image.Image) -> Image.Image:
        import cv2

        edges = cv2.Canny(np.asarray(image.convert("RGB")), self.low, self.high)  # [H, W] uint8, 0 or 255
        return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def parse(text) -> Canny | None:
    """`canny`, `canny:LOW:HIGH` or None → the preprocessor; InvalidRequest("control_preprocess") otherwise."""

    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise InvalidRequest("control_preprocess", f"must be a string such as 'canny' or 'canny:100:200', not "
                                                   f"{type(text).__name__}")
    name, *thresholds = text.split(":")
    if name not in NAMES:
        raise InvalidRequest("control_preprocess", f"unknown preprocessor {name!r}; sdrt has {', '.join(NAMES)}")
    if thresholds:
        try:
            low, high = (float(t) for t in thresholds)
        except ValueError:
            raise InvalidRequest("control_preprocess", f"{text!r}: give canny:LOW:HIGH with two numbers, e.g. "
                                                       "canny:100:200") from None
        if not (np.isfinite(low) and np.isfinite(high) and 0 <= low <= high):
            raise InvalidRequest("control_preprocess", f"{text!r}: the thresholds must be finite with 0 ≤ LOW ≤ HIGH")
        canny = Canny(low, high)
    else:
        canny = Canny()
    try:
        import cv2  # noqa: F401
    except ImportError:
        raise InvalidRequest("control_preprocess", "canny needs OpenCV, which is not installed: "
                                                   "pip install 'sdrt[canny]' (opencv-python-headless)") from None
    return canny
