"""What a caller asks for, as plain data grouped by concern (DESIGN.md §4a), round-trippable through JSON.

    Request(prompt="a cat")                                        # one prompt, everything else default
    Request.of(prompt=["a cat", "a dog"], steps=8, sampler="DPM++ 2M Karras", width=520, seed=7, batch=2)
    Request.from_dict(json.loads(body)) / request.to_dict(encode_images=True)

Nothing here is checked: `runtime/validate.py` turns a Request into a typed `Job` (or raises InvalidRequest
naming the field), once, against the model and the `Limits`. Images are PIL at the Python edge and base64 PNG
strings in JSON.
"""

from __future__ import annotations

import base64
import io
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

from PIL import Image

from sdrt.runtime.fields import InvalidRequest


@dataclass(frozen=True)
class Prompt:
    text: str | Sequence[str] = ""  # a str is ONE prompt; a list is one prompt per entry
    negative: str | Sequence[str] | None = None  # None: diffusers' default ("" or SDXL's zeroed negatives)
    syntax: str = "a1111"  # a1111 | compel | plain (runtime/prompts/encode.py)
    clip_skip: int = 0  # diffusers' numbering: 0 = the model's usual layer; AUTOMATIC1111's "Clip skip 2" is 1
    embeddings: tuple = ()  # textual-inversion files or names (runtime/prompts/embeddings.py); trigger = file stem
    max_sequence_length: int | None = None  # SD3's T5 tokens (None: diffusers' 256; at most 512)

    def __post_init__(self):  # a JSON list → a tuple, so the request equals itself after a round trip
        if isinstance(self.embeddings, list):
            object.__setattr__(self, "embeddings", tuple(self.embeddings))


@dataclass(frozen=True)
class Sampling:
    steps: int = 30
    guidance: float = 7.5  # classifier-free guidance scale; <= 1 turns guidance off (as diffusers)
    guidance_rescale: float = 0.0
    sampler: str | None = None  # sdrt's or AUTOMATIC1111's name ("DPM++ 2M Karras"); None: the model's own
    schedule: str | None = None  # default | karras | exponential | beta | sgm_uniform | simple; None: as named
    timestep_spacing: str | None = None  # override the model's spacing (few-step presets use "trailing")
    prediction_type: str | None = None  # override (SDXL-Lightning 1-step predicts the sample)
    cache_interval: int = 1  # step caching (DeepCache): the whole UNet every N steps, its shallow part between; 1 = off


@dataclass(frozen=True)
class Size:
    width: int | None = None  # None: the model's default (or the init image's size)
    height: int | None = None
    batch: int = 1  # images per prompt


@dataclass(frozen=True)
class Seeds:
    seed: int = 0  # image i uses seed + i (AUTOMATIC1111's convention); -1 draws a random seed, reported back


@dataclass(frozen=True)
class ImageInputs:
    init_image: Any = None  # PIL image (img2img, inpaint)
    strength: float | None = None  # None: diffusers' default (img2img 0.8, SDXL refiner 0.3, inpaint 1.0)
    mask: Any = None  # PIL image, white = repaint
    depth_map: Any = None  # PIL image (any mode): depth-to-image's depth, else its estimator runs
    noise_level: int | None = None  # the ×4 upscaler's low-resolution noise (None: 20)
    outpaint: Any = None  # {"left", "right", "top", "bottom", "fill", "blur"} or "left=64,top=8" (runtime/tasks/outpaint.py)
    inpaint: Any = None  # AUTOMATIC1111's inpainting: {"mask_blur", "fill", "only_masked", "padding", "invert"} (runtime/tasks/inpaint_a1111.py)


@dataclass(frozen=True)
class Refine:
    """SDXL base → refiner hand-off and SDXL's aesthetic conditioning."""

    denoising_start: float | None = None
    denoising_end: float | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    init_latents: Any = field(default=None, compare=False)  # torch tensor from a base (Python only, not JSON)


