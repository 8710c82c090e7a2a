"""IP-Adapter at run time: the image prompt encoded by `image_encoder` and fed to `unet_ip` by a UNet-call
contributor (runtime/denoiser/call.py). Engines: export/extras/ip_adapter.py.

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
- IP-Adapter FaceID takes the caller's face embeddings (diffusers: ip_adapter_image_embeds, zeros as the negative in
  its documented recipe) instead of an image; its LoRA is fused into unet_ip at export;
- several adapters in one directory (diffusers: load_ip_adapter([a, b]), set_ip_adapter_scale([s_a, s_b]),
  ip_adapter_image=[image_a, image_b]) are fed as ip_image_embeds_K / ip_scale_K in the manifest's order; an adapter
  the request does not name gets zero embeddings and scale 0, which adds exact zeros (diffusers skips its branch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdrt.runtime.conditioning.image_processors import preprocess
from sdrt.runtime.conditioning.graphs import CONTROLNET, IP_ADAPTER, graph_for
from sdrt.runtime.denoiser import feed as feed_mod
from sdrt.runtime import fields
from sdrt.runtime.fields import InvalidRequest

IMAGE_ENCODER = "image_encoder"
UNET_IP = graph_for({IP_ADAPTER})
UNET_CONTROLNET_IP = graph_for({CONTROLNET, IP_ADAPTER})
NAME, FIELD = IP_ADAPTER, "image_prompt"  # its name in Job.uses and graphs.py, the Job field of its use
MAX_IMAGES = 16  # image prompts for the one adapter in a request


@dataclass(frozen=True, eq=False)
class AdapterPrompt:
    name: str  # the adapter's name in the manifest
    images: tuple[Image.Image, ...]  # empty for FaceID
    scale: float
    embeds: np.ndarray | None = None  # FaceID: [faces, D] float32 face embeddings (the caller's, e.g. insightface)


@dataclass(frozen=True, eq=False)
class ImagePromptJob:
    prompts: tuple[AdapterPrompt, ...]

    def key(self) -> tuple:
        return tuple((p.name, tuple(id(i) for i in p.images), id(p.embeds), p.scale) for p in self.prompts)


def adapter_records(manifest: dict | None) -> list[dict]:
    """[{name, kind, …}] in graph order; a directory exported before several adapters existed holds one record with
    source/kind at the top level, named by its file's stem."""
    record = (manifest or {}).get("ip_adapter") or {}
    if "adapters" in record:
        return list(record["adapters"])
    return [{"name": Path(record["source"]).stem, **record}] if record.get("source") else []


