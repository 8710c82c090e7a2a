"""PuLID v1 (reference/identity.md §3): the ID encoder and unet_pulid exported into the tiny SDXL's engine directory
(export/extras/pulid.py), equal to PuLID's algorithm re-stated here over diffusers — its IDEncoder (encoders.py) and
its IDAttnProcessor2_0 / AttnProcessor2_0 (attention_processor.py, each mode's NUM_ZERO / ORTHO / ORTHO_v2) set on a
diffusers StableDiffusionXLPipeline as PuLID's hack_unet_attn_layers does, weights loaded from the file as its
load_pretrain does, fed [uncond ‖ cond] ID tokens through cross_attention_kwargs — and the bad inputs.

Tiny config: the IDEncoder takes PuLID's 1280-wide id_cond (ArcFace 512 ‖ EVA 768) but 32-wide EVA hidden states of
17 tokens through 48-wide mappings, into the tiny UNet's 64-wide context."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_sdrt
from test_parity import assert_same_images, diffusers_scheduler, generators, to_uint8

from sdrt.runtime.errors import UserError
from sdrt.runtime.fields import InvalidRequest

SIZE = dict(width=48, height=32)
EVA_WIDTH, MAPPING_WIDTH, PATCHES = 32, 48, 17
PRESET = dict(sampler="dpmpp_2m", timestep_spacing="trailing", steps=4, guidance=1.2)  # pulid-lightning
PROMPTS = dict(prompt="a photo of a person", negative_prompt="flaws in the eyes, lowres")  # PuLID's app: always one


# ---- PuLID re-stated (widths as parameters) ----

class RefIDEncoder(torch.nn.Module):
    """PuLID's IDEncoder (encoders.py): body MLP → num_token tokens; per EVA layer i, mapping_i(CLS) + mean of
    mapping_patch_i(patches); the 1024-wide mappings made `mapping_width`, their input `eva_width`."""

    def __init__(self, width=1280, context_dim=64, num_token=5, eva_width=EVA_WIDTH, mapping_width=MAPPING_WIDTH):
        super().__init__()
        self.num_token, self.context_dim = num_token, context_dim
        h1, h2 = min(context_dim * num_token // 4, 1024), min(context_dim * num_token // 2, 1024)
        nn = torch.nn
        self.body = nn.Sequential(nn.Linear(width, h1), nn.LayerNorm(h1), nn.LeakyReLU(), nn.Linear(h1, h2),
                                  nn.LayerNorm(h2), nn.LeakyReLU(), nn.Linear(h2, context_dim * num_token))
        for i in range(5):
            for name in (f"mapping_{i}", f"mapping_patch_{i}"):
                setattr(self, name, nn.Sequential(
                    nn.Linear(eva_width, mapping_width), nn.LayerNorm(mapping_width), nn.LeakyReLU(),
                    nn.Linear(mapping_width, mapping_width), nn.LayerNorm(mapping_width), nn.LeakyReLU(),
                    nn.Linear(mapping_width, context_dim)))

    def forward(self, x, y):
        x = self.body(x).reshape(-1, self.num_token, self.context_dim)
        per_layer = [getattr(self, f"mapping_{i}")(emb[:, :1])
                     + getattr(self, f"mapping_patch_{i}")(emb[:, 1:]).mean(dim=1, keepdim=True)
                     for i, emb in enumerate(y)]
        return torch.cat([x, *per_layer], dim=1)


def _feed_forward(dim, mult=4):
    return torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim * mult, bias=False), torch.nn.GELU(),
                               torch.nn.Linear(dim * mult, dim, bias=False))


class RefPerceiverAttention(torch.nn.Module):
    """PuLID's PerceiverAttention (encoders_transformer.py)."""

    def __init__(self, dim, dim_head=64, heads=8):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, inner, bias=False)
        self.to_kv = torch.nn.Linear(dim, inner * 2, bias=False)
        self.to_out = torch.nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        b, seq_len, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)

        def reshape(t):
            bs, length, _ = t.shape
            return t.view(bs, length, self.heads, -1).transpose(1, 2).reshape(bs, self.heads, length, -1)

        q, k, v = reshape(q), reshape(k), reshape(v)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return self.to_out((weight @ v).permute(0, 2, 1, 3).reshape(b, seq_len, -1))


