"""InstantID at run time (reference/identity.md §4): one face's raw ArcFace embedding e and its 5 keypoints steer
the image through IdentityNet (a ControlNet on the keypoint image whose context is the face tokens, not the text)
and an IP-Adapter fed the same tokens. Engines (export/extras/instantid.py): `instantid/proj` (the Resampler),
`instantid/identitynet`, and unet_controlnet_ip with the adapter as kind "instantid".

The face is given as numbers (the raw embedding and the keypoints) or as a photo, read with insightface's models
as InstantID's infer.py does (faces.py: resize_img, the largest face; its keypoints drawn on the resized photo).

Reproduces InstantID's StableDiffusionXLInstantIDPipeline (pipeline_stable_diffusion_xl_instantid.py):
- face tokens F = Resampler(e) [16, D]; the negative is Resampler(zeros), not zeros; both repeated per image, with
  guidance [negative ‖ positive]; F is cached per identity (keyed by the embedding's bytes) so a second request
  with the same face skips the Resampler;
- the keypoint image is draw_kps re-stated (`draw_kps` below) on a black canvas of the output size, or the
  caller's image; either is a ControlNet image (Lanczos to the output size, [0, 1]), doubled for guidance;
- IdentityNet is called with encoder_hidden_states = F for both guidance halves and the real text_embeds /
  time_ids; residuals × identitynet_scale, added to any other ControlNets' (InstantID's multi-ControlNet sums);
- the UNet's attn2 add ip_scale · attention(Q, to_k_ip(F), to_v_ip(F)): diffusers' IPAdapterAttnProcessor2_0 over
  F, the maths of InstantID's IPAttnProcessor2_0 on [text ‖ F].

"Enhance non-face region" (`enhance_face_region`; on in InstantID's demo, off unless asked here), as the demo's
app.py and pipeline_stable_diffusion_xl_instantid_full.py do it: the mask M is 1 inside the face box and 0 outside at
the output size (app.py: the bbox's corners truncated with int(), M[y1:y2, x1:x2] = 1; here also clipped to the
image); IdentityNet's residuals (after its scale) × M resized bilinearly (F.interpolate, align_corners False) to each
residual's size (InstantID lists the sizes as ÷8 ×3, ÷16 ×3, ÷32 ×3 for SDXL, the mid one ÷32), other ControlNets'
unmasked; the adapter's branch × M resized nearest per attention resolution (ip_mask, export/extras/ip_adapter.py).
The box is the photo's face (scaled to the output size) when the keypoints come from the photo too, else the
caller's `instantid_bbox` [x1, y1, x2, y2] in output pixels.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdrt.runtime import fields
from sdrt.runtime.conditioning.cache import LruCache, graph_key
from sdrt.runtime.conditioning import faces, ip_adapter
from sdrt.runtime.conditioning.controlnet import MID, MID_INPUT, control_image, down_input, down_output
from sdrt.runtime.conditioning.graphs import INSTANTID, graph_for
from sdrt.runtime.denoiser import feed as feed_mod
from sdrt.runtime.fields import InvalidRequest

NAME, FIELD = INSTANTID, "instantid"  # its name in Job.uses and graphs.py, the Job field of its use
IP_MASK = "ip_mask"  # the region mask input of unet_controlnet_ip with InstantID (export/extras/ip_adapter.py)
CACHE_SIZE = 32  # identities whose face tokens stay cached
# draw_kps: keypoint colours (RGB) in insightface's order (left eye, right eye, nose, left and right mouth corner),
# the bars from each point to the nose, the bars' half-width and the dots' radius (InstantID's pipeline module)
COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
BARS = ((0, 2), (1, 2), (3, 2), (4, 2))
BAR_HALF_WIDTH, DOT_RADIUS, BAR_DIM = 4, 10, 0.6


@dataclass(frozen=True, eq=False)
class InstantIdUse:
    face: np.ndarray  # [W] float32, the raw embedding
    kps_image: Image.Image  # RGB
    identitynet_scale: float
    ip_scale: float
    bbox: tuple[int, int, int, int] | None = None  # the face box in output pixels, with enhance_face_region

    def key(self) -> tuple:
        return (hashlib.sha256(self.face.tobytes()).hexdigest(), id(self.kps_image), self.identitynet_scale,
                self.ip_scale, self.bbox)


def draw_kps(kps: np.ndarray, width: int, height: int) -> Image.Image:
    """InstantID's keypoint image: each bar (point → nose) a filled ellipse (OpenCV ellipse2Poly, integer centre,
    half-axes (length/2, 4), integer angle) in its first point's colour, the canvas × 0.6, then filled dots r 10."""
    import cv2

    canvas = np.zeros((height, width, 3))  # float64, as the original draws
    for a, b in BARS:
        (xa, ya), (xb, yb) = kps[a], kps[b]
        half_length = int(math.hypot(xa - xb, ya - yb) / 2)
        angle = int(math.degrees(math.atan2(ya - yb, xa - xb)))
        polygon = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (half_length, BAR_HALF_WIDTH), angle,
                                   0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas, polygon, COLOURS[a])
    canvas = (canvas * BAR_DIM).astype(np.uint8)
    for i, (x, y) in enumerate(kps):
        canvas = cv2.circle(canvas, (int(x), int(y)), DOT_RADIUS, COLOURS[i], -1)
    return Image.fromarray(canvas)