def validate(request, model_dir, context) -> ImagePromptJob | None:
    """The request's image prompt checked against the directory's IP-Adapters (and, with ControlNets validated
    before it, the UNet graph that takes both); None when it gives none."""
    group, controls = request.image_prompt, context.earlier.get(CONTROLNET)
    scale = fields.number("ip_scale", group.ip_scale)
    entries = group.ip_adapters
    if group.ip_image is None and not entries:
        return None
    field = "ip_image" if group.ip_image is not None else "ip_adapters"
    if group.ip_image is not None and entries:
        raise InvalidRequest("ip_adapters", "give ip_image (for a directory with one adapter) or ip_adapters, not both")
    records = {r["name"]: r for r in adapter_records(model_dir.manifest) if r.get("kind") != "instantid"}  # its own
    # kind (runtime/conditioning/instantid.py) feeds InstantID's adapter
    names = list(records)
    needs_encoder = any(r.get("kind") != "faceid" for r in records.values())
    if not records or not model_dir.has(UNET_IP) or \
            (needs_encoder and not model_dir.has(IMAGE_ENCODER)):
        raise InvalidRequest(field, "this engine directory has no IP-Adapter (export one with --ip-adapter and "
                                    "--image-encoder)")
    if controls is not None and not model_dir.has(UNET_CONTROLNET_IP):
        raise InvalidRequest(field, "this engine directory has no UNet for ControlNets and an IP-Adapter together "
                                    "(export the ControlNets and the adapter into it again); give one of them")
    if group.ip_image is not None:
        if len(names) != 1:
            raise InvalidRequest("ip_image", f"this engine directory has {len(names)} IP-Adapters ({', '.join(names)}); "
                                             "name the one each image is for: ip_adapters=[{name, image, scale}, …]")
        if records[names[0]].get("kind") == "faceid":
            raise InvalidRequest("ip_image", f"{names[0]} is an IP-Adapter FaceID: it takes face embeddings, not images "
                                             "(ip_adapters=[{name, embeds, scale}])")
        return ImagePromptJob((AdapterPrompt(names[0], _images("ip_image", group.ip_image), scale),))
    if not isinstance(entries, (list, tuple)):
        raise InvalidRequest("ip_adapters", f"must be a list of {{name, image, scale}}, not {type(entries).__name__}")
    prompts = []
    for i, entry in enumerate(entries):
        name, image, embeds, entry_scale = _entry(i, entry)
        if name not in names:
            raise InvalidRequest(f"ip_adapters[{i}].name", f"{name!r} is not an IP-Adapter of this engine directory; "
                                                           f"it has {', '.join(names)}")
        if any(p.name == name for p in prompts):
            raise InvalidRequest(f"ip_adapters[{i}].name", f"{name!r} is given twice; give its images as one list")
        entry_scale = fields.number(f"ip_adapters[{i}].scale", entry_scale)
        if records[name].get("kind") == "faceid":
            if image is not None or embeds is None:
                raise InvalidRequest(f"ip_adapters[{i}].embeds", f"{name} is an IP-Adapter FaceID: give its face "
                                     f"embeddings ([faces, {records[name]['embed_dim']}] numbers), not an image")
            prompts.append(AdapterPrompt(name, (), entry_scale, _face_embeds(f"ip_adapters[{i}].embeds", embeds,
                                                                             records[name]["embed_dim"])))
            continue
        if embeds is not None:
            raise InvalidRequest(f"ip_adapters[{i}].embeds", f"{name} takes images (image), not embeddings")
        if image is None:
            raise InvalidRequest(f"ip_adapters[{i}].image", "is required: an image or a list of them")
        prompts.append(AdapterPrompt(name, _images(f"ip_adapters[{i}].image", image), entry_scale))
    return ImagePromptJob(tuple(prompts))


def _entry(i: int, entry) -> tuple:
    """(name, image, embeds, scale) from {name, image | embeds, scale} or (name, image[, scale])."""

    if isinstance(entry, dict):
        unknown = set(entry) - {"name", "image", "embeds", "scale"}
        if unknown:
            raise InvalidRequest(f"ip_adapters[{i}].{sorted(unknown)[0]}", "is not a field; give name, image (or "
                                                                           "embeds for FaceID), scale")
        return entry.get("name"), entry.get("image"), entry.get("embeds"), entry.get("scale", 1.0)
    if isinstance(entry, (list, tuple)) and len(entry) in (2, 3):
        name, image, scale = (*entry, 1.0)[:3]
        return name, image, None, scale
    raise InvalidRequest(f"ip_adapters[{i}]", "must be {name, image, scale} or (name, image[, scale])")


def _face_embeds(field: str, given, width: int) -> np.ndarray:
    """[D] or [faces, D] finite numbers (a list, numpy array or tensor) → float32 [faces, D]."""

    try:
        array = np.array(given.detach().cpu() if isinstance(given, torch.Tensor) else given, dtype=np.float32)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim not in (1, 2) or array.shape[-1] != width or array.size == 0:
        got = "not numbers" if array is None else f"shape {list(array.shape)}"
        raise InvalidRequest(field, f"must be face embeddings of shape [{width}] or [faces, {width}] (got {got})")
    if not np.isfinite(array).all():
        raise InvalidRequest(field, "must be finite numbers")
    array = array.reshape(-1, width)
    if len(array) > MAX_IMAGES:
        raise InvalidRequest(field, f"takes 1 to {MAX_IMAGES} faces (got {len(array)})")
    return array