class RefIDFormer(torch.nn.Module):
    """PuLID v1.1's IDFormer (encoders_transformer.py), its hard-coded 1024-wide mappings made `mapping_width` over
    `eva_width` inputs."""

    def __init__(self, dim=128, depth=10, dim_head=64, heads=2, num_id_token=5, num_queries=32, output_dim=64,
                 eva_width=EVA_WIDTH, mapping_width=MAPPING_WIDTH):
        super().__init__()
        nn = torch.nn
        self.num_id_token, self.dim, self.num_queries, self.depth = num_id_token, dim, num_queries, depth // 5
        scale = dim ** -0.5
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) * scale)
        self.proj_out = nn.Parameter(scale * torch.randn(dim, output_dim))
        self.layers = nn.ModuleList(nn.ModuleList([RefPerceiverAttention(dim, dim_head, heads), _feed_forward(dim)])
                                    for _ in range(depth))

        def mlp(width, out):
            return nn.Sequential(nn.Linear(width, mapping_width), nn.LayerNorm(mapping_width), nn.LeakyReLU(),
                                 nn.Linear(mapping_width, mapping_width), nn.LayerNorm(mapping_width),
                                 nn.LeakyReLU(), nn.Linear(mapping_width, out))

        for i in range(5):
            setattr(self, f"mapping_{i}", mlp(eva_width, dim))
        self.id_embedding_mapping = mlp(1280, dim * num_id_token)

    def forward(self, x, y):
        latents = self.latents.repeat(x.size(0), 1, 1)
        num_duotu = x.shape[1] if x.ndim == 3 else 1
        x = self.id_embedding_mapping(x).reshape(-1, self.num_id_token * num_duotu, self.dim)
        latents = torch.cat((latents, x), dim=1)
        for i in range(5):
            ctx = torch.cat((x, getattr(self, f"mapping_{i}")(y[i])), dim=1)
            for attn, ff in self.layers[i * self.depth:(i + 1) * self.depth]:
                latents = attn(ctx, latents) + latents
                latents = ff(latents) + latents
        return latents[:, :self.num_queries] @ self.proj_out


def _sdpa_parts(attn, hidden_states, encoder_hidden_states):
    b = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    key, value = attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    q = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    k = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    v = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    h = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * head_dim)
    return q, h.to(q.dtype), head_dim


