"""PuLID at export (reference/identity.md §3): `sdrt export MODEL --pulid FILE`, FILE as guozinan/PuLID ships it:
`pulid_v1.bin` (v1) or `pulid_v1.1.safetensors` (v1.1), or either layout in the other container. `id_adapter.*` = the
ID encoder (v1: IDEncoder; v1.1: IDFormer, told apart by id_adapter.latents), `id_adapter_attn_layers.<i>.id_to_{k,v}.
weight` = the ID attention's key and value projections of the i-th of `unet.attn_processors` (attn2 only).

Two graphs:
- `pulid/encoder`: v1's IDEncoder (PuLID's encoders.py, re-stated with every width read from the file):
  id_cond [N, 1280] (raw insightface `embedding` 512 ‖ the L2-normalised EVA-CLIP image embedding 768) and
  id_vit_hidden [N, 5, S, W] (EVA-CLIP's hidden states entering blocks 4, 8, 12, 16, 20; S = 577, W = 1024 for
  EVA02-CLIP-L-14-336) → id_tokens [N, 10, D]: 5 from the body MLP on id_cond, one per hidden state (mapping_j of
  its class token + the mean of mapping_patch_j over its patches); or v1.1's IDFormer (encoders_transformer.py) on
  the same inputs → [N, 32, D]. The negative is this graph on all-zero inputs (PuLID's get_id_embedding), run once
  by the runtime;
- `unet_pulid`: the UNet with PuLID's ID attention in every attn2 (IDAttnProcessor2_0), taking id_tokens [B, T, D]
  (T dynamic: the ID tokens and the mode's zero rows, padded by the runtime), id_scale, id_ortho and id_ortho_v2
  (rank 0, fp32). With h the text attention (heads merged, before to_out) and o = attention(Q, id_to_k(E),
  id_to_v(E)): h + s·(o + c·p), p = (Σₙ h·o / Σₙ h·h)·h over the spatial tokens, c = −ortho + ortho_v2·(w − 1),
  w = Σ of the first 5 ID keys' softmax(Q·Kᵀ) (no 1/√d) averaged over heads; p = 0 where h ≡ 0 (a zeroed
  negative prompt: PuLID's own 0/0 gives NaN there; its app always passes a negative prompt). ortho = ortho_v2 = 0
  is PuLID's plain mode, (1, 0) its ORTHO ("extremely style"), (0, 1) its ORTHO_v2 ("fidelity"): one graph, exact
  for each.
SDXL only: PuLID's weights exist for SDXL's attention layout alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sdrt.runtime.errors import UserError

from sdrt.export.components import ComponentSpec, Shape, _unet_spec, has_timestep_cond, split_added_cond
from sdrt.export.extras import pulid_eva
from sdrt.export.load import sha256_of_files

ENCODER = "pulid/encoder"
UNET_PULID = "unet_pulid"
FACE_WIDTH, EVA_WIDTH = 512, 768  # id_cond = raw ArcFace embedding ‖ EVA-CLIP image embedding
BODY_TOKENS = 5  # the tokens of the body MLP, the ones ORTHO_v2's weight w sums over
ATTN_PREFIX, ENCODER_PREFIX = "id_adapter_attn_layers.", "id_adapter."
SAMPLE_PATCHES = 577  # EVA02-CLIP-L-14-336's tokens (336² / 14² + 1): the negative's shape when tokens are given


@dataclass(frozen=True, eq=False)
class PulidSource:
    given: str  # what --pulid named
    path: str
    state: dict  # its tensors, fp32, the layout checked (read)
    photo: pulid_eva.PhotoSource | None = None  # --pulid-eva and --pulid-parsing (export/extras/pulid_eva.py)


def parse(text: str | None, eva: str | None = None, parsing: str | None = None) -> PulidSource | None:
    """The file (and the photo path's two, where given) read and its layout checked, before the model loads; None
    without --pulid."""
    if text is None:
        if eva is not None or parsing is not None:
            raise UserError("--pulid-eva and --pulid-parsing add PuLID's photo path to its ID encoder: give --pulid "
                            "FILE too (or add them to an engine directory that has PuLID)")
        return None
    path = Path(text).expanduser().absolute()
    if not path.is_file():
        raise UserError(f"--pulid {text}: no such file (give guozinan/PuLID's pulid_v1.bin)")
    return PulidSource(text, str(path), read(text, str(path)), pulid_eva.parse(eva, parsing))


def check_model(family: str, src: PulidSource | None, pipe) -> None:
    if src is None:
        return
    if family != "sdxl":
        raise UserError(f"--pulid {src.given}: PuLID is SDXL-only (its ID attention has SDXL's 70 cross-attention "
                        f"layers); this model is {family}")
    if has_timestep_cond(pipe):
        raise UserError(f"--pulid {src.given}: this UNet is LCM-distilled (time_cond_proj_dim), which the PuLID graph "
                        "does not carry; use the base model (PuLID's own: SDXL base with SDXL-Lightning's UNet)")


def read(given: str, path: str) -> dict:
    """The file's tensors (fp32), its layout checked: v1's IDEncoder and id_to_k/id_to_v pairs."""
    what = f"--pulid {given}"
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/torch raise their own errors on damaged files
        raise UserError(f"{what}: cannot read it as a PyTorch .bin or a .safetensors file ({type(e).__name__}); "
                        "give guozinan/PuLID's pulid_v1.bin") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()) or \
            not any(str(k).startswith(ATTN_PREFIX) for k in state):
        raise UserError(f"{what}: not a PuLID SDXL file (no id_adapter_attn_layers.<i>.id_to_k/id_to_v weights; "
                        "PuLID-FLUX files are for FLUX.1); give guozinan/PuLID's pulid_v1.bin")
    first = f"{ENCODER_PREFIX}id_embedding_mapping.0.weight" if f"{ENCODER_PREFIX}latents" in state else \
        f"{ENCODER_PREFIX}body.0.weight"  # v1.1's IDFormer, or v1's IDEncoder
    if first not in state or f"{ENCODER_PREFIX}mapping_0.0.weight" not in state:
        raise UserError(f"{what}: no ID encoder (v1: id_adapter.body.*, v1.1: id_adapter.latents and "
                        "id_adapter.id_embedding_mapping.*, both with id_adapter.mapping_<j>.*); give guozinan/PuLID's "
                        "pulid_v1.bin or pulid_v1.1.safetensors")
    width = state[first].shape[1]
    if width != FACE_WIDTH + EVA_WIDTH:
        raise UserError(f"{what}: its ID encoder takes {width}-wide identity vectors; PuLID's takes "
                        f"{FACE_WIDTH + EVA_WIDTH} (ArcFace 512 ‖ EVA-CLIP 768)")
    return {k: v.float() for k, v in state.items()}


def _mlp(state: dict, prefix: str) -> torch.nn.Sequential:
    """Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear: the indices (0, 1, 3, 4, 6) of the file."""
    w0, w3, w6 = (state[f"{prefix}.{i}.weight"] for i in (0, 3, 6))
    seq = torch.nn.Sequential(torch.nn.Linear(w0.shape[1], w0.shape[0]), torch.nn.LayerNorm(w0.shape[0]),
                              torch.nn.LeakyReLU(), torch.nn.Linear(w3.shape[1], w3.shape[0]),
                              torch.nn.LayerNorm(w3.shape[0]), torch.nn.LeakyReLU(),
                              torch.nn.Linear(w6.shape[1], w6.shape[0]))
    seq.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
    return seq


class IdEncoder(torch.nn.Module):
    """PuLID v1's IDEncoder over (id_cond [N, 1280], id_vit_hidden [N, L, S, W]) → [N, 5 + L, D]."""

    def __init__(self, state: dict):
        super().__init__()
        enc = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        self.body = _mlp(enc, "body")
        layers = 0
        while f"mapping_{layers}.0.weight" in enc:
            layers += 1
        self.mapping = torch.nn.ModuleList(_mlp(enc, f"mapping_{j}") for j in range(layers))
        self.mapping_patch = torch.nn.ModuleList(_mlp(enc, f"mapping_patch_{j}") for j in range(layers))
        self.context_dim = self.mapping[0][6].out_features
        self.hidden_width = self.mapping[0][0].in_features
        self.tokens = self.body[6].out_features // self.context_dim
        self.out_tokens = self.tokens + layers

    def forward(self, id_cond, id_vit_hidden):
        x = self.body(id_cond).reshape(id_cond.shape[0], self.tokens, self.context_dim)
        per_layer = [cls(id_vit_hidden[:, j, :1]) + patch(id_vit_hidden[:, j, 1:]).mean(dim=1, keepdim=True)
                     for j, (cls, patch) in enumerate(zip(self.mapping, self.mapping_patch))]
        return torch.cat([x, *per_layer], dim=1)


class _PerceiverAttention(torch.nn.Module):
    """IDFormer's PerceiverAttention: q from LN(latents), k/v from LN(ctx) ‖ LN(latents), PuLID's split scaling."""

    def __init__(self, dim: int, inner: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = inner // dim_head, dim_head
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, inner, bias=False)
        self.to_kv = torch.nn.Linear(dim, inner * 2, bias=False)
        self.to_out = torch.nn.Linear(inner, dim, bias=False)

    def forward(self, ctx, latents):
        b, n, _ = latents.shape
        ctx, latents = self.norm1(ctx), self.norm2(latents)
        k, v = self.to_kv(torch.cat([ctx, latents], dim=-2)).chunk(2, dim=-1)

        def heads(x):
            return x.view(b, x.shape[1], self.heads, -1).transpose(1, 2)

        scale = 1 / self.dim_head ** 0.25
        weight = ((heads(self.to_q(latents)) * scale) @ (heads(k) * scale).transpose(-2, -1)).float().softmax(dim=-1)
        return self.to_out((weight.to(v.dtype) @ heads(v)).permute(0, 2, 1, 3).reshape(b, n, -1))


class IdFormer(torch.nn.Module):
    """PuLID v1.1's IDFormer over (id_cond [N, 1280], id_vit_hidden [N, L, S, W]) → [N, queries, D], one photo per
    row: latents = the learned queries ‖ 5 ID tokens from id_embedding_mapping; per EVA layer j, depth/L perceiver
    layers over ctx = [ID tokens ‖ mapping_j(hidden_j)] with feed-forwards; the queries' rows @ proj_out. Heads of 64
    (PuLID's dim_head); every width read from the file."""

    def __init__(self, state: dict, dim_head: int = 64):
        super().__init__()
        enc = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        self.latents = torch.nn.Parameter(enc["latents"].clone())
        self.proj_out = torch.nn.Parameter(enc["proj_out"].clone())
        dim = self.latents.shape[-1]
        layers = 0
        while f"mapping_{layers}.0.weight" in enc:
            layers += 1
        self.mapping = torch.nn.ModuleList(_mlp(enc, f"mapping_{j}") for j in range(layers))
        self.id_embedding_mapping = _mlp(enc, "id_embedding_mapping")
        depth = 0
        while f"layers.{depth}.0.to_q.weight" in enc:
            depth += 1
        self.layers = torch.nn.ModuleList()
        for n in range(depth):
            inner, ff = enc[f"layers.{n}.0.to_q.weight"].shape[0], enc[f"layers.{n}.1.1.weight"].shape[0]
            self.layers.append(torch.nn.ModuleList([
                _PerceiverAttention(dim, inner, dim_head),
                torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, ff, bias=False), torch.nn.GELU(),
                                    torch.nn.Linear(ff, dim, bias=False))]))
        self.layers.load_state_dict({k[len("layers."):]: v for k, v in enc.items() if k.startswith("layers.")})
        self.per_scale = depth // layers
        self.dim, self.queries = dim, self.latents.shape[1]
        self.id_tokens = self.id_embedding_mapping[6].out_features // dim
        self.context_dim, self.hidden_width, self.out_tokens = self.proj_out.shape[1], self.mapping[0][0].in_features, \
            self.queries

    def forward(self, id_cond, id_vit_hidden):
        ids = self.id_embedding_mapping(id_cond).reshape(id_cond.shape[0], self.id_tokens, self.dim)
        latents = torch.cat([self.latents.expand(id_cond.shape[0], -1, -1), ids], dim=1)
        for j, mapping in enumerate(self.mapping):
            ctx = torch.cat([ids, mapping(id_vit_hidden[:, j])], dim=1)
            for attn, ff in self.layers[j * self.per_scale:(j + 1) * self.per_scale]:
                latents = attn(ctx, latents) + latents
                latents = ff(latents) + latents
        return latents[:, :self.queries] @ self.proj_out


