"""PuLID (v1, v1.1) at run time (reference/identity.md §3): ID tokens through an extra cross-attention in every attn2
of the UNet. Engines (export/extras/pulid.py): `pulid/encoder` (v1's IDEncoder or v1.1's IDFormer) and `unet_pulid`.

The request gives the identity precomputed, one face (`pulid_id`), either
- the ID encoder's inputs, as PuLID's get_id_embedding makes them: {"embedding": the raw insightface `embedding`
  [512] (antelopev2's glintr100, not `normed_embedding`; or a photo, read with insightface's models as PuLID does,
  faces.py; PuLID's facexlib fallback when no face is found is not reproduced), "eva_embedding": EVA02-CLIP-L-14-336's
  image embedding
  [768] of the aligned, parsed face (L2-normalised here, as PuLID does), "eva_hidden": the 5 hidden states [5, 577,
  1024] entering EVA's blocks 4, 8, 12, 16, 20}; the encoder's output is cached per identity (keyed by the inputs'
  bytes), so a second request with the same face skips it; or
- the ID tokens themselves [T, D] (the encoder's output, e.g. saved from PuLID's own pipeline); or
- one photo, {"embedding": PHOTO} alone: all three inputs from it as get_id_embedding makes them (pulid_photo.py,
  through the directory's pulid/parsing and pulid/eva graphs: `sdrt export --pulid-eva --pulid-parsing`).
Reproduces PuLIDPipeline.inference (pipeline.py, pipeline_v1_1.py, attention_processor.py, app.py, app_v1_1.py): the
negative tokens are the encoder on all-zero inputs; with guidance the UNet sees [negative ‖ positive] tokens, each
image its own copy (PuLID's apps run one image per call); the mode picks the projection — fidelity ORTHO_v2, style
(v1's "extremely style") ORTHO, plain none — and zero rows are appended (NUM_ZERO: v1 8 / 16 / 0 by mode, v1.1 20;
`pulid_zero_tokens` overrides, as v1.1's slider does); the ID scale is the same for both halves. From
`pulid_start_step` on (0: every step, as PuLID on SDXL does; PuLID-FLUX's "start inserting ID" step) the ID attention
acts; before it the scale is 0, which leaves the UNet's own output exactly.
Several photos (the app's supplementary images): give their ID tokens concatenated; the negative is tiled to the
same length, as the app's concatenation of both halves makes it. Not reproduced: v1's quirk at guidance ≤ 1, where
PuLID feeds one batch of [negative ‖ positive] tokens as keys (here: the positive tokens alone).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from sdrt.runtime import fields
from sdrt.runtime.conditioning.cache import LruCache, graph_key
from sdrt.runtime.conditioning import faces, pulid_photo
from sdrt.runtime.conditioning.graphs import PULID, graph_for
from sdrt.runtime.denoiser import feed as feed_mod
from sdrt.runtime.fields import InvalidRequest

NAME, FIELD = PULID, "pulid"  # its name in Job.uses and graphs.py, the Job field of its use
CACHE_SIZE = 32  # identities whose ID tokens stay cached
MODES = {"fidelity": (0.0, 1.0), "style": (1.0, 0.0), "plain": (0.0, 0.0)}  # (ORTHO, ORTHO_v2)
# the zero rows (NUM_ZERO) each version's app appends: v1 per mode (app.py), v1.1 20 whatever the ortho (app_v1_1.py)
ZERO_TOKENS = {"v1": {"fidelity": 8, "style": 16, "plain": 0}, "v1.1": {"fidelity": 20, "style": 20, "plain": 20}}
MAX_ZERO_TOKENS = 256
INPUT_KEYS = ("embedding", "eva_embedding", "eva_hidden")


@dataclass(frozen=True, eq=False)
class PulidUse:
    digest: str  # sha256 of the identity's arrays
    tokens: np.ndarray | None  # [T, D] given ID tokens, or None
    id_cond: np.ndarray | None  # [1280]: raw embedding ‖ normalised EVA embedding
    hidden: np.ndarray | None  # [L, S, W]
    scale: float
    mode: str
    start_step: int
    zero_tokens: int
    photo: pulid_photo.PhotoFace | None = None  # a photo alone: EVA's part made at attach (pulid_photo.py)

    def key(self) -> tuple:
        return self.digest, self.scale, self.mode, self.start_step, self.zero_tokens


def _shaped(given, shape: tuple, shape_text: str, what: str = "") -> np.ndarray:
    """`given` (pulid_id, or its entry `what`) as `shape` (None: any size on that axis), a leading axis of 1 allowed."""
    try:
        array = np.array(given.detach().cpu() if isinstance(given, torch.Tensor) else given, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidRequest("pulid_id", f"{what}must be numbers of shape {shape_text}") from None
    if not np.isfinite(array).all():
        raise InvalidRequest("pulid_id", f"{what}must be finite numbers")
    if array.ndim == len(shape) + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        raise InvalidRequest("pulid_id", f"{what}must have shape {shape_text} (got {list(array.shape)})")
    return np.ascontiguousarray(array)


def _inputs(given: Mapping, record: dict, models) -> tuple[np.ndarray, np.ndarray]:
    unknown = sorted(set(given) - set(INPUT_KEYS))
    missing = [k for k in INPUT_KEYS if k not in given]
    if unknown or missing:
        raise InvalidRequest("pulid_id", f"the ID encoder's inputs are {', '.join(INPUT_KEYS)}"
                                         + (f"; unknown: {', '.join(map(str, unknown))}" if unknown else "")
                                         + (f"; missing: {', '.join(missing)}" if missing else ""))
    embedding = given["embedding"]
    if isinstance(embedding, Image.Image):  # a photo: the ArcFace part read as PuLID does (faces.py); EVA's stays given
        photo = fields.image("pulid_id.embedding", embedding, "RGB")
        embedding = faces.read(models, photo, faces.PULID, "pulid_id.embedding").embedding
    face = _shaped(embedding, (record["face_dim"],), f"[{record['face_dim']}] (the raw insightface "
                   "embedding, or a photo of the face)", "embedding ")
    eva = _shaped(given["eva_embedding"], (record["eva_dim"],), f"[{record['eva_dim']}]", "eva_embedding ")
    layers, width = record["eva_layers"], record["eva_width"]
    hidden = _shaped(given["eva_hidden"], (layers, None, width), f"[{layers}, tokens, {width}] (EVA-CLIP's hidden "
                     "states, class token first)", "eva_hidden ")
    if hidden.shape[1] < 2:
        raise InvalidRequest("pulid_id", "eva_hidden needs the class token and at least one patch token")
    norm = float(np.linalg.norm(eva))
    if norm == 0:
        raise InvalidRequest("pulid_id", "eva_embedding must not be all zeros (PuLID divides it by its norm)")
    return np.concatenate([face, eva / norm]).astype(np.float32), hidden


def validate(request, model_dir, context) -> PulidUse | None:
    """The request's PuLID group checked against the directory's PuLID export; None when it gives no identity."""
    group = request.pulid
    if group.pulid_id is None:
        return None
    record = (model_dir.manifest or {}).get("pulid")
    if not record:
        raise InvalidRequest("pulid_id", "this engine directory has no PuLID (export one with --pulid)")
    tokens = id_cond = hidden = None
    photo = None
    if isinstance(group.pulid_id, Mapping) and pulid_photo.photo_only(group.pulid_id):
        photo = pulid_photo.read(group.pulid_id["embedding"], record, model_dir, request.adapters.face_models)
        digest = "photo:" + photo.digest
    elif isinstance(group.pulid_id, Mapping):
        id_cond, hidden = _inputs(group.pulid_id, record, request.adapters.face_models)
        digest = hashlib.sha256(id_cond.tobytes() + hidden.tobytes() + str(hidden.shape).encode()).hexdigest()
    else:
        dim = record["token_dim"]
        tokens = _shaped(group.pulid_id, (None, dim), f"[tokens, {dim}] (the ID encoder's output), or the "
                         f"encoder's inputs {{{', '.join(INPUT_KEYS)}}}")
        if tokens.shape[0] < 1:
            raise InvalidRequest("pulid_id", "holds no ID tokens")
        digest = hashlib.sha256(tokens.tobytes() + str(tokens.shape).encode()).hexdigest()
    scale = fields.number("pulid_scale", group.pulid_scale)
    if group.pulid_mode not in MODES:
        raise InvalidRequest("pulid_mode", f"must be one of {', '.join(MODES)} (got {group.pulid_mode!r})")
    start = fields.integer("pulid_start_step", group.pulid_start_step, lo=0)
    zeros = ZERO_TOKENS[record.get("version", "v1")][group.pulid_mode] if group.pulid_zero_tokens is None else \
        fields.integer("pulid_zero_tokens", group.pulid_zero_tokens, lo=0, hi=MAX_ZERO_TOKENS)
    try:
        graph = graph_for({*context.earlier, NAME})
    except ValueError as e:
        raise InvalidRequest("pulid_id", f"PuLID cannot run with {', '.join(context.earlier)}: {e}") from None
    for component in (graph, record["encoder"]):
        if not model_dir.has(component):
            raise InvalidRequest("pulid_id", f"this engine directory has no {component} graph; export it again with "
                                             "--pulid")
    return PulidUse(digest, tokens, id_cond, hidden, scale, group.pulid_mode, start, zeros, photo)


CACHE = LruCache(CACHE_SIZE)  # ID encoder outputs [T, D] per (directory, encoder file, the inputs' digest)


def id_tokens(parts, record: dict, digest: str, inputs) -> torch.Tensor:
    """The ID encoder's tokens [T, D] for one identity, cached by its inputs' digest; `inputs()` gives (id_cond,
    hidden) when they are not cached (a photo's run through the EVA graphs then)."""
    def run():
        engine = parts.component(record["encoder"])
        id_cond, hidden = inputs()
        return feed_mod.run(engine, id_cond=torch.from_numpy(id_cond)[None],
                            id_vit_hidden=torch.from_numpy(hidden)[None])["id_tokens"][0].float()
    return CACHE.get(graph_key(parts, record["encoder"]) + (digest,), run)


@dataclass(frozen=True)
class PulidContributor:
    """unet_pulid's id_tokens [B(·2), T + zero rows, D] (negatives first with guidance), its scale (0 before
    start_step) and the mode's two weights."""
    tokens: torch.Tensor
    scale: float
    ortho: float
    ortho_v2: float
    start_step: int

    def contribute(self, feed, step):
        scale = self.scale if step.index >= self.start_step else 0.0
        return feed | {"id_tokens": self.tokens, "id_scale": torch.tensor(scale, dtype=torch.float32),
                       "id_ortho": torch.tensor(self.ortho, dtype=torch.float32),
                       "id_ortho_v2": torch.tensor(self.ortho_v2, dtype=torch.float32)}


def negative_tokens(parts, record: dict, patches: int) -> torch.Tensor:
    """The encoder on all-zero inputs (PuLID's uncond_id_embedding) at `patches` EVA tokens."""
    id_cond = np.zeros(record["face_dim"] + record["eva_dim"], dtype=np.float32)
    hidden = np.zeros((record["eva_layers"], patches, record["eva_width"]), dtype=np.float32)
    return id_tokens(parts, record, f"zeros:{patches}", lambda: (id_cond, hidden))


def attach(parts, job, prep):
    """`prep` unchanged without PuLID; else with a PulidContributor added."""
    use = job.pulid
    if use is None:
        return prep
    record = parts.dir.manifest["pulid"]
    if use.tokens is not None:
        positive = torch.from_numpy(use.tokens)
        patches = record["eva_patches"]
    elif use.photo is not None:
        positive = id_tokens(parts, record, use.digest, lambda: pulid_photo.encoder_inputs(parts, record, use.photo))
        patches = record["photo"]["eva"]["patches"]
    else:
        positive = id_tokens(parts, record, use.digest, lambda: (use.id_cond, use.hidden))
        patches = use.hidden.shape[1]
    zeros, (ortho, ortho_v2) = use.zero_tokens, MODES[use.mode]

    def rows(t):  # one image's keys: the tokens, then the mode's zero rows (PuLID's NUM_ZERO)
        return torch.cat([t, t.new_zeros(zeros, t.shape[-1])])[None].repeat(job.count, 1, 1)

    tokens = rows(positive)
    if prep.guidance.enabled:
        negative = negative_tokens(parts, record, patches)  # tiled to the given tokens' length, as PuLID's app
        negative = negative.repeat(-(-len(positive) // len(negative)), 1)[:len(positive)]  # concatenates photos
        tokens = torch.cat([rows(negative), tokens])
    contributor = PulidContributor(tokens, use.scale, ortho, ortho_v2, use.start_step)
    return replace(prep, contributors=[*prep.contributors, contributor])