@dataclass(frozen=True)
class Adapters:
    """Weight adapters applied to this request only (runtime/lora/); `<lora:NAME:SCALE>` prompt tags add to them."""

    loras: tuple = ()  # ((name or path, scale), …): names are looked up in the LoRA folder; "NAME:SCALE" also works
    face_models: str | None = None  # a folder of insightface's ONNX models: faces from photos (conditioning/faces.py)

    def __post_init__(self):  # JSON lists → tuples, so a request equals itself after a round trip (never raises)
        if isinstance(self.loras, list):
            object.__setattr__(self, "loras", tuple(tuple(x) if isinstance(x, list) else x for x in self.loras))


@dataclass(frozen=True)
class Decode:
    """How the final latents become pixels (runtime/pipeline.py `decode`)."""

    vae: str = "full"  # full | tiny: the AutoencoderTiny (TAESD) exported beside the full VAE (export/extras/tiny_vae.py)
    vae_tiling: str = "auto"  # auto (when the untiled VAE would not fit the memory limit) | on | off (vae_tiling.py)



@dataclass(frozen=True)
class Control:
    """ControlNets (runtime/conditioning/controlnet.py): each entry (name, image[, scale]) or {name, image, scale[, start, end]};
    the window [control_start, control_end) of the schedule applies to every net without its own start/end, guess
    mode to every net."""

    controls: tuple = ()
    control_start: float = 0.0
    control_end: float = 1.0
    guess_mode: bool = False
    control_preprocess: str | None = None  # "canny[:LOW:HIGH]" on every control image (runtime/conditioning/preprocess.py)

    def __post_init__(self):  # JSON: lists → tuples, base64 images → PIL (a bad one raises InvalidRequest)
        if isinstance(self.controls, list):
            object.__setattr__(self, "controls", tuple(_control_entry(i, x) for i, x in enumerate(self.controls)))


def _control_entry(i: int, entry):
    if isinstance(entry, dict):
        image = entry.get("image")
        return entry | {"image": decode_image(image, f"controls[{i}].image")} if isinstance(image, str) else entry
    if isinstance(entry, list):
        entry = tuple(entry)
    if isinstance(entry, tuple) and len(entry) >= 2 and isinstance(entry[1], str):
        return (entry[0], decode_image(entry[1], f"controls[{i}].image"), *entry[2:])
    return entry


@dataclass(frozen=True)
class ImagePrompt:
    """IP-Adapter (runtime/conditioning/ip_adapter.py): an image prompt and the adapter's scale, or with several adapters in the
    directory one {name, image, scale} per adapter used."""

    ip_image: Any = None  # PIL image, or a list of them (several images for the one adapter)
    ip_scale: float = 1.0
    ip_adapters: tuple = ()  # several adapters in one directory: each {name, image (or a list), scale}; FaceID
    # adapters take {name, embeds: [faces, D] numbers, scale} instead of an image

    def __post_init__(self):  # JSON: lists → tuples, base64 images → PIL (a bad one raises InvalidRequest)
        if isinstance(self.ip_adapters, list):
            object.__setattr__(self, "ip_adapters", tuple(_ip_entry(i, x) for i, x in enumerate(self.ip_adapters)))


def _ip_entry(i: int, entry):
    if not isinstance(entry, dict):
        return entry
    image = entry.get("image")
    if isinstance(image, str):
        return entry | {"image": decode_image(image, f"ip_adapters[{i}].image")}
    if isinstance(image, list):
        return entry | {"image": tuple(decode_image(x, f"ip_adapters[{i}].image[{j}]") if isinstance(x, str) else x
                                       for j, x in enumerate(image))}
    return entry


@dataclass(frozen=True)
class T2i:
    """A T2I-Adapter the engine directory holds (runtime/conditioning/t2i_adapter.py), its condition image and scale."""

    adapter_name: str | None = None
    adapter_image: Any = None  # PIL image
    adapter_scale: float = 1.0