class IdAttnProcessor(torch.nn.Module):
    """diffusers' AttnProcessor2_0 with PuLID's ID attention added before to_out (IDAttnProcessor2_0, every mode at
    once: the module docstring). The wrapper sets `tokens`, `scale`, `ortho`, `ortho_v2` for each call."""

    def __init__(self, to_k: torch.Tensor, to_v: torch.Tensor):
        super().__init__()
        self.id_to_k = torch.nn.Linear(to_k.shape[1], to_k.shape[0], bias=False)
        self.id_to_v = torch.nn.Linear(to_v.shape[1], to_v.shape[0], bias=False)
        with torch.no_grad():
            self.id_to_k.weight.copy_(to_k)
            self.id_to_v.weight.copy_(to_v)
        self.tokens = self.scale = self.ortho = self.ortho_v2 = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        b = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        def merge(x):
            return x.transpose(1, 2).reshape(b, -1, x.shape[1] * x.shape[-1])

        q = split(query)
        h = merge(F.scaled_dot_product_attention(q, split(attn.to_k(context)), split(attn.to_v(context))))
        if self.tokens is not None:
            id_k, id_v = split(self.id_to_k(self.tokens).to(q.dtype)), split(self.id_to_v(self.tokens).to(q.dtype))
            o = merge(F.scaled_dot_product_attention(q, id_k, id_v)).float()
            h32 = h.float()
            w = (q.float() @ id_k.float().transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
            w = w[:, :, :BODY_TOKENS].sum(dim=-1, keepdim=True)
            norm = (h32 * h32).sum(dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            p = (h32 * o).sum(dim=-2, keepdim=True) / norm * h32  # h ≡ 0 (zero text context): p = 0, not NaN
            c = -self.ortho + self.ortho_v2 * (w - 1)
            h = (h32 + self.scale * (o + c * p)).to(h.dtype)
        out = attn.to_out[1](attn.to_out[0](h))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@dataclass
class IdUnet:
    """The pipeline's own UNet and PuLID's processors, swapped onto its attn2 layers only while `unet_pulid` is traced
    or run (no second copy of the UNet's weights: a full-size SDXL UNet is 10 GB in fp32)."""
    unet: torch.nn.Module
    processors: dict  # attention processor name → IdAttnProcessor (the attn2 layers)

    @property
    def config(self):
        return self.unet.config

    @contextlib.contextmanager
    def swapped(self):
        original = dict(self.unet.attn_processors)
        dtype = next(self.unet.parameters()).dtype
        self.unet.set_attn_processor({**original, **{n: p.to(dtype) for n, p in self.processors.items()}})
        try:
            yield self.unet
        finally:
            self.unet.set_attn_processor(original)


def id_unet(pipe, state: dict, given: str) -> IdUnet:
    """The pipeline's UNet with an IdAttnProcessor for every attn2, its projections from the file."""
    unet = pipe.unet
    procs = dict(unet.attn_processors)
    wanted = {i for i, name in enumerate(procs) if name.endswith("attn2.processor")}
    found = {int(k[len(ATTN_PREFIX):].split(".")[0]) for k in state if k.startswith(ATTN_PREFIX)}
    if found != wanted:
        raise UserError(f"--pulid {given}: ID attention for {len(found)} layers; this UNet has {len(wanted)} "
                        "cross-attention layers (PuLID's weights are for SDXL's)")
    ids = {}
    for i, name in enumerate(procs):
        if i in wanted:
            to_k, to_v = state[f"{ATTN_PREFIX}{i}.id_to_k.weight"], state[f"{ATTN_PREFIX}{i}.id_to_v.weight"]
            attn = unet.get_submodule(name.removesuffix(".processor"))
            if to_k.shape != attn.to_k.weight.shape or to_v.shape != attn.to_v.weight.shape:
                raise UserError(f"--pulid {given}: layer {i}'s id_to_k is {list(to_k.shape)}, this UNet's to_k "
                                f"{list(attn.to_k.weight.shape)}: the file is for another model")
            ids[name] = IdAttnProcessor(to_k, to_v).eval().requires_grad_(False)  # traced as constants
            ids[name].lora_target = False  # the adapter's own layers: no LoRA patches them (export/weights_map)
    return IdUnet(unet, ids)


class _UNetPulid(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids], id_tokens, id_scale, id_ortho,
    id_ortho_v2) → out_sample."""

    def __init__(self, id_unet: IdUnet, added: bool):
        super().__init__()
        self.id_unet, self.added = id_unet, added
        self.unet = id_unet.unet  # registered: the traced graph's weights are the UNet's (and, swapped in, PuLID's)

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added, (tokens, scale, ortho, ortho_v2) = split_added_cond(rest, self.added)
        with self.id_unet.swapped() as unet:
            procs = list(self.id_unet.processors.values())
            for p in procs:
                p.tokens, p.scale, p.ortho, p.ortho_v2 = tokens, scale, ortho, ortho_v2
            try:
                return unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
            finally:
                for p in procs:
                    p.tokens = p.scale = p.ortho = p.ortho_v2 = None


def unet_spec(pipe, unet, context_dim: int) -> ComponentSpec:
    added = unet.config.addition_embed_type == "text_time"
    base = _unet_spec(added)
    scalars = ("id_scale", "id_ortho", "id_ortho_v2")

    def make_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch * 29 + shape.latent_height)
        tokens = torch.randn(shape.batch, 18, context_dim, generator=g).to(dtype)  # 10 ID tokens + 8 zero rows
        tokens[:, 10:] = 0
        return base.make_inputs(p, shape, dtype) + (tokens, torch.tensor(0.8), torch.tensor(0.5), torch.tensor(0.5))

    axes = base.dynamic_axes | {"id_tokens": {0: "batch_size", 1: "id_tokens"}}
    return ComponentSpec(UNET_PULID, base.input_names + ("id_tokens",) + scalars, base.output_names, axes,
                         lambda p: _UNetPulid(unet, added), make_inputs, ("timestep", *scalars), owner=lambda p: unet.unet)


def encoder_spec(encoder: IdEncoder) -> ComponentSpec:
    def make_inputs(p, shape: Shape, dtype):
        g = torch.Generator().manual_seed(shape.batch * 7 + 3)
        layers, width = len(encoder.mapping), encoder.hidden_width
        return (torch.randn(shape.batch, FACE_WIDTH + EVA_WIDTH, generator=g).to(dtype),
                torch.randn(shape.batch, layers, 17, width, generator=g).to(dtype))

    axes = {"id_cond": {0: "batch_size"}, "id_vit_hidden": {0: "batch_size", 2: "patches"},
            "id_tokens": {0: "batch_size"}}
    return ComponentSpec(ENCODER, ("id_cond", "id_vit_hidden"), ("id_tokens",), axes, lambda p: encoder, make_inputs,
                         owner=lambda p: encoder)


def load(pipe, src: PulidSource) -> dict:
    """{"encoder": IdEncoder or IdFormer, "unet": the ID UNet, "record": the manifest's `pulid` entry}."""
    state = src.state
    v11 = f"{ENCODER_PREFIX}latents" in state
    encoder = (IdFormer if v11 else IdEncoder)(state).eval()
    cross = pipe.unet.config.cross_attention_dim
    if encoder.context_dim != cross:
        raise UserError(f"--pulid {src.given}: its ID tokens are {encoder.context_dim} wide; this UNet's "
                        f"cross-attention takes {cross}")
    unet = id_unet(pipe, state, src.given)
    path = Path(src.path)
    record = {"source": src.path, "sha256": sha256_of_files([path], path.parent), "version": "v1.1" if v11 else "v1",
              "encoder": ENCODER, "unet": UNET_PULID, "face_dim": FACE_WIDTH, "eva_dim": EVA_WIDTH,
              "eva_layers": len(encoder.mapping), "eva_width": encoder.hidden_width, "eva_patches": SAMPLE_PATCHES,
              "tokens": encoder.out_tokens, "token_dim": encoder.context_dim}
    photo = pulid_eva.load(src.photo, record) if src.photo is not None else None
    if photo is not None:
        record["photo"] = photo["record"]  # the graphs a photo runs through (runtime/conditioning/pulid_photo.py)
    return {"encoder": encoder, "unet": unet, "record": record, "photo": photo}


def specs(pipe, loaded: dict) -> dict:
    """{component: (spec, config.json content, key digest)} for the encoder and unet_pulid (and the photo path's
    pulid/eva and pulid/parsing)."""
    record, key = loaded["record"], "|pulid:" + loaded["record"]["sha256"]
    config = {k: record[k] for k in ("face_dim", "eva_dim", "eva_layers", "eva_width", "tokens", "token_dim")}
    photo = pulid_eva.specs(loaded["photo"]) if loaded.get("photo") is not None else {}
    return {ENCODER: (encoder_spec(loaded["encoder"]), config, key),
            UNET_PULID: (unet_spec(pipe, loaded["unet"], record["token_dim"]), dict(pipe.unet.config), key), **photo}

