"""PhotoMaker v1 and v2 at run time (reference/identity.md §2): the identity of one person's photo(s) stacked into
the prompt's class word. Engines (export/extras/photomaker.py): `photomaker/id_encoder` (photos → ID embeddings),
`photomaker/fuse` (class rows ‖ ID rows → fused rows), and PhotoMaker's UNet LoRA applied at load to these requests.

Reproduces PhotoMakerStableDiffusionXLPipeline (PhotoMaker@6ec44fc, the PyPI package photomakerv 0.1.0):
- the photos, in order, through CLIPImageProcessor()'s defaults (whole photo: no face crop) and the ID encoder →
  [N, D] (v2: with each photo's raw ArcFace embedding, given or read with insightface's models (faces.py) → [T·N, D],
  the T = 2 rows of each photo in turn); cached per
  identity (the photos' bytes, v2's embeddings) so a second request with the same photos skips the encoder;
- the prompt (one per request; plain text: PhotoMaker's pipeline reads no weights syntax) must hold the trigger word
  once, right after the class word: per tokenizer the class token repeated K = N (v2: T·N) times in its place
  (runtime/prompts/trigger.py), both encoders' penultimate states side by side, the second's pooled output; the
  K class rows through the fuse with the K ID rows, in photo order, written back;
- steps i ≤ start_merge_step (int(style strength / 100 · steps), at most 30, as the authors' demo) see the prompt
  without the trigger (its ids decoded and encoded again, plain SDXL) and its pooled output; later steps the fused
  prompt and the class-repeated prompt's pooled output. The negative half is the request's negative prompt as
  always (zeros when empty on SDXL);
- the UNet: the plain graph (or the other kinds' graph) with PhotoMaker's LoRA at scale 1 on top of the request's.
The step index is sdrt's step (a second-order sampler's two evaluations share one; diffusers' loop counts both).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from sdrt.runtime import fields
from sdrt.runtime.conditioning.cache import LruCache, graph_key
from sdrt.runtime.conditioning import faces as faces_mod
from sdrt.runtime.conditioning.graphs import GRAPHS, PHOTOMAKER
from sdrt.runtime.conditioning.image_processors import ClipInput, read_config
from sdrt.runtime.denoiser import feed as feed_mod
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.lora.files import LoraError
from sdrt.runtime.prompts import trigger as trigger_mod
from sdrt.runtime.prompts.text_conditioning import Conditioning

NAME, FIELD = PHOTOMAKER, "photomaker"
TRIGGER, STYLE_STRENGTH, MAX_MERGE_STEP = "img", 20.0, 30  # the authors' demo (gradio_demo/app.py)
MAX_PHOTOS = 16
CACHE_SIZE = 32  # identities whose ID embeddings stay cached


@dataclass(frozen=True, eq=False)
class PhotoMakerUse:
    photos: tuple[Image.Image, ...]  # RGB, in order
    trigger: str
    start_merge_step: int
    prompt: str  # without <lora:…> tags
    loras: tuple  # PhotoMaker's LoRA (runtime/lora/files.LoraRef): runtime/validate.py adds it to the job's
    identity: str  # sha256 over the photos' pixels (and v2's face embeddings)
    faces: np.ndarray | None = None  # v2: each photo's raw ArcFace embedding [N, 512], float32
    rows: int = 0  # the class rows K: N (v1) or T·N (v2)

    def key(self) -> tuple:
        return (self.identity, self.trigger, self.start_merge_step, self.prompt)


def _photos(given) -> tuple[Image.Image, ...]:
    items = list(given) if isinstance(given, (list, tuple)) else [given]
    if not items:
        raise InvalidRequest("photomaker_images", "give one or more photos of the person")
    if len(items) > MAX_PHOTOS:
        raise InvalidRequest("photomaker_images", f"at most {MAX_PHOTOS} photos (got {len(items)})")
    return tuple(fields.image("photomaker_images", x, "RGB") for x in items)


def _identity(photos, faces) -> str:
    h = hashlib.sha256()
    for p in photos:
        h.update(f"{p.size}".encode())
        h.update(p.tobytes())
    if faces is not None:
        h.update(faces.tobytes())
    return h.hexdigest()


def _faces(given, record: dict, photos: tuple, models) -> np.ndarray | None:
    """v2's ArcFace embeddings, one per photo, checked, or read from the photos with the insightface models in
    `models` (faces.py: PhotoMaker v2's detection retries and faces[0]); v1 takes none."""
    count = len(photos)
    if record.get("version", "v1") != "v2":
        if given is not None:
            raise InvalidRequest("photomaker_faces", "this engine directory's PhotoMaker is v1, which takes no face "
                                                     "embeddings (v2 does); leave it out")
        return None
    width = record["face_width"]
    if given is None and models is not None:
        given = np.stack([faces_mod.read(models, p, faces_mod.PHOTOMAKER, f"photomaker_images[{i}]").embedding
                          for i, p in enumerate(photos)])
    if given is None:
        raise InvalidRequest("photomaker_faces", f"is required by PhotoMaker v2: each photo's raw insightface "
                                                 f"`embedding` (not normed_embedding), [{count}, {width}] numbers, or "
                                                 f"face_models (--face-models DIR) to read them from the photos")
    try:
        faces = np.array(given.detach().cpu() if isinstance(given, torch.Tensor) else given, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidRequest("photomaker_faces", f"must be numbers of shape [{count}, {width}]") from None
    faces = faces.reshape(1, -1) if faces.ndim == 1 else faces
    if faces.shape != (count, width):
        raise InvalidRequest("photomaker_faces", f"must be one embedding per photo: [{count}, {width}] (got "
                                                 f"{list(faces.shape)})")
    if not np.isfinite(faces).all():
        raise InvalidRequest("photomaker_faces", "must be finite numbers")
    return faces


def validate(request, model_dir, context) -> PhotoMakerUse | None:
    """The request's PhotoMaker group checked against the directory's PhotoMaker export; None without photos."""
    from sdrt.runtime.lora.refs import resolve
    from sdrt.runtime.lora.weights import model_for
    from sdrt.runtime.prompts.tags import strip_lora_tags

    group = request.photomaker
    if group.photomaker_images is None:
        if group.photomaker_faces is not None:
            raise InvalidRequest("photomaker_images", "is required with photomaker_faces: the photos whose ArcFace "
                                                      "embeddings they are")
        return None
    record = (model_dir.manifest or {}).get("photomaker")
    if not record:
        raise InvalidRequest("photomaker_images", "this engine directory has no PhotoMaker (export one with "
                                                  "--photomaker photomaker-v1.bin; SDXL only)")
    photos = _photos(group.photomaker_images)
    faces = _faces(group.photomaker_faces, record, photos, request.adapters.face_models)
    rows = len(photos) * (record.get("tokens", 1) if faces is not None else 1)
    word = group.photomaker_trigger
    if not isinstance(word, str) or not word.strip() or word != word.strip() or " " in word:
        raise InvalidRequest("photomaker_trigger", f"must be one word without spaces (PhotoMaker's is {TRIGGER!r}), "
                                                   f"not {word!r}")
    strength = fields.number("photomaker_style_strength", group.photomaker_style_strength, 0.0, 100.0)
    prompts = fields.texts("prompt", request.prompt_group.text)
    if len(prompts) != 1:
        raise InvalidRequest("prompt", f"PhotoMaker takes one prompt per request (got {len(prompts)}); ask for "
                                       "several images of it with batch")
    prompt = strip_lora_tags(prompts[0])[0]
    for name in ("tokenizer", "tokenizer_2"):
        try:
            trigger_mod.class_rows(_tokenizer(model_dir, name), prompt, word, rows)
        except trigger_mod.TriggerError as e:
            raise InvalidRequest("prompt", str(e)) from None
    negative = request.prompt_group.negative
    for text in ([negative] if isinstance(negative, str) else list(negative or ())):
        if isinstance(text, str) and len(_tokenizer(model_dir, "tokenizer").tokens(text)) > 75:
            raise InvalidRequest("negative_prompt", "with PhotoMaker at most 75 tokens (one CLIP chunk, as its "
                                                    "pipeline encodes it)")
    graph = next((g for g in GRAPHS if g.kinds == frozenset(context.earlier)), None)
    if graph is not None and not graph.lora:
        raise InvalidRequest("photomaker_images", f"PhotoMaker's LoRA cannot reach {graph.name} (it has no weights "
                                                  f"map); use PhotoMaker without {', '.join(context.earlier)}")
    for component in (record["id_encoder"], record["fuse"]):
        if not model_dir.has(component):
            raise InvalidRequest("photomaker_images", f"this engine directory has no {component} graph; export it "
                                                      "again with --photomaker")
    try:
        loras = resolve([(str(model_dir.path / record["lora"]), 1.0)], model_for(model_dir), None)
    except LoraError as e:
        raise InvalidRequest("photomaker_images", f"PhotoMaker's LoRA cannot be applied: {e}") from None
    steps = int(request.sampling.steps)  # already checked by runtime/validate.py
    merge = min(int(strength / 100 * steps), MAX_MERGE_STEP)
    return PhotoMakerUse(photos, word, merge, prompt, loras, _identity(photos, faces), faces, rows)


def _tokenizer(model_dir, name: str):
    from sdrt.runtime.prompts.tokenizer import ClipTokenizer

    return _TOKENIZERS.get(model_dir.path / name, ClipTokenizer.from_folder)


class _Memo:
    def __init__(self):
        self.entries, self.lock = {}, threading.Lock()

    def get(self, key, make):
        with self.lock:
            if key not in self.entries:
                self.entries[key] = make(key)
            return self.entries[key]


_TOKENIZERS = _Memo()


CACHE = LruCache(CACHE_SIZE)  # ID-encoder outputs [K, D] per (directory, encoder file, the photos)


def encode_identity(parts, record: dict, use: PhotoMakerUse) -> torch.Tensor:
    """The ID encoder's embeddings [K, D] of one identity's photos (v2: and faces), cached."""
    def run():
        clip = ClipInput.of_config(read_config(parts.dir.path / record["processor"]))
        pixels = torch.cat([clip.tensor(p) for p in use.photos])
        extra = {} if use.faces is None else {"face_embeds": torch.from_numpy(use.faces)}
        embeds = feed_mod.run(parts.component(record["id_encoder"]), id_pixel_values=pixels, **extra)["id_embeds"]
        return embeds.reshape(-1, embeds.shape[-1])  # v2: [N, T, D] → the T rows of each photo in turn
    return CACHE.get(graph_key(parts, record["id_encoder"]) + (use.identity,), run)


def _encode(engines, ids: list) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text states for one id row per encoder: both penultimate states side by side [1, 77, D], and the
    second encoder's pooled output [1, P]."""
    states, pooled = [], None
    for engine, row in zip(engines, ids):
        out = feed_mod.run(engine, input_ids=torch.from_numpy(row))
        layers = max(int(n.split(".")[1]) for n in out if n.startswith("hidden_states."))
        states.append(out[f"hidden_states.{layers - 1}"])
        pooled = out.get("text_embeds", out.get("pooler_output"))
    return torch.cat(states, dim=-1), pooled


@dataclass(frozen=True)
class PhotoMakerContributor:
    """After the merge step, the prompt half of encoder_hidden_states and text_embeds becomes the fused prompt's."""
    embeds: torch.Tensor  # [B, 77, D]
    pooled: torch.Tensor  # [B, P]
    start_merge_step: int

    def contribute(self, feed, step):
        if step.index <= self.start_merge_step:
            return feed
        b = self.embeds.shape[0]
        return feed | {"encoder_hidden_states": torch.cat([feed["encoder_hidden_states"][:-b], self.embeds]),
                       "text_embeds": torch.cat([feed["text_embeds"][:-b], self.pooled])}


def attach(parts, job, prep):
    """`prep` with its prompt half text-only and a PhotoMakerContributor added; unchanged without PhotoMaker."""
    use = job.photomaker
    if use is None:
        return prep
    record = parts.dir.manifest["photomaker"]
    names = ("text_encoder", "text_encoder_2")
    tokenizers = [parts.tokenizers[n] for n in names]
    engines = [parts.engine(n, job) for n in names]
    id_embeds = encode_identity(parts, record, use)
    rows = [trigger_mod.class_rows(t, use.prompt, use.trigger, use.rows) for t in tokenizers]
    embeds, pooled = _encode(engines, [r.ids for r in rows])
    mask = torch.from_numpy(rows[-1].mask)  # the pipeline keeps the last tokenizer's mask
    fused = feed_mod.run(parts.component(record["fuse"]), class_embeds=embeds[0, mask],
                         id_embeds=id_embeds)["fused_embeds"]
    embeds = embeds.clone()
    embeds[0, mask] = fused.to(embeds.dtype)
    text = trigger_mod.text_only(tokenizers[0], use.prompt, use.trigger)
    plain, plain_pooled = _encode(engines, [t.encode([text])[0] for t in tokenizers])
    n, cond = job.count, prep.cond
    keep = cond.embeds.shape[0] - n  # the negative half with guidance, else nothing
    cond = Conditioning(torch.cat([cond.embeds[:keep], plain.repeat(n, 1, 1)]),
                        torch.cat([cond.pooled[:keep], plain_pooled.repeat(n, 1)]), cond.time_ids)
    contributor = PhotoMakerContributor(embeds.repeat(n, 1, 1), pooled.repeat(n, 1), use.start_merge_step)
    return replace(prep, cond=cond, contributors=[*prep.contributors, contributor])