@dataclass(frozen=True)
class InstantId:
    """InstantID (runtime/conditioning/instantid.py): one face's raw insightface embedding (`embedding`, not
    `normed_embedding`) or a photo of it (read with face_models), its 5 keypoints or the keypoint image (default with
    a photo: the photo's), IdentityNet's scale and its IP-Adapter's scale; the demo's "enhance non-face region" and
    its face box."""
    instantid_face: Any = None  # [512] or [1, 512] numbers (a list, numpy array or tensor), or a photo
    instantid_kps: Any = None  # [5, 2] pixel coordinates in the output image (eyes, nose, mouth corners), or an image
    identitynet_scale: float = 0.8  # the authors' settings (reference/identity.md §4)
    instantid_ip_scale: float = 0.8
    enhance_face_region: bool = False  # InstantID's demo has it on; off here unless asked (unchanged images)
    instantid_bbox: Any = None  # its face box [x1, y1, x2, y2] in output pixels (default with a photo: the photo's)

    def __post_init__(self):  # JSON: a base64 keypoint image or photo → PIL (a bad one raises InvalidRequest)
        if isinstance(self.instantid_face, str):
            object.__setattr__(self, "instantid_face", _photo(self.instantid_face, "instantid_face"))
        if isinstance(self.instantid_kps, str):
            object.__setattr__(self, "instantid_kps", decode_image(self.instantid_kps, "instantid_kps"))


@dataclass(frozen=True)
class Pulid:
    """PuLID v1 (runtime/conditioning/pulid.py): one face's identity, precomputed — the ID encoder's inputs
    {embedding: raw insightface [512], eva_embedding: EVA-CLIP [768], eva_hidden: [5, 577, 1024]} or its output, the
    ID tokens [T, 2048] — the ID scale, the mode (fidelity | style | plain), the step the ID attention starts at and
    the zero tokens appended (NUM_ZERO). The inputs' `embedding` may be a photo instead (read with face_models)."""
    pulid_id: Any = None

    def __post_init__(self):  # JSON: the inputs' embedding as a base64 photo → PIL (a bad one raises InvalidRequest)
        given = self.pulid_id
        if isinstance(given, Mapping) and isinstance(given.get("embedding"), str):
            object.__setattr__(self, "pulid_id", {**given, "embedding": _photo(given["embedding"], "pulid_id")})
    pulid_scale: float = 0.8  # the authors' settings (reference/identity.md §3)
    pulid_mode: str = "fidelity"
    pulid_start_step: int = 0
    pulid_zero_tokens: int | None = None  # None: the version's and mode's (runtime/conditioning/pulid.py)


@dataclass(frozen=True)
class PhotoMaker:
    """PhotoMaker v1 (runtime/conditioning/photomaker.py): photos of one person (several stack: more fidelity), the
    trigger word that follows the class word in the prompt ("a photo of a woman img"), and the style strength in %
    (the steps before int(strength/100 · steps), at most 30, see the prompt without the identity)."""
    photomaker_images: Any = None  # a PIL image or a list of them (base64 strings in JSON)
    photomaker_trigger: str = "img"  # the authors' settings (reference/identity.md §2)
    photomaker_style_strength: float = 20.0
    photomaker_faces: Any = None  # PhotoMaker v2: each photo's raw insightface `embedding`, [N, 512] numbers
    # (without them, v2 reads them from the photos with face_models)

    def __post_init__(self):  # JSON: base64 photos → PIL (a bad one raises InvalidRequest), a list → a tuple
        given = self.photomaker_images
        if isinstance(given, str):
            object.__setattr__(self, "photomaker_images", decode_image(given, "photomaker_images"))
        elif isinstance(given, list):
            object.__setattr__(self, "photomaker_images", tuple(
                decode_image(x, f"photomaker_images[{i}]") if isinstance(x, str) else x for i, x in enumerate(given)))


GROUPS = {"prompt": Prompt, "sampling": Sampling, "size": Size, "seeds": Seeds, "images": ImageInputs,
          "refine": Refine, "adapters": Adapters, "decode": Decode,
          "control": Control, "image_prompt": ImagePrompt, "t2i": T2i, "instantid": InstantId, "pulid": Pulid,
          "photomaker": PhotoMaker}
