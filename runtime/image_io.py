"""Images in and out: VAE output → PIL, PIL → VAE input, and PNGs with AUTOMATIC1111-style parameters."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from sdrt.runtime.errors import UserError


class VaeOverflow(UserError):
    pass


def to_pil(decoded: torch.Tensor, fp16_vae: bool) -> list[Image.Image]:
    """VAE decoder output [B, 3, H, W] in [-1, 1] → PIL images, as diffusers' VaeImageProcessor.postprocess.

    Non-finite values are refused with the likely cause instead of being saved as a black image.
    """
    if not torch.isfinite(decoded).all():
        hint = (" the VAE ran in fp16 and overflowed; re-export with an fp16-safe VAE (--vae) or keep the VAE fp32"
                if fp16_vae else " the latents were already non-finite (check the UNet precision)")
        raise VaeOverflow(f"the VAE decoder produced NaN/inf values:{hint}")
    images = (decoded.float().cpu() / 2 + 0.5).clamp(0, 1)  # diffusers: denormalize, then clamp
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def load_image(path: str | Path, mode: str | None = "RGB") -> Image.Image:  # None: the file's own mode
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the image {path}: {e}") from None


def to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL → [1, 3, H, W] float32 in [-1, 1], resized with Lanczos as diffusers' VaeImageProcessor does."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL mask → [1, 1, H, W] of 0/1 (white = repaint), as diffusers' mask processor (grayscale, binarize)."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return (torch.from_numpy(array)[None, None] >= 0.5).float()


@dataclass(frozen=True)
class GenerationParameters:
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str

    def a1111_text(self) -> str:
        """The `parameters` text chunk as AUTOMATIC1111's web UI writes it (infotext)."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = {
            "Steps": self.steps,
            "Sampler": self.sampler,
            "CFG scale": f"{self.cfg_scale:g}",
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model": self.model,
        }
        lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
        return "\n".join(lines)


def check_writable(path: Path) -> None:
    """Fail before any work when the PNG could not be written (missing folder, no permission, read-only)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    os.unlink(tmp)


def save_png(image: Image.Image, path: Path, parameters: GenerationParameters | str) -> Path:
    """Write the PNG atomically (temporary file in the same folder, then rename) with a `parameters` text chunk."""
    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"cannot write {path}: the folder {path.parent} does not exist")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters if isinstance(parameters, str) else parameters.a1111_text())
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def image_bytes(image: Image.Image, parameters: GenerationParameters | str | None = None, fmt: str = "png",
                 quality: int | None = None) -> bytes:
    """The image as file bytes (png, jpeg or webp) carrying the same `parameters` text as `save_png` writes.

    PNG: a `parameters` text chunk (what `save_png` writes). JPEG/WebP: the text in the EXIF UserComment
    (UNICODE-prefixed UTF-16, where AUTOMATIC1111 puts it). `quality` (0-100) applies to JPEG and WebP.
    """
    kind = IMAGE_FORMATS.get(fmt.lower())
    if kind is None:
        raise UserError(f"cannot write images as {fmt!r}; choose one of png, jpeg, webp")
    text = None if parameters is None else parameters if isinstance(parameters, str) else parameters.a1111_text()
    buffer = io.BytesIO()
    if kind == "PNG":
        info = PngImagePlugin.PngInfo()
        if text is not None:
            info.add_text("parameters", text)
        image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()
    options = {} if quality is None else {"quality": int(quality)}
    if text is not None:
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
        options["exif"] = exif.tobytes()
    image.convert("RGB").save(buffer, format=kind, **options)
    return buffer.getvalue()