class RefAttnProcessor(torch.nn.Module):
    """PuLID's AttnProcessor2_0 (attn1): takes and ignores id_embedding / id_scale."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_embedding=None, id_scale=1.0):
        _, h, _ = _sdpa_parts(attn, hidden_states, encoder_hidden_states)
        return attn.to_out[1](attn.to_out[0](h)) / attn.rescale_output_factor


class RefIDAttnProcessor(torch.nn.Module):
    """PuLID's IDAttnProcessor2_0 with its module globals NUM_ZERO, ORTHO, ORTHO_v2 given per instance."""

    def __init__(self, hidden_size, cross_attention_dim, num_zero=0, ortho=False, ortho_v2=False):
        super().__init__()
        self.id_to_k = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.id_to_v = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.num_zero, self.ortho, self.ortho_v2 = num_zero, ortho, ortho_v2

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_embedding=None, id_scale=1.0):
        b = hidden_states.shape[0]
        query, h, head_dim = _sdpa_parts(attn, hidden_states, encoder_hidden_states)
        if id_embedding is not None:
            e = id_embedding
            if self.num_zero:
                e = torch.cat([e, torch.zeros(e.size(0), self.num_zero, e.size(-1), dtype=e.dtype)], dim=1)
            id_key = self.id_to_k(e).to(query.dtype).view(b, -1, attn.heads, head_dim).transpose(1, 2)
            id_value = self.id_to_v(e).to(query.dtype).view(b, -1, attn.heads, head_dim).transpose(1, 2)
            o = torch.nn.functional.scaled_dot_product_attention(query, id_key, id_value)
            o = o.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
            if not self.ortho and not self.ortho_v2:
                h = h + id_scale * o
            else:
                h32, o32 = h.float(), o.float()
                projection = (h32 * o32).sum(dim=-2, keepdim=True) / (h32 * h32).sum(dim=-2, keepdim=True) * h32
                if self.ortho_v2:
                    mean = (query @ id_key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
                    mean = mean[:, :, :5].sum(dim=-1, keepdim=True)
                    h = (h32 + id_scale * (o32 + (mean - 1) * projection)).to(h.dtype)
                else:
                    h = (h32 + id_scale * (o32 - projection)).to(h.dtype)
        return attn.to_out[1](attn.to_out[0](h)) / attn.rescale_output_factor


MODE_GLOBALS = {"fidelity": (8, False, True), "style": (16, True, False), "plain": (0, False, False)}  # app.py
V11_GLOBALS = {"fidelity": (20, False, True), "style": (20, True, False), "plain": (20, False, False)}  # app_v1_1.py


def hack_unet(unet, mode: str, version: str = "v1"):
    """PuLID's hack_unet_attn_layers: IDAttnProcessor on attn2, AttnProcessor on attn1; the ModuleList whose index
    is the file's <i>."""
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = RefAttnProcessor()
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape[0]
        procs[name] = RefIDAttnProcessor(hidden, unet.config.cross_attention_dim,
                                         *(V11_GLOBALS if version == "v1.1" else MODE_GLOBALS)[mode])
    unet.set_attn_processor(procs)
    return torch.nn.ModuleList(unet.attn_processors.values())


def write_tiny_pulid(model_folder, path, seed: int = 0, gain: float = 64.0, version: str = "v1"):
    """pulid_v1.bin (v1: RefIDEncoder, torch pickle) or pulid_v1.1.safetensors (v1.1: RefIDFormer) for the tiny SDXL:
    {id_adapter.*: the encoder, id_adapter_attn_layers.<i>.id_to_{k,v}.weight}, random weights, the ID value
    projections × gain (so that the identity shows)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_folder / "unet")
    torch.manual_seed(seed)
    cross = unet.config.cross_attention_dim
    encoder = RefIDFormer(output_dim=cross) if version == "v1.1" else RefIDEncoder(context_dim=cross)
    layers = hack_unet(unet, "plain")
    state = {f"id_adapter.{k}": v for k, v in encoder.state_dict().items()}
    for k, v in layers.state_dict().items():
        state[f"id_adapter_attn_layers.{k}"] = v * (gain if "id_to_v" in k else 1.0)
    if version == "v1.1":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def identity(seed: int) -> dict:
    """The ID encoder's inputs for one made-up face: raw ArcFace (not unit norm), EVA embedding, EVA hidden states."""
    g = np.random.default_rng(seed)
    return {"embedding": (g.standard_normal(512) * 4).astype(np.float32),
            "eva_embedding": g.standard_normal(768).astype(np.float32),
            "eva_hidden": g.standard_normal((5, PATCHES, EVA_WIDTH)).astype(np.float32)}


# ---- fixtures ----

@pytest.fixture(scope="module")
def pulid_file(tiny_pipeline, tmp_path_factory):
    return write_tiny_pulid(tiny_pipeline("sdxl"), tmp_path_factory.mktemp("pulid") / "pulid_v1.bin", seed=5)


@pytest.fixture(scope="module")
def pulid_engine(exported, pulid_file, tmp_path_factory):
    """(engine dir with PuLID added, Pipeline over it)."""
    from sdrt.export.exporter import add_controlnets
    from sdrt.runtime.pipeline import Pipeline

    engine = tmp_path_factory.mktemp("pulid-engine") / "engine"
    shutil.copytree(exported("sdxl", "fp32"), engine, copy_function=os.link)
    add_controlnets(engine, (), pulid=str(pulid_file))
    return engine, Pipeline.load(engine, backend="ort-cpu")


def reference(tiny_pipeline, pulid_file, mode: str, lora=None, version: str = "v1"):
    """diffusers' SDXL pipeline with PuLID's processors and weights (and a LoRA fused first, `lora` = (file,
    scale)); returns (run(inputs, batch, seed, scale), the ID encoder). v1.1: the app_v1_1 settings (20 zero tokens)
    over the same processors; its own k-diffusion loop is a sampler choice, not part of PuLID's algorithm here."""
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_pipeline("sdxl"))
    if lora is not None:
        pipe.load_lora_weights(str(lora[0]))
        pipe.fuse_lora(lora_scale=lora[1])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler(pipe, "dpmpp_2m", timestep_spacing="trailing")
    layers = hack_unet(pipe.unet, mode, version)
    if version == "v1.1":
        from safetensors.torch import load_file

        state = load_file(str(pulid_file))
    else:
        state = torch.load(pulid_file, weights_only=True)
    layers.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("id_adapter_attn")},
                           strict=False)
    cross = pipe.unet.config.cross_attention_dim
    encoder = RefIDFormer(output_dim=cross) if version == "v1.1" else RefIDEncoder(context_dim=cross)
    encoder.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("id_adapter.")})

    def run(given, batch, seed, scale=0.8):
        with torch.no_grad():  # get_id_embedding: [a ‖ v/|v|], hidden states; uncond = the encoder on zeros
            eva = torch.from_numpy(given["eva_embedding"])[None]
            cond = torch.cat([torch.from_numpy(given["embedding"])[None], eva / eva.norm(2, 1, True)], dim=-1)
            hidden = [torch.from_numpy(h)[None] for h in given["eva_hidden"]]
            tokens = encoder(cond, hidden)
            uncond = encoder(torch.zeros_like(cond), [torch.zeros_like(h) for h in hidden])
        # each image its own copy of [uncond ‖ cond] (PuLID's app runs one image per call)
        e = torch.cat([uncond.repeat(batch, 1, 1), tokens.repeat(batch, 1, 1)])
        return pipe(**PROMPTS, num_inference_steps=PRESET["steps"], guidance_scale=PRESET["guidance"],
                    num_images_per_prompt=batch, generator=generators(seed, batch), output_type="np",
                    cross_attention_kwargs={"id_embedding": e, "id_scale": scale}, **SIZE).images

    return run, encoder