# flat key → (group, field); the flat form is what CLI options and most JSON clients send
FLAT = {f.name: (g, f.name) for g, cls in GROUPS.items() for f in fields(cls) if f.name != "text"}
FLAT["prompt"] = ("prompt", "text")
FLAT["negative_prompt"] = ("prompt", "negative")
FLAT["prompt_syntax"] = ("prompt", "syntax")
FLAT["images_per_prompt"] = ("size", "batch")
_IMAGE_FIELDS = ("init_image", "mask", "depth_map", "ip_image", "adapter_image", "photomaker_images")


@dataclass(frozen=True)
class Request:
    prompt: Prompt | str | Sequence[str]
    sampling: Sampling = Sampling()
    size: Size = Size()
    seeds: Seeds = Seeds()
    images: ImageInputs = ImageInputs()
    refine: Refine = Refine()
    adapters: Adapters = Adapters()
    decode: Decode = Decode()
    control: Control = Control()
    image_prompt: ImagePrompt = ImagePrompt()
    t2i: T2i = T2i()
    instantid: InstantId = InstantId()
    pulid: Pulid = Pulid()
    photomaker: PhotoMaker = PhotoMaker()

    @property
    def prompt_group(self) -> Prompt:
        return self.prompt if isinstance(self.prompt, Prompt) else Prompt(self.prompt)

    @classmethod
    def of(cls, **flat) -> "Request":
        """A request from flat keywords (prompt=, negative_prompt=, steps=, sampler=, width=, seed=, batch=, …)."""
        return cls.from_dict(flat)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Request":
        """From nested groups ({"sampling": {"steps": 8}}) or flat keys ({"steps": 8}), or both.

        Unknown keys raise InvalidRequest naming the key; values are checked later, by validate().
        """

        if not isinstance(data, Mapping):
            raise InvalidRequest("request", f"must be a JSON object, not {type(data).__name__}")
        parts: dict[str, dict] = {g: {} for g in GROUPS}
        for key, value in data.items():
            if key in GROUPS and key != "prompt" and isinstance(value, Mapping):
                known = {f.name for f in fields(GROUPS[key])}
                for k, v in value.items():
                    if k not in known:
                        raise InvalidRequest(f"{key}.{k}", f"is not a field of {key}; known: {', '.join(sorted(known))}")
                    parts[key][k] = v
            elif key == "prompt" and isinstance(value, Mapping):
                for k, v in value.items():
                    if k not in {f.name for f in fields(Prompt)}:
                        raise InvalidRequest(f"prompt.{k}", "is not a field of prompt; known: "
                                                            + ", ".join(sorted(f.name for f in fields(Prompt))))
                    parts["prompt"][k] = v
            elif key == "karras":  # the older boolean form of schedule="karras"
                if value:
                    parts["sampling"].setdefault("schedule", "karras")
            elif key in FLAT:
                group, name = FLAT[key]
                parts[group][name] = value
            else:
                raise InvalidRequest(key, "is not a request field; known: " + ", ".join(sorted(set(FLAT) | set(GROUPS))))
        for group in ("images", "image_prompt", "t2i"):
            for name in _IMAGE_FIELDS:
                value = parts[group].get(name)
                if isinstance(value, str):
                    parts[group][name] = decode_image(value, name)
                elif name == "ip_image" and isinstance(value, (list, tuple)):
                    parts[group][name] = tuple(decode_image(x, f"{name}[{i}]") if isinstance(x, str) else x
                                               for i, x in enumerate(value))
        if "text" not in parts["prompt"]:
            raise InvalidRequest("prompt", "is required: a string, or a list of strings")
        return cls(**{g: GROUPS[g](**parts[g]) for g in GROUPS})

    def to_dict(self, encode_images: bool = False) -> dict:
        """Nested plain data; with encode_images, PIL images become base64 PNG strings (JSON-safe)."""
        out = {}
        for g in GROUPS:
            value = self.prompt_group if g == "prompt" else getattr(self, g)
            d = {f.name: getattr(value, f.name) for f in fields(value)}
            if g == "refine":
                if d.pop("init_latents") is not None and encode_images:
                    raise ValueError("init_latents (a base → refiner hand-off) cannot be written to JSON")
            for k, v in d.items():
                if k == "controls":
                    d[k] = [_control_out(x, encode_images) for x in v]
                    continue
                if k == "ip_adapters":
                    d[k] = [_ip_out(x, encode_images) for x in v]
                    continue
                if k == "photomaker_faces" and v is not None:
                    d[k] = _listed(v)
                    continue
                if k in ("instantid_face", "instantid_kps", "instantid_bbox") and v is not None:  # numbers → lists, an image → base64
                    d[k] = encode_image(v) if encode_images and isinstance(v, Image.Image) else \
                        v.tolist() if hasattr(v, "tolist") else v
                    continue
                if k == "pulid_id" and v is not None:  # arrays → lists (the inputs' mapping: each of its arrays)
                    d[k] = {n: encode_image(x) if encode_images and isinstance(x, Image.Image) else _listed(x)
                            for n, x in v.items()} if isinstance(v, Mapping) else _listed(v)
                    continue
                if isinstance(v, tuple):
                    d[k] = [list(x) if isinstance(x, tuple) else x for x in v]  # nested: adapters.loras pairs
                if encode_images and k in _IMAGE_FIELDS and v is not None:
                    d[k] = [encode_image(x) for x in v] if isinstance(v, (list, tuple)) else encode_image(v)
            defaults = {f.name: (f.default if f.default is not MISSING else None) for f in fields(GROUPS[g])}
            defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}  # as d holds them
            out[g] = {k: v for k, v in d.items() if k == "text" or v != defaults.get(k)}
        return {g: d for g, d in out.items() if d or g == "prompt"}


