"""TensorRT shape profiles, plan keys and plan selection: pure logic, tested on the CPU.

One plan per (component, profile). A static profile (min = opt = max) is the fastest and the only kind
CUDA graphs can replay; a dynamic one covers a range with the optimum in the middle. The UNet's batch
doubles under classifier-free guidance, so a profile records whether guidance will be used (Lightning and
Turbo presets run without it and get batch-B UNets). Keys carry the GPU's compute capability and the
TensorRT version: a plan is never loaded on another GPU or TensorRT (reference/tensorrt_demo.md §2.8, §5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdrt.runtime.errors import UserError

TEXT_LENGTH = 77
# the T5 sequence each transformer family pads every prompt to by default (FluxPipeline / StableDiffusion3Pipeline's
# max_sequence_length); `sdrt build --max-sequence-length` builds for another
T5_LENGTH = {"flux": 512, "sd3": 256}
T5_ENCODER = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def covers(self, value: int) -> bool:
        return self.min <= value <= self.max

    def text(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}-{self.max}"


@dataclass(frozen=True)
class Profile:
    """Image batch and pixel height/width ranges; `guidance` doubles the UNet's batch."""

    batch: Range
    height: Range
    width: Range
    guidance: bool
    text_chunks: Range = Range(1, 1, 1)  # 77-token prompt chunks: the UNet's sequence length is 77 · chunks
    text_length: Range | None = None  # T5 tokens (SD3, FLUX.1); None: the family's default (T5_LENGTH)

    @property
    def static(self) -> bool:
        return all(r.min == r.max for r in (self.batch, self.height, self.width, self.text_chunks,
                                            self.text_length or Range(1, 1, 1)))

    def name(self) -> str:
        cfg = "cfg" if self.guidance else "nocfg"
        text = "" if self.text_chunks == Range(1, 1, 1) else f"_t{self.text_chunks.text()}"
        t5 = "" if self.text_length is None else f"_s{self.text_length.text()}"
        return f"b{self.batch.text()}_h{self.height.text()}_w{self.width.text()}{text}{t5}_{cfg}"

    def covers(self, batch: int, height: int, width: int, guidance: bool) -> bool:
        return (self.guidance == guidance and self.batch.covers(batch) and self.height.covers(height)
                and self.width.covers(width))