# ---- default-run checks: refusals ----

def test_export_refusals(tiny_pipeline, tmp_path, pulid_file):
    from sdrt.export.exporter import ExportConfig, export

    model = str(tiny_pipeline("sdxl"))

    def refused(path, text):
        with pytest.raises(UserError, match=text) as e:
            export(ExportConfig(model=model, output=tmp_path / "out", pulid=str(path)))
        assert "\n" not in str(e.value)

    refused(tmp_path / "none.bin", "no such file")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    refused(tmp_path / "junk.bin", "cannot read")
    state = torch.load(pulid_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if k.startswith("id_adapter.")}, tmp_path / "encoder_only.bin")
    refused(tmp_path / "encoder_only.bin", "not a PuLID SDXL file")
    torch.save(state | {"id_adapter.latents": torch.zeros(1, 32, 1024)}, tmp_path / "v11.bin")  # no IDFormer
    refused(tmp_path / "v11.bin", "no ID encoder")
    wide = dict(state, **{"id_adapter.body.0.weight": torch.zeros(80, 1024)})
    torch.save(wide, tmp_path / "wide.bin")
    refused(tmp_path / "wide.bin", "1024-wide")
    with pytest.raises(UserError, match="SDXL-only"):
        export(ExportConfig(model=str(tiny_pipeline("sd15")), output=tmp_path / "sd15", pulid=str(pulid_file)))
    assert not (tmp_path / "out").exists() and not (tmp_path / "sd15").exists()