def _images(field: str, given) -> tuple[Image.Image, ...]:
    """One image, or 1 to MAX_IMAGES of them for the one adapter."""

    if not isinstance(given, (list, tuple)):
        return (fields.image(field, given, "RGB"),)
    if not 1 <= len(given) <= MAX_IMAGES:
        raise InvalidRequest(field, f"takes 1 to {MAX_IMAGES} images for the one adapter (got {len(given)})")
    return tuple(fields.image(f"{field}[{i}]", x, "RGB") for i, x in enumerate(given))


@dataclass(frozen=True)
class IpAdapterContributor:
    """ip_image_embeds_K [B(·2), images, …] and ip_scale_K into the UNet feed, K = 0 … adapters − 1."""
    embeds: tuple[torch.Tensor, ...]
    scales: tuple[float, ...]

    def contribute(self, feed, step):
        return feed | {f"ip_image_embeds_{k}": e for k, e in enumerate(self.embeds)} | \
            {f"ip_scale_{k}": torch.tensor(s, dtype=torch.float32) for k, s in enumerate(self.scales)}


def image_embeds(encoder, images, config: dict, plus: bool, count: int, guided: bool) -> torch.Tensor:
    """[count (·2), n, D] (plain) or [count (·2), n, T, W] (plus) for n images, negatives first with guidance."""
    pixels = torch.cat([preprocess(image, config) for image in images])  # [n, 3, S, S]
    output = "penultimate_hidden_states" if plus else "image_embeds"
    positive = feed_mod.run(encoder, pixel_values=pixels)[output]
    negative = feed_mod.run(encoder, pixel_values=torch.zeros_like(pixels))[output] if plus else torch.zeros_like(positive)
    positive, negative = (x[None].repeat(count, *[1] * x.dim()) for x in (positive, negative))
    return torch.cat([negative, positive]) if guided else positive


def face_embeds(embeds: np.ndarray, count: int, guided: bool) -> torch.Tensor:
    """[count (·2), faces, D]: FaceID as diffusers' documented recipe feeds ip_adapter_image_embeds (the caller's
    embeddings, zeros as the negative, chunked in two by prepare_ip_adapter_image_embeds)."""
    positive = torch.from_numpy(embeds)[None].repeat(count, 1, 1)
    return torch.cat([torch.zeros_like(positive), positive]) if guided else positive


def unused_embeds(folder, record: dict, rows: int) -> torch.Tensor:
    """Zeros shaped as one image's embeddings ([rows, 1, D] or [rows, 1, T, W]) for an adapter fed scale 0."""
    if record.get("kind") == "instantid":  # its projected face tokens
        return torch.zeros(rows, 1, record["tokens"], record["token_dim"])
    if record.get("kind") not in ("plus", "full"):
        width = record.get("embed_dim") or json.loads((folder / "config.json").read_text())["projection_dim"]
        return torch.zeros(rows, 1, width)
    c = json.loads((folder / "config.json").read_text())
    tokens = (c["image_size"] // c["patch_size"]) ** 2 + 1  # patches + the class token
    return torch.zeros(rows, 1, tokens, c["hidden_size"])


def attach(parts, job, prep):
    """`prep` unchanged without an image prompt; else with an IpAdapterContributor added."""
    ip = job.image_prompt
    if ip is None:
        return prep
    folder = parts.dir.path / IMAGE_ENCODER
    given = {p.name: p for p in ip.prompts}
    guided = prep.guidance.enabled
    embeds, scales = [], []
    for record in adapter_records(parts.dir.manifest):
        prompt = given.get(record["name"])
        if prompt is None:
            embeds.append(unused_embeds(folder, record, job.count * (2 if guided else 1)))
            scales.append(0.0)
            continue
        if prompt.embeds is not None:
            embeds.append(face_embeds(prompt.embeds, job.count, guided))
        else:
            plus = record.get("kind") in ("plus", "full")  # hidden states (Plus, Plus Face, Full Face)
            config = json.loads((folder / "preprocessor_config.json").read_text())
            embeds.append(image_embeds(parts.component(IMAGE_ENCODER), prompt.images, config, plus, job.count, guided))
        scales.append(prompt.scale)
    return replace(prep, contributors=[*prep.contributors, IpAdapterContributor(tuple(embeds), tuple(scales))])