def _listed(value):
    value = value.detach().cpu().numpy() if hasattr(value, "detach") else value
    return value.tolist() if hasattr(value, "tolist") else value


def _control_out(entry, encode_images: bool):
    """A control entry as plain data: {name, image, scale}."""
    window = {}
    if isinstance(entry, dict):
        name, image, scale = entry.get("name"), entry.get("image"), entry.get("scale", 1.0)
        window = {k: entry[k] for k in ("start", "end") if entry.get(k) is not None}  # this net's own window
    else:
        name, image, scale = entry[0], entry[1], entry[2] if len(entry) > 2 else 1.0
    if encode_images and isinstance(image, Image.Image):
        image = encode_image(image)
    return {"name": name, "image": image, "scale": scale, **window}


def _ip_out(entry, encode_images: bool):
    """An ip_adapters entry as plain data: {name, image (or a list), scale}."""
    if isinstance(entry, dict):
        name, image, scale = entry.get("name"), entry.get("image"), entry.get("scale", 1.0)
    else:
        name, image, scale = entry[0], entry[1], entry[2] if len(entry) > 2 else 1.0
    if isinstance(entry, dict) and entry.get("embeds") is not None:  # FaceID
        embeds = entry["embeds"]
        return {"name": name, "embeds": embeds.tolist() if hasattr(embeds, "tolist") else embeds, "scale": scale}
    encode = (lambda x: encode_image(x) if isinstance(x, Image.Image) else x) if encode_images else (lambda x: x)
    image = [encode(x) for x in image] if isinstance(image, (list, tuple)) else encode(image)
    return {"name": name, "image": image, "scale": scale}


def encode_image(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _photo(text: str, name: str) -> Image.Image:
    """A face's photo where numbers (an embedding) may stand instead."""
    try:
        return decode_image(text, name)
    except InvalidRequest:
        raise InvalidRequest(name, "must be numbers (the face's raw insightface embedding) or a photo of the face "
                                   "(a base64-encoded PNG/JPEG/WebP image)") from None


def decode_image(text: str, name: str) -> Image.Image:

    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        image.load()
        return image
    except Exception as e:  # binascii.Error, PIL.UnidentifiedImageError, OSError, …
        raise InvalidRequest(name, f"is not a base64-encoded PNG/JPEG/WebP image ({type(e).__name__})") from None


__all__ = ["Request", "Prompt", "Sampling", "Size", "Seeds", "ImageInputs", "Refine", "Adapters", "Decode", "Control",
           "ImagePrompt", "T2i", "InstantId", "Pulid", "PhotoMaker", "asdict"]