def parse_resolution(text: str, multiple: int) -> tuple[int, int]:
    """'1024x768' → (height, width) = (768, 1024): WIDTHxHEIGHT, as image tools write sizes."""
    m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", text)
    if not m:
        raise UserError(f"resolution {text!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    width, height = int(m.group(1)), int(m.group(2))
    for value in (width, height):
        if value <= 0 or value % multiple:
            raise UserError(f"resolution {text}: width and height must be positive multiples of {multiple}")
    return height, width


def parse_range(text: str, what: str, multiple: int = 1) -> Range:
    """'512-1024' → Range(512, opt, 1024) with opt the midpoint rounded to `multiple`; '4' → static."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise UserError(f"{what} {text!r} is not N or MIN-MAX")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if lo <= 0 or hi < lo:
        raise UserError(f"{what} {text!r}: need 0 < MIN <= MAX")
    if lo % multiple or hi % multiple:
        raise UserError(f"{what} {text!r}: both ends must be multiples of {multiple}")
    opt = (lo + hi) // 2 // multiple * multiple
    return Range(lo, max(opt, lo), hi)


def profiles(resolutions: list[str], dynamic: str | None, batch: str, guidance: bool, multiple: int,
             text_chunks: str = "1", text_length: str | None = None) -> list[Profile]:
    """Profiles for `--resolution WxH ...` (static each) and/or `--dynamic MIN-MAX` (square range); `text_chunks`
    (N or MIN-MAX, optimum at MIN) is the range of 77-token prompt chunks the UNet plans take; `text_length`
    (N or MIN-MAX, optimum at MAX: prompts are padded to it) the T5 tokens of the transformer families."""
    batch_range = parse_range(batch, "batch")
    chunks = parse_range(text_chunks, "prompt chunks")
    chunks = Range(chunks.min, chunks.min, chunks.max)  # most prompts fit one chunk
    t5 = None
    if text_length is not None:
        t5 = parse_range(text_length, "max sequence length")
        t5 = Range(t5.min, t5.max, t5.max)
    out = []
    for text in resolutions:
        h, w = parse_resolution(text, multiple)
        out.append(Profile(batch_range, Range(h, h, h), Range(w, w, w), guidance, chunks, t5))
    if dynamic:
        r = parse_range(dynamic, "dynamic size range", multiple)
        out.append(Profile(batch_range, r, r, guidance, chunks, t5))
    if not out:
        raise UserError("give at least one --resolution WxH or a --dynamic MIN-MAX range")
    return out


# the face-ID graphs (export/extras/instantid.py, pulid.py, photomaker.py): their own axes, sized per call as the
# runtime calls them (runtime/conditioning/): one identity per encoder call, PhotoMaker's photos and class rows
ONE_PER_CALL = ("image_encoder", "pulid/encoder", "instantid/proj")  # one image prompt / identity / face per call
ID_TOKENS = Range(10, 26, 64)  # PuLID's ID tokens: v1 5 + 5 EVA layers (+ 0/8/16 zero rows by mode), v1.1 32 + 20
PHOTO_ROWS = Range(1, 1, 8)  # PhotoMaker: photos per identity (v1) and class rows (v2: 2 per photo)
EVA_PATCHES = 577  # EVA02-CLIP-L-14-336's tokens: PuLID's id_vit_hidden
FACE_TOKENS = 16  # InstantID's Resampler output: IdentityNet's context instead of the text


def _guided(component: str, family: str = "sd15") -> bool:
    """Components that run cond+uncond together under guidance: the UNets, the ControlNets (and IdentityNet) and
    SD3's transformer (FLUX.1 has no guidance batch: dev's guidance is an input, runtime/family.py)."""
    return component in ("unet", "unet_controlnet", "unet_ip", "unet_controlnet_ip", "unet_pulid",
                         "instantid/identitynet") or \
        component.startswith("controlnet/") or (component == "transformer" and family == "sd3")


def component_batch(component: str, profile: Profile, images: int, minimum: bool = False, family: str = "sd15") -> int:
    """The batch a component sees for `images` images: the UNet runs cond+uncond together under guidance;
    text encoders run the two prompt sets in separate calls; the VAE encoder encodes one init image.
    A ControlNet in guess mode sees the conditional half only: its minimum batch under guidance stays `images`."""
    if component.startswith("controlnet/") and profile.guidance and minimum:
        return images
    if component in ONE_PER_CALL:  # the IP-Adapter's image prompt, PuLID's identity, InstantID's face
        return 1
    if _guided(component, family) and profile.guidance:
        return 2 * images
    if component == "vae_encoder" and images == profile.batch.min:
        return 1
    return images


def input_shapes(component: str, inputs: dict, profile: Profile, vae_scale_factor: int,
                 family: str = "sd15") -> dict[str, tuple]:
    """{input name: (min, opt, max) shapes} for one component's ONNX inputs under a profile.

    `inputs` maps input names to their ONNX dims (ints or symbolic names), as in the manifest; `family` is the
    manifest's (the transformer families name their sequences differently: export/flow_components.py,
    export/flux_components.py).
    """
    f = vae_scale_factor
    t5 = profile.text_length or Range(*(T5_LENGTH.get(family, TEXT_LENGTH),) * 3)

    def dims(batch: int, height: int, width: int, chunks: int, t5_length: int, minimum: bool = False,
             which: str = "opt") -> dict[str, int]:
        def pick_of(r: Range) -> int:
            return getattr(r, which)

        # text encoders encode one 77-token chunk per call; the UNet sees all chunks of a prompt at once
        text = TEXT_LENGTH * (chunks if component == "unet" or _guided(component) else 1)
        if component == T5_ENCODER.get(family):
            text = t5_length
        elif component == "transformer" and family == "sd3":  # CLIP's 77 tokens (padded to 4096) ‖ T5's
            text = TEXT_LENGTH + t5_length
        elif component == "instantid/identitynet":
            text = FACE_TOKENS
        dims = {"batch_size": component_batch(component, profile, batch, minimum, family), "sequence_length": text,
                "height": height // f, "width": width // f,
                "latent_height": height // f, "latent_width": width // f, "sample_height": height,
                "sample_width": width, "ip_images": 1, **{f"ip_images_{k}": 1 for k in range(1, 16)},
                # FLUX.1's transformer: the 2×2-packed latent sequence and the T5 text length
                "sequence": (height // f // 2) * (width // f // 2), "text_length": t5_length,
                "patches": EVA_PATCHES, "id_tokens": pick_of(ID_TOKENS), "rows": pick_of(PHOTO_ROWS)}
        for k in range(1, 7):  # ControlNet residuals: height_div2 = ⌈h/2⌉, … (export/extras/controlnet.py)
            dims[f"height_div{2 ** k}"] = -(-(height // f) // 2 ** k)
            dims[f"width_div{2 ** k}"] = -(-(width // f) // 2 ** k)
        return dims

    c = profile.text_chunks
    picks = [dims(profile.batch.min, profile.height.min, profile.width.min, c.min, t5.min, minimum=True, which="min"),
             dims(profile.batch.opt, profile.height.opt, profile.width.opt, c.opt, t5.opt, which="opt"),
             dims(profile.batch.max, profile.height.max, profile.width.max, c.max, t5.max, which="max")]
    shapes = {}
    for name, onnx_dims in inputs.items():
        if not onnx_dims:  # rank-0 (timestep)
            shapes[name] = ((), (), ())
            continue
        shapes[name] = tuple(tuple(d if isinstance(d, int) else pick[d] for d in onnx_dims) for pick in picks)
    return shapes


def plan_prefix(component: str) -> str:
    """A component as a file-name part: controlnet/NAME → controlnet--NAME."""
    return component.replace("/", "--")


def plan_file(component: str, profile: Profile, precision: str, compute_capability: tuple[int, int],
              trt_version: str) -> str:
    """trt/<component>__<profile>__<precision>__sm<cc>__trt<version>.plan"""
    sm = f"{compute_capability[0]}{compute_capability[1]}"
    return f"{plan_prefix(component)}__{profile.name()}__{precision}__sm{sm}__trt{trt_version}.plan"


def select(plans: list[dict], component: str, inputs: dict, feed_shapes: dict[str, tuple], vae_scale_factor: int,
           compute_capability: tuple[int, int], trt_version: str, family: str = "sd15") -> dict:
    """The best plan for one call: its profile must cover every input shape (TensorRT's own rule) and it
    must have been built for this GPU and TensorRT. `inputs` holds the component's ONNX dims.

    Among covering plans a static one wins, then the one whose optimum shapes are nearest.
    Raises UserError listing what the directory covers when nothing does.
    """
    mine = [p for p in plans if p["component"] == component]
    if not mine:
        raise UserError(f"no TensorRT plan for {component}; build one with `sdrt build ENGINE_DIR --resolution WxH`")
    usable = [p for p in mine if tuple(p["compute_capability"]) == tuple(compute_capability)
              and p["trt_version"] == trt_version]

    def bounds(p: dict) -> dict:
        return input_shapes(component, inputs, _profile(p), vae_scale_factor, family)

    def covers(p: dict) -> bool:
        b = bounds(p)
        return all(len(shape) == len(b[n][0]) and all(lo <= d <= hi for d, lo, hi in zip(shape, b[n][0], b[n][2]))
                   for n, shape in feed_shapes.items())

    covering = [p for p in usable if covers(p)]
    if not covering:
        listed = "; ".join(f"{p['profile']} (sm{''.join(map(str, p['compute_capability']))}, TensorRT "
                           f"{p['trt_version']})" for p in mine)
        why = "" if usable else (f" none was built for this GPU (sm{compute_capability[0]}{compute_capability[1]}) "
                                 f"and TensorRT {trt_version}; rebuild with `sdrt build`;")
        shapes = ", ".join(f"{n} {list(s)}" for n, s in feed_shapes.items())
        raise UserError(f"no {component} plan covers {shapes};{why} the directory has: {listed}")

    def distance(p: dict) -> tuple:
        opt = bounds(p)
        return (not _profile(p).static,
                sum(abs(d - o) for n, shape in feed_shapes.items() for d, o in zip(shape, opt[n][1])))

    return min(covering, key=distance)


def _profile(p: dict) -> Profile:
    return Profile(Range(*p["batch"]), Range(*p["height"]), Range(*p["width"]), p["guidance"],
                   Range(*p.get("text_chunks", (1, 1, 1))),  # plans built before long prompts: one chunk
                   Range(*p["text_length"]) if p.get("text_length") else None)


def profile_record(profile: Profile) -> dict:
    return {"batch": [profile.batch.min, profile.batch.opt, profile.batch.max],
            "height": [profile.height.min, profile.height.opt, profile.height.max],
            "width": [profile.width.min, profile.width.opt, profile.width.max],
            "guidance": profile.guidance,
            "text_chunks": [profile.text_chunks.min, profile.text_chunks.opt, profile.text_chunks.max],
            "text_length": [profile.text_length.min, profile.text_length.opt, profile.text_length.max]
            if profile.text_length is not None else None}