def _numbers(field: str, given, shape_text: str) -> np.ndarray:
    try:
        array = np.array(given.detach().cpu() if isinstance(given, torch.Tensor) else given, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidRequest(field, f"must be numbers of shape {shape_text}") from None
    if not np.isfinite(array).all():
        raise InvalidRequest(field, "must be finite numbers")
    return array


def validate(request, model_dir, context) -> InstantIdUse | None:
    """The request's InstantID group checked against the directory's InstantID export; None when it gives no face."""
    group = request.instantid
    if group.instantid_face is None and group.instantid_kps is None:
        for name in ("enhance_face_region", "instantid_bbox"):
            if getattr(group, name) not in (None, False):
                raise InvalidRequest(name, "is an InstantID option; give the face (instantid_face) with it")
        return None
    record = (model_dir.manifest or {}).get("instantid")
    if not record:
        raise InvalidRequest("instantid_face", "this engine directory has no InstantID (export one with --instantid)")
    width = record["embed_dim"]
    if group.instantid_face is None:
        raise InvalidRequest("instantid_face", f"is required with instantid_kps: the face's raw insightface "
                                               f"embedding ([{width}] numbers) or a photo of the face")
    found = None
    if isinstance(group.instantid_face, Image.Image):  # a photo: the face InstantID's own code picks (faces.py)
        photo = fields.image("instantid_face", group.instantid_face, "RGB")
        found = faces.read(request.adapters.face_models, photo, faces.INSTANTID, "instantid_face")
    face = found.embedding if found is not None else _numbers("instantid_face", group.instantid_face, f"[{width}]")
    if face.shape not in ((width,), (1, width)):
        raise InvalidRequest("instantid_face", f"must be one face's embedding of shape [{width}] or [1, {width}] "
                                               f"(got {list(face.shape)})")
    kps = group.instantid_kps
    if kps is None and found is None:
        raise InvalidRequest("instantid_kps", "is required: the face's 5 keypoints ([5, 2] pixel coordinates in the "
                                              "output image) or the keypoint image")
    if kps is None:  # the photo's keypoints drawn on the (resized) photo's canvas, as InstantID's infer.py
        image = _drawn(found.kps, *found.size)
    elif isinstance(kps, Image.Image):
        image = fields.image("instantid_kps", kps, "RGB")
    else:
        points = _numbers("instantid_kps", kps, "[5, 2]")
        if points.shape != (5, 2):
            raise InvalidRequest("instantid_kps", f"must be 5 keypoints [[x, y] × 5] or an image (got shape "
                                                  f"{list(points.shape)})")
        image = _drawn(points, context.width, context.height)
    scales = [fields.number(n, v) for n, v in (("identitynet_scale", group.identitynet_scale),
                                               ("instantid_ip_scale", group.instantid_ip_scale))]
    try:
        graph = graph_for({*context.earlier, NAME})
    except ValueError as e:
        raise InvalidRequest("instantid_face", f"InstantID cannot run with {', '.join(context.earlier)}: {e}") from None
    for component in (graph, record["controlnet"], record["projection"]):
        if not model_dir.has(component):
            raise InvalidRequest("instantid_face", f"this engine directory has no {component} graph; export it "
                                                   "again with --instantid")
    bbox = _bbox(group, found, kps, context)
    if bbox is not None and not has_mask(model_dir.manifest, graph):
        raise InvalidRequest("enhance_face_region", f"this engine directory's {graph} graph predates InstantID's "
                                                    "region mask; export it again with --instantid")
    return InstantIdUse(face.reshape(width), image, *scales, bbox)


def _bbox(group, found, kps, context) -> tuple[int, int, int, int] | None:
    """enhance_face_region's face box in output pixels (InstantID's app.py: int() of each corner), clipped to the
    image; None when the option is off."""
    enhance, given = group.enhance_face_region, group.instantid_bbox
    if not isinstance(enhance, bool):
        raise InvalidRequest("enhance_face_region", f"must be true or false, not {enhance!r}")
    if not enhance:
        if given is not None:
            raise InvalidRequest("instantid_bbox", "is the face box of enhance_face_region; set enhance_face_region "
                                                   "true to use it")
        return None
    if given is not None:
        box = _numbers("instantid_bbox", given, "[4]")
        if box.shape != (4,):
            raise InvalidRequest("instantid_bbox", f"must be one box [x1, y1, x2, y2] in output pixels (got shape "
                                                   f"{list(box.shape)})")
    elif found is not None and kps is None:  # the photo's face, its box scaled as its keypoint image is
        box = found.bbox * np.array([context.width / found.size[0], context.height / found.size[1]] * 2)
    else:
        raise InvalidRequest("instantid_bbox", "is required with enhance_face_region: the face box [x1, y1, x2, y2] "
                                               "in output pixels (read from the photo only when the keypoints come "
                                               "from the photo too)")
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, x2 = (min(max(v, 0), context.width) for v in (x1, x2))
    y1, y2 = (min(max(v, 0), context.height) for v in (y1, y2))
    if x2 <= x1 or y2 <= y1:
        raise InvalidRequest("instantid_bbox", f"must be a box [x1, y1, x2, y2] with x1 < x2 and y1 < y2 inside the "
                                               f"{context.width}×{context.height} image (got {box.tolist()})")
    return x1, y1, x2, y2


def has_mask(manifest: dict | None, graph: str) -> bool:
    """Whether the directory's `graph` takes InstantID's region mask (unet_controlnet_ip exported with it)."""
    inputs = (((manifest or {}).get("components") or {}).get(graph) or {}).get("inputs") or ()
    return any(i.get("name") == IP_MASK for i in inputs)


def region_mask(bbox: tuple[int, int, int, int], width: int, height: int) -> torch.Tensor:
    """M [1, 1, H, W]: 1 inside the face box, 0 outside (InstantID's control_mask, channel 0 / 255)."""
    x1, y1, x2, y2 = bbox
    mask = torch.zeros(1, 1, height, width)
    mask[..., y1:y2, x1:x2] = 1.0
    return mask


def _drawn(points: np.ndarray, width: int, height: int) -> Image.Image:
    try:
        return draw_kps(points.astype(np.float64), width, height)
    except ImportError:
        raise InvalidRequest("instantid_kps", "drawing keypoints needs OpenCV (pip install opencv-python-headless); "
                                              "give the keypoint image instead") from None


CACHE = LruCache(CACHE_SIZE)  # Resampler outputs [T, D] per (directory, Resampler file, embedding)


def face_tokens(parts, record: dict, face: np.ndarray) -> torch.Tensor:
    """The Resampler's face tokens [T, D] for one embedding, cached."""
    def run():
        engine = parts.component(record["projection"])
        return feed_mod.run(engine, face_embeds=torch.from_numpy(face).reshape(1, 1, -1))["face_tokens"][0].float()
    return CACHE.get(graph_key(parts, record["projection"]) + (face.tobytes(),), run)


def _ip_mask(region: torch.Tensor | None, sample: torch.Tensor) -> torch.Tensor:
    """ip_mask [rows, 1, h, w] at the latent's size: M nearest-resized (ones without a region mask); the graph takes
    every 2^k-th row and column of it at level k, which is M nearest-resized to that attention's size."""
    rows, (h, w) = sample.shape[0], sample.shape[-2:]
    if region is None:
        return torch.ones(rows, 1, h, w)
    return F.interpolate(region, size=(h, w), mode="nearest").repeat(rows, 1, 1, 1)


@dataclass(frozen=True)
class RegionMaskOnes:
    """ip_mask of ones for a job without InstantID on a unet_controlnet_ip that takes the mask (its branch is fed
    scale 0 then; the mask changes nothing)."""

    def contribute(self, feed, step):
        return feed if IP_MASK in feed else feed | {IP_MASK: _ip_mask(None, feed["sample"])}


@dataclass(frozen=True)
class InstantIdContributor:
    """IdentityNet's residuals (× the region mask with enhance_face_region; added to any already in the feed) and the
    adapter's face tokens into its ip_image_embeds_K / ip_scale_K (and ip_mask where the graph takes it); the
    directory's other adapters, when no image prompt fed them, get zeros and scale 0."""
    engine: Any
    tokens: torch.Tensor  # [B(·2), T, D], negatives first with guidance
    image: torch.Tensor  # [B(·2), 3, H, W]
    identitynet_scale: float
    ip_scale: float
    slot: int  # K of the InstantID adapter
    unused: dict  # the other adapters' zero feed, used where the feed has none
    region: torch.Tensor | None = None  # M [1, 1, H, W] at the output size, with enhance_face_region
    masked: bool = False  # the UNet graph takes ip_mask
    resized: dict = field(default_factory=dict)  # M at each residual's size and device, made once per job

    def _residual_mask(self, residual: torch.Tensor) -> torch.Tensor:
        """InstantID's _full pipeline: F.interpolate(M, (h // s, w // s), mode="bilinear"), i.e. at the residual's
        size."""
        key = (*residual.shape[-2:], residual.device, residual.dtype)
        if key not in self.resized:
            self.resized[key] = F.interpolate(self.region, size=tuple(residual.shape[-2:]),
                                              mode="bilinear").to(residual.device, residual.dtype)
        return self.resized[key]

    def contribute(self, feed, step):
        extra = {k: feed[k] for k in ("text_embeds", "time_ids") if k in self.engine.inputs}
        out = feed_mod.run(self.engine, sample=step.latents, timestep=torch.tensor(step.t, dtype=torch.float32),
                           encoder_hidden_states=self.tokens, controlnet_cond=self.image,
                           conditioning_scale=torch.tensor(self.identitynet_scale, dtype=torch.float32), **extra)
        residuals = [out[down_output(i)] for i in range(len(out) - 1)] + [out[MID]]
        if self.region is not None:
            residuals = [r * self._residual_mask(r) for r in residuals]
        names = [down_input(i) for i in range(len(residuals) - 1)] + [MID_INPUT]
        feed = feed | {n: feed[n] + r if n in feed else r for n, r in zip(names, residuals)}
        feed = {**self.unused, **feed}
        feed |= {IP_MASK: _ip_mask(self.region, feed["sample"])} if self.masked else {}
        return feed | {f"ip_image_embeds_{self.slot}": self.tokens[:, None],
                       f"ip_scale_{self.slot}": torch.tensor(self.ip_scale, dtype=torch.float32)}


def attach(parts, job, prep):
    """`prep` unchanged without InstantID; else with an InstantIdContributor added."""
    use = job.instantid
    if use is None:
        graph = graph_for(job.uses) if job.uses else None
        if graph is not None and has_mask(parts.dir.manifest, graph):
            return replace(prep, contributors=[*prep.contributors, RegionMaskOnes()])
        return prep
    record = parts.dir.manifest["instantid"]
    guided = prep.guidance.enabled
    positive = face_tokens(parts, record, use.face)[None].repeat(job.count, 1, 1)
    tokens = positive
    if guided:
        negative = face_tokens(parts, record, np.zeros_like(use.face))[None].repeat(job.count, 1, 1)
        tokens = torch.cat([negative, positive])
    image = control_image(use.kps_image, job.width, job.height).repeat_interleave(job.count, dim=0)
    if guided:
        image = torch.cat([image] * 2)
    records = ip_adapter.adapter_records(parts.dir.manifest)
    slot = next(k for k, r in enumerate(records) if r["name"] == record["adapter"])
    folder, rows = parts.dir.path / ip_adapter.IMAGE_ENCODER, len(tokens)
    unused = {}
    for k, r in enumerate(records):
        if k != slot:
            unused |= {f"ip_image_embeds_{k}": ip_adapter.unused_embeds(folder, r, rows),
                       f"ip_scale_{k}": torch.tensor(0.0, dtype=torch.float32)}
    region = region_mask(use.bbox, job.width, job.height) if use.bbox is not None else None
    contributor = InstantIdContributor(parts.component(record["controlnet"]), tokens, image, use.identitynet_scale,
                                       use.ip_scale, slot, unused, region,
                                       has_mask(parts.dir.manifest, graph_for(job.uses)))
    return replace(prep, contributors=[*prep.contributors, contributor])