def test_cli_export_refusal_is_one_line(tiny_pipeline, tmp_path):
    (tmp_path / "junk.bin").write_text("{}")
    result = run_sdrt("export", str(tiny_pipeline("sdxl")), "--pulid", str(tmp_path / "junk.bin"), "-o",
                      str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--pulid" in lines[0] and "pulid_v1.bin" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


# ---- slow: export, parity, run-time checks ----

@pytest.mark.slow
def test_export_records_pulid_and_its_graphs(pulid_engine):
    engine, _ = pulid_engine
    manifest = json.loads((engine / "manifest.json").read_text())
    record = manifest["pulid"]
    assert (record["tokens"], record["token_dim"], record["eva_width"]) == (10, 64, EVA_WIDTH)
    components = manifest["components"]
    assert {"pulid/encoder", "unet_pulid"} <= set(components)
    ids = next(i for i in components["unet_pulid"]["inputs"] if i["name"] == "id_tokens")
    assert not isinstance(ids["shape"][1], int)  # ID tokens + the mode's zero rows: dynamic
    assert (engine / "unet_pulid" / "weights_map.json").is_file()  # LoRAs at load reach it
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(manifest, json.loads((Path(__file__).parents[1] / "export" / "manifest.schema.json").read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fidelity", "style", "plain"])
def test_pulid_equals_its_algorithm_over_diffusers(pulid_engine, pulid_file, tiny_pipeline, mode):
    from sdrt.runtime.conditioning import pulid
    from sdrt.runtime.pipeline import Request

    _, pipe = pulid_engine
    theirs, _ = reference(tiny_pipeline, pulid_file, mode)
    face, other = identity(1), identity({"fidelity": 2, "style": 12, "plain": 22}[mode])  # other: new to the cache
    common = dict(**PROMPTS, seed=4, batch=2, **PRESET, **SIZE)
    ours = pipe.generate(Request.of(**common, pulid_id=face, pulid_mode=mode))
    assert_same_images(f"pulid {mode}, batch 2, scale 0.8, DPM++ 2M trailing 4 steps CFG 1.2", ours,
                       theirs(face, 2, 4))
    misses = pulid.CACHE.misses
    again = pipe.generate(Request.of(**common, pulid_id=face, pulid_mode=mode))
    assert pulid.CACHE.misses == misses  # the same identity (and the negative): no encoder run
    assert np.array_equal(to_uint8(again), to_uint8(ours))
    plain = to_uint8(pipe.generate(Request.of(**common))).astype(int)
    changed = to_uint8(pipe.generate(Request.of(**common, pulid_id=other, pulid_mode=mode))).astype(int)
    assert pulid.CACHE.misses == misses + 1
    moved = (np.abs(to_uint8(ours).astype(int) - plain).max(), np.abs(to_uint8(ours).astype(int) - changed).max())
    print(f"pulid {mode}: moves pixels by {moved[0]}/255 against the plain run, {moved[1]}/255 against another face")
    assert moved[0] > 8 and moved[1] > 8  # PuLID shows, and so does the identity


@pytest.mark.slow
def test_pulid_tokens_scale_start_step_and_a_lora(pulid_engine, pulid_file, tiny_pipeline, tmp_path):
    """The ID tokens given directly (the encoder's output), another scale and a LoRA at load on top of unet_pulid
    (its deltas reach the graph through the UNet's weights map); a start step (scale 0 before it: the plain UNet)."""
    from test_lora import make_layers, write_diffusers

    from sdrt.runtime.pipeline import Request

    _, pipe = pulid_engine
    lora = write_diffusers(tmp_path / "lora.safetensors", make_layers(
        tiny_pipeline("sdxl"), {"unet": (4, 0.03), "text_encoder_2": (4, 0.1)}, seed=11))
    theirs, encoder = reference(tiny_pipeline, pulid_file, "fidelity", lora=(lora, 0.8))
    face = identity(3)
    with torch.no_grad():
        eva = torch.from_numpy(face["eva_embedding"])[None]
        cond = torch.cat([torch.from_numpy(face["embedding"])[None], eva / eva.norm(2, 1, True)], dim=-1)
        tokens = encoder(cond, [torch.from_numpy(h)[None] for h in face["eva_hidden"]])[0].numpy()
    common = dict(**PROMPTS, seed=7, batch=2, **PRESET, **SIZE)
    ours = pipe.generate(Request.of(**common, pulid_id=tokens, pulid_scale=1.5, loras=[(str(lora), 0.8)]))
    assert_same_images("pulid fidelity, ID tokens given, scale 1.5, a LoRA", ours, theirs(face, 2, 7, scale=1.5))
    without = pipe.generate(Request.of(**common, pulid_id=tokens, pulid_scale=1.5))
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(without).astype(int)).max() > 8  # the LoRA shows
    # a start step past the last step: exactly the image without PuLID; from step 2: between the two
    late = pipe.generate(Request.of(**common, pulid_id=tokens, pulid_start_step=4))
    assert np.array_equal(to_uint8(late), to_uint8(pipe.generate(Request.of(**common))))
    half = to_uint8(pipe.generate(Request.of(**common, pulid_id=tokens, pulid_start_step=2))).astype(int)
    assert np.abs(half - to_uint8(late).astype(int)).max() > 0


@pytest.mark.slow
def test_bad_pulid_requests(pulid_engine, exported):
    from sdrt.runtime.loader import open_dir
    from sdrt.runtime.pipeline import Request
    from sdrt.runtime.validate import validate

    engine = open_dir(pulid_engine[0])
    common = dict(prompt="a person", steps=2, **SIZE)
    face = identity(1)
    cases = [(dict(pulid_id=face | {"embedding": face["embedding"][:5]}), "pulid_id",
              r"embedding must have shape \[512\]"),
             (dict(pulid_id=face | {"eva_hidden": face["eva_hidden"][:3]}), "pulid_id", r"eva_hidden must have shape"),
             (dict(pulid_id={"embedding": face["embedding"]}), "pulid_id", "missing: eva_embedding, eva_hidden"),
             (dict(pulid_id=face | {"eva_embedding": np.zeros(768)}), "pulid_id", "all zeros"),
             (dict(pulid_id=np.zeros((10, 32))), "pulid_id", r"\[tokens, 64\]"),
             (dict(pulid_id=[[float("nan")] * 64]), "pulid_id", "finite"),
             (dict(pulid_id=face, pulid_mode="extreme"), "pulid_mode", "fidelity, style, plain"),
             (dict(pulid_id=face, pulid_scale="x"), "pulid_scale", "number"),
             (dict(pulid_id=face, pulid_start_step=-1), "pulid_start_step", "at least 0"),
             (dict(pulid_id=face, pulid_zero_tokens=-1), "pulid_zero_tokens", "at least 0")]
    for extra, field, text in cases:
        with pytest.raises(InvalidRequest, match=text) as e:
            validate(Request.of(**common, **extra), engine)
        assert e.value.field == field, extra
    with pytest.raises(InvalidRequest, match="no PuLID") as e:
        validate(Request.of(**common, pulid_id=face), open_dir(exported("sdxl", "fp32")))
    assert validate(Request.of(**common, pulid_id=face, pulid_mode="style"), engine).pulid.zero_tokens == 16  # v1's
    assert validate(Request.of(**common, pulid_id=face, pulid_zero_tokens=3), engine).pulid.zero_tokens == 3
    request = Request.of(**common, pulid_id=face)  # plain JSON both ways
    again = Request.from_dict(json.loads(json.dumps(request.to_dict(encode_images=True))))
    assert validate(again, engine).pulid.key() == validate(request, engine).pulid.key()


@pytest.mark.slow
def test_cli_pulid(pulid_engine, tmp_path):
    engine = pulid_engine[0]
    np.savez(tmp_path / "face.npz", **identity(1))
    result = run_sdrt("run", str(engine), "a person", "--preset", "pulid-lightning", "--width", "48", "--height",
                      "32", "--pulid-id", str(tmp_path / "face.npz"), "-o", str(tmp_path / "out.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.png").is_file()
    np.save(tmp_path / "bad.npy", np.zeros((10, 7), dtype=np.float32))
    result = run_sdrt("run", str(engine), "a person", "--steps", "1", "--width", "48", "--height", "32",
                      "--pulid-id", str(tmp_path / "bad.npy"), "-o", str(tmp_path / "bad.png"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--pulid-id" in lines[0] and "[tokens, 64]" in lines[0], result.stderr


@pytest.mark.slow
def test_pulid_over_openai_extra_body(pulid_engine):
    """The official openai SDK sends PuLID's fields in extra_body (the ID tokens as nested numbers): the Python
    API's image; 400 naming the field for bad tokens and a bad mode."""
    import base64
    import io

    from PIL import Image

    openai = pytest.importorskip("openai")
    from conftest import LoopbackServer

    from sdrt.runtime.pipeline import Request

    engine, pipe = pulid_engine
    tokens = np.random.default_rng(4).standard_normal((10, 64)).astype(np.float32)
    server = LoopbackServer(engine, pipe, model_name="tiny-sdxl")
    try:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        extra = {"steps": 4, "seed": 5, "guidance_scale": 1.2, "sampler": "dpmpp_2m",
                 "negative_prompt": PROMPTS["negative_prompt"], "pulid_id": tokens.tolist(), "pulid_scale": 1.2,
                 "pulid_mode": "style"}
        answer = sdk.images.generate(prompt=PROMPTS["prompt"], size="48x32", extra_body=extra)
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB"))
        want = pipe.generate(Request.of(**PROMPTS, steps=4, seed=5, guidance=1.2, sampler="dpmpp_2m", **SIZE,
                                        pulid_id=tokens, pulid_scale=1.2, pulid_mode="style"))
        assert np.array_equal(got, np.asarray(want[0]))
        for body, param in ((extra | {"pulid_id": [[1.0] * 7]}, "pulid_id"),
                            (extra | {"pulid_mode": "extreme"}, "pulid_mode")):
            with pytest.raises(openai.BadRequestError) as e:
                sdk.images.generate(prompt=PROMPTS["prompt"], size="48x32", extra_body=body)
            assert e.value.status_code == 400 and e.value.param == param, e.value.body
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pulid11(exported, tiny_pipeline, tmp_path_factory):
    """(engine dir with PuLID v1.1 added, its file, Pipeline over it)."""
    from sdrt.export.exporter import add_controlnets
    from sdrt.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("pulid11")
    path = write_tiny_pulid(tiny_pipeline("sdxl"), root / "pulid_v1.1.safetensors", seed=8, version="v1.1")
    engine = root / "engine"
    shutil.copytree(exported("sdxl", "fp32"), engine, copy_function=os.link)
    add_controlnets(engine, (), pulid=str(path))
    return engine, path, Pipeline.load(engine, backend="ort-cpu")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fidelity", "style"])
def test_pulid_v11_equals_its_algorithm_over_diffusers(pulid11, tiny_pipeline, mode):
    """v1.1's IDFormer (32 query tokens for any photo) and app_v1_1's 20 zero tokens; the negative = the IDFormer on
    zeros of the photo's shape (its output depends on the token count, unlike v1's)."""
    from sdrt.runtime.pipeline import Request

    engine, path, pipe = pulid11
    record = json.loads((engine / "manifest.json").read_text())["pulid"]
    assert (record["version"], record["tokens"]) == ("v1.1", 32)
    theirs, _ = reference(tiny_pipeline, path, mode, version="v1.1")
    face = identity(5)
    common = dict(**PROMPTS, seed=3, batch=2, **PRESET, **SIZE)
    ours = pipe.generate(Request.of(**common, pulid_id=face, pulid_mode=mode))
    assert_same_images(f"pulid v1.1 {mode}, batch 2, scale 0.8, 20 zero tokens", ours, theirs(face, 2, 3))
    plain = to_uint8(pipe.generate(Request.of(**common))).astype(int)
    moved = np.abs(to_uint8(ours).astype(int) - plain).max()
    print(f"pulid v1.1 {mode}: moves pixels by {moved}/255 against the plain run")
    assert moved > 8


# ---- sdrt bench --conditioning ----
def test_bench_reports_pulids_per_step_and_per_identity_cost(pulid_engine):
    """bench/conditioning.py times unet_pulid against the plain UNet (fidelity inputs, the guidance batch) and the ID
    encoder once per identity (batch 1), interleaved in one process."""
    from sdrt.bench import conditioning

    engine, _ = pulid_engine
    result = conditioning.measure(engine, resolution=32, calls=1, backend="ort-cpu")
    assert {"unet", "unet_pulid", "pulid/encoder"} <= set(result["median_ms"])
    assert result["pulid_unet_vs_plain"] == round(result["median_ms"]["unet_pulid"] / result["median_ms"]["unet"], 3)
    assert result["pulid_encoder_ms_per_identity"] > 0


@pytest.mark.slow
def test_bench_alternate_times_each_graph_in_its_own_process(pulid_engine, tmp_path):
    engine, _ = pulid_engine
    done = run_sdrt("bench", str(engine), "--conditioning", "--alternate", "--backend", "ort-cpu,diffusers",
                    "--resolution", "32", "--runs", "1", "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["rounds_in_fresh_processes"] == 2
    assert set(result["median_ms"]) == {"unet", "unet_pulid", "pulid/encoder", "diffusers:unet",
                                        "diffusers:unet_pulid"}
    assert all(v > 0 for v in result["median_ms"].values())
    assert {"pulid_unet_vs_plain", "diffusers_pulid_unet_vs_plain", "diffusers_vs_sdrt_pulid_step"} <= set(result)
    assert len(result["pulid_unet_vs_plain_per_round"]) == 2 and len(result["calls_ms"]["unet"]) == 2
    refused = run_sdrt("bench", str(engine), "--conditioning", "--backend", "ort-cpu,diffusers", "--runs", "1")
    assert refused.returncode == 2 and "--alternate" in refused.stderr


@pytest.mark.slow  # 55 M random parameters: several seconds
def test_the_bench_pulid_file_has_pulids_layout(tiny_pipeline, tmp_path):
    """bench/fullsize.py write_pulid (the random full-size PuLID file sdrt bench uses) reads as PuLID v1 does."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from sdrt.bench.fullsize import write_pulid
    from sdrt.export.extras import pulid

    folder = tiny_pipeline("sdxl")
    path = tmp_path / "pulid_v1.bin"
    write_pulid(folder, path)
    state = pulid.read(str(path), str(path))
    encoder = pulid.IdEncoder(state)
    assert (encoder.out_tokens, encoder.hidden_width) == (10, 1024)  # PuLID v1: 5 body tokens + 5 EVA layers
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert len(pulid.id_unet(SimpleNamespace(unet=unet), state, str(path)).processors) == \
        sum(name.endswith("attn2.processor") for name in unet.attn_processors)
