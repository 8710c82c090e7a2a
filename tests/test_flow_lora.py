"""LoRA on the flow-matching transformer families (FLUX.1, SD3): at load, per request and fused at export, for the
transformer and the text encoders (CLIP and T5), in the formats people publish — diffusers/PEFT and AI-toolkit
(`transformer.<path>.lora_A/lora_B`, optional `alpha`), kohya/sd-scripts' FLUX.1 files over Black Forest Labs'
module names (`lora_unet_double_blocks_0_img_attn_qkv`: fused q/k/v split by rows; `single_blocks_N_linear1`:
q/k/v/proj_mlp; `lora_te1_` CLIP-L, `lora_te3_` T5) — against diffusers on the tiny pipelines
(export/models/tiny_flow.py), batch 2 with per-image generators.

The reference: diffusers' `load_lora_weights` + `fuse_lora(lora_scale=…)` for the transformer (peft 0.21 injects
the layers). Text-encoder deltas are added to the reference's CLIP and T5 weights by hand with the documented rule
W += scale · (α / r) · up @ down (reference/customization.md §1.2): transformers' own PEFT hook, which diffusers
calls for text encoders, needs peft ≥ 0.22, and diffusers drops T5 keys altogether. For a kohya FLUX.1 file the
reference converts the keys with diffusers' own `_convert_kohya_flux_lora_to_diffusers`, except the single blocks'
`linear1`, whose split widths that function hard-codes to the full-size model (3072 × 3 + 12288): those are split by
hand (rows q, k, v, proj_mlp). Two gaps of diffusers 0.42 in that path, where sdrt does what the file's trainer
means: it converts the embedders and the final layer (`img_in`, `txt_in`, `time_in_*`, `vector_in_*`,
`guidance_in_*`, `final_layer_*`) without the `transformer.` prefix and then drops them unseen (the reference adds
the prefix back), and it ignores the final layer's alphas ("TODO: alphas" in its converter; the files here carry
none there, so kohya's rule, a missing α = rank, and diffusers agree).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from sdrt.runtime.lora import files as lora_files
from sdrt.runtime.lora.files import LoraError, Model

diffusers = pytest.importorskip("diffusers")

PROMPTS = ("a red fox in the snow", "a blue car")
FLUX_CALL = dict(height=48, width=32, num_inference_steps=4, guidance_scale=3.5)
SD3_CALL = dict(height=32, width=48, num_inference_steps=5, guidance_scale=4.0, negative_prompt="blurry")
SEED = 7
MIN_MOVE = 20  # uint8 levels each LoRA must move the image by (so that a LoRA that does nothing cannot pass)
T5 = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}
CLIPS = {"flux": ("text_encoder",), "sd3": ("text_encoder", "text_encoder_2")}

# kohya/BFL name → the diffusers Linear(s) it covers, rows in this order (the test's own statement of the mapping;
# test_kohya_flux_names_equal_diffusers_converter checks it against diffusers)
_DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
           "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
           "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "txt_mlp_0": ("ff_context.net.0.proj",),
           "txt_mlp_2": ("ff_context.net.2",), "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",)}
_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
           "modulation_lin": ("norm.linear",)}
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in_out_layer": "time_text_embed.text_embedder.linear_2", "final_layer_linear": "proj_out",
        "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer_adaLN_modulation_1": "norm_out.linear"}


# ---- the models' modules and LoRA files ----------------------------------------------------------------------

def linears(module, text: bool = False) -> dict[str, tuple[int, int]]:
    """Every Linear's path → weight shape; CLIP paths without transformers' `text_model.` prefix."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and name:
            out[name.removeprefix("text_model.") if text else name] = tuple(m.weight.shape)
    return out


def bfl_modules(transformer) -> dict[str, tuple[tuple[str, ...], tuple[int, int]]]:
    """kohya name → (diffusers paths, fused weight shape) for a FluxTransformer2DModel."""
    shapes = linears(transformer)
    out = {}
    for prefix, table, count in (("double_blocks", _DOUBLE, len(transformer.transformer_blocks)),
                                 ("single_blocks", _SINGLE, len(transformer.single_transformer_blocks))):
        block = "transformer_blocks" if prefix == "double_blocks" else "single_transformer_blocks"
        for i in range(count):
            for name, parts in table.items():
                paths = tuple(f"{block}.{i}.{p}" for p in parts)
                out[f"lora_unet_{prefix}_{i}_{name}"] = (paths, (sum(shapes[p][0] for p in paths), shapes[paths[0]][1]))
    for name, path in _TOP.items():
        if path in shapes:  # the guidance embedder: FLUX.1-dev only
            out[f"lora_unet_{name}"] = ((path,), shapes[path])
    return out


def factors(shape: tuple[int, int], rank: int, std: float, g: torch.Generator):
    """(down [r, in], up [out, r]): down ~ N(0, 1/in), up ~ N(0, std²)."""
    return (torch.randn(rank, shape[1], generator=g) / math.sqrt(shape[1]), torch.randn(shape[0], rank, generator=g) * std)


def save(path, tensors: dict) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def diffusers_file(path, pipe, family: str, seed: int, std: float, text_std: float, alpha: float | None = None) -> str:
    """diffusers/PEFT (AI-toolkit) names: `transformer.<path>.lora_A/B.weight` (+ `.alpha`), CLIPs as
    `text_encoder[_2].text_model.<path>` (transformers 4's layout, as published files name them), T5 as
    `text_encoder_2.` (FLUX.1) / `text_encoder_3.` (SD3) + its path."""
    g, rank, tensors = torch.Generator().manual_seed(seed), 4, {}
    parts = [("transformer", linears(pipe.transformer), std, "")]
    parts += [(c, linears(getattr(pipe, c), text=True), text_std, "text_model.") for c in CLIPS[family]]
    parts += [(T5[family], linears(getattr(pipe, T5[family])), text_std, "")]
    for component, shapes, s, inner in parts:
        for p, shape in shapes.items():
            down, up = factors(shape, rank, s, g)
            key = f"{component}.{'' if p.startswith('text_projection') else inner}{p}"
            tensors |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
            if alpha is not None:
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return save(path, tensors)


def kohya_flux_file(path, pipe, seed: int, std: float, text_std: float, alpha: float) -> str:
    """sd-scripts' FLUX.1 names: `lora_unet_<BFL name>`, `lora_te1_text_model_…` (CLIP-L), `lora_te3_…` (T5),
    `lora_down`/`lora_up`/`alpha` (none on the final layer: see the module docstring)."""
    g, rank, tensors = torch.Generator().manual_seed(seed), 8, {}
    named = {k: shape for k, (_, shape) in bfl_modules(pipe.transformer).items()}
    named |= {"lora_te1_text_model_" + p.replace(".", "_"): s for p, s in linears(pipe.text_encoder, True).items()}
    named |= {"lora_te3_" + p.replace(".", "_"): s for p, s in linears(pipe.text_encoder_2).items()}
    for name, shape in named.items():
        down, up = factors(shape, rank, text_std if name.startswith("lora_te") else std, g)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        if "final_layer" not in name:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return save(path, tensors)


# ---- the reference ----------------------------------------------------------------------------------------------

def _read(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _by_hand(module, path: str, delta: torch.Tensor) -> None:
    names = {n for n, _ in module.named_modules()}  # CLIP with or without transformers' `text_model.` level
    found = [p for p in (path, path.removeprefix("text_model."), "text_model." + path) if p in names]
    target = module.get_submodule(found[0])
    with torch.no_grad():
        target.weight += delta.reshape(target.weight.shape)


def reference(folder, family: str, loras: list[tuple[str, float]], call: dict, drop: str = "") -> np.ndarray:
    """diffusers' pipeline with each LoRA: the transformer through load_lora_weights + fuse_lora, the text encoders'
    deltas added by hand (see the module docstring); batch 2, generators seeded SEED + i. `drop`: leave out the
    keys starting with it (to show that part of a file matters)."""
    cls = diffusers.FluxPipeline if family == "flux" else diffusers.StableDiffusion3Pipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    for index, (path, scale) in enumerate(loras):
        sd = {k: v for k, v in _read(path).items() if not (drop and k.startswith(drop))}
        kohya = any(k.endswith(".lora_down.weight") for k in sd)
        text = {k: v for k, v in sd.items() if k.startswith(("lora_te", "text_encoder"))}
        transformer = {k: v for k, v in sd.items() if k not in text}
        if kohya:
            from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

            converted = _convert_kohya_flux_lora_to_diffusers({k: v for k, v in transformer.items()
                                                               if "_linear1." not in k})
            # diffusers 0.42 converts img_in, txt_in, time_in, vector_in, guidance_in and final_layer without the
            # `transformer.` prefix, and load_lora_weights then drops them unseen; the reference puts it back
            transformer = _split_linear1(transformer) | {
                (k if k.startswith("transformer.") else "transformer." + k): v for k, v in converted.items()}
        pipe.load_lora_weights(transformer, adapter_name=f"l{index}")
        pipe.fuse_lora(components=["transformer"], lora_scale=scale, adapter_names=[f"l{index}"])
        pipe.unload_lora_weights()
        for key in text:
            if not key.endswith((".lora_A.weight", ".lora_down.weight")):
                continue
            stem = key.rsplit(".lora_", 1)[0]
            up = text[stem + (".lora_B.weight" if key.endswith("lora_A.weight") else ".lora_up.weight")]
            down = text[key]
            alpha = float(text[stem + ".alpha"]) if stem + ".alpha" in text else down.shape[0]
            delta = scale * alpha / down.shape[0] * (up @ down)
            if kohya:
                component = "text_encoder" if stem.startswith("lora_te1_") else T5[family]
                module = getattr(pipe, component)
                lookup = {n.replace(".", "_"): n for n, _ in module.named_modules()}
                rest = stem.split("_", 2)[2]
                _by_hand(module, lookup.get(rest) or lookup[rest.removeprefix("text_model_")], delta)
            else:
                component, _, module_path = stem.partition(".")
                _by_hand(getattr(pipe, component), module_path, delta)
    images = pipe(prompt=list(PROMPTS), output_type="np",
                  generator=[torch.Generator().manual_seed(SEED + i) for i in range(2)], **call).images
    return (images * 255).round().astype(int)


def _split_linear1(sd: dict) -> dict:
    """A single block's `linear1` in diffusers' names: rows q, k, v, proj_mlp of the fused up weight (the down
    shared), α/r folded into the down as diffusers' converter folds it."""
    out = {}
    for key in [k for k in sd if k.endswith("_linear1.lora_down.weight")]:
        stem = key.removesuffix(".lora_down.weight")
        block = int(stem.split("_")[-2])
        down, up = sd[key], sd[stem + ".lora_up.weight"]
        alpha = float(sd[stem + ".alpha"]) if stem + ".alpha" in sd else down.shape[0]
        inner = down.shape[1]  # the block's width: q, k and v each that many rows, the MLP the rest
        rows = [inner, inner, inner, up.shape[0] - 3 * inner]
        for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), torch.split(up, rows)):
            base = f"transformer.single_transformer_blocks.{block}.{name}"
            out[f"{base}.lora_A.weight"] = down * (alpha / down.shape[0])
            out[f"{base}.lora_B.weight"] = part
    return out


def ours(engine, family: str, call: dict, loras=(), at_load=()) -> np.ndarray:
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.request import Request

    pipe = Pipeline.load(engine, backend="ort-cpu", loras=list(at_load))
    request = Request.of(prompt=PROMPTS, steps=call["num_inference_steps"], guidance=call["guidance_scale"], seed=SEED,
                         height=call["height"], width=call["width"], negative_prompt=call.get("negative_prompt"),
                         loras=[list(x) for x in loras])
    return np.stack([np.asarray(im) for im in pipe.generate(request)]).astype(int)


def diff(a, b) -> int:
    return int(np.abs(a - b).max())


# ---- fast: names and refusals on the torch modules (no export) ------------------------------------------------

@pytest.fixture(scope="module")
def flux_transformer():
    from sdrt.export.models.tiny_flow import _flux_transformer

    torch.manual_seed(0)
    return _flux_transformer(guidance=True)


def _model(transformer, family="flux") -> Model:
    return Model({"transformer": linears(transformer)}, None, family)


def test_kohya_flux_names_equal_diffusers_converter(flux_transformer, tmp_path):
    """Every BFL name of a kohya FLUX.1 file lands on the modules diffusers' converter puts it on, with the same
    delta (α/r, the q/k/v row split, the final layer's swapped halves); `linear1` (whose widths diffusers hard-codes
    to the full model) by the row rule, each row block its own module."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g, tensors = torch.Generator().manual_seed(3), {}
    for name, (_, shape) in bfl_modules(flux_transformer).items():
        down, up = factors(shape, 6, 0.1, g)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        if "final_layer" not in name:
            tensors[f"{name}.alpha"] = torch.tensor(3.0)
    file = save(tmp_path / "k.safetensors", tensors)
    model = _model(flux_transformer)
    ours = lora_files.deltas([lora_files.LoraRef("k", file, "x", 1.0)], model, "transformer")
    assert set(ours) == set(model.targets["transformer"])  # every Linear of the tiny FLUX.1 transformer

    theirs = _convert_kohya_flux_lora_to_diffusers({k: v for k, v in tensors.items() if "_linear1." not in k})
    theirs |= _split_linear1(tensors)
    for key in [k for k in theirs if k.endswith("lora_A.weight")]:
        path = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        delta = (theirs[key.replace("lora_A", "lora_B")] @ theirs[key]).numpy()
        np.testing.assert_allclose(ours[path], delta, rtol=1e-5, atol=1e-6, err_msg=path)
    assert len(theirs) == 2 * len(ours)


def test_a_lora_for_another_family_or_shape_is_refused_in_one_line(flux_transformer, tmp_path):
    g = torch.Generator().manual_seed(1)
    flux = _model(flux_transformer)
    d, u = factors((64, 32), 4, 0.1, g)
    sd3_file = save(tmp_path / "sd3.safetensors", {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": d,
                                                   "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": u})
    d, u = factors((96, 7), 4, 0.1, g)  # 7 inputs: not this model's width
    bad_shape = save(tmp_path / "shape.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": d,
                                                      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": u})
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    for path, fragment in ((sd3_file, "is a LoRA for SD3"), (bad_shape, "do not fit transformer"),
                           (tmp_path / "junk.safetensors", "is not a readable .safetensors LoRA file")):
        with pytest.raises(LoraError) as e:
            lora_files.match(lora_files.read_header(path), flux)
        assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
    unet_file = save(tmp_path / "sd15.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 4)})
    with pytest.raises(LoraError, match="is a LoRA for SD 1.x .* but this model is FLUX.1"):
        lora_files.match(lora_files.read_header(unet_file), flux)
    from sdrt.export.models.tiny_flow import _transformer

    sd3 = _model(_transformer(), "sd3")  # kohya's SD3 names (Stability AI's MMDiT) are refused by name
    with pytest.raises(LoraError, match="names SD3's modules as kohya/sd-scripts does .* diffusers/PEFT names"):
        lora_files.match(lora_files.read_header(sd3_file), sd3)


# ---- slow: exported engines against diffusers ----------------------------------------------------------------

@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """flow(family, loras=()) → (diffusers folder, fp32 engine directory), each exported once."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_flow import write_tiny_flux, write_tiny_sd3

    root = tmp_path_factory.mktemp("flow-lora")
    made = {}

    def make(family: str, loras=()):
        folder = root / family
        if not folder.exists():
            (write_tiny_flux if family == "flux" else write_tiny_sd3)(folder)
        key = (family, tuple(loras))
        if key not in made:
            made[key] = root / f"engine-{family}-{len(made)}"
            export(ExportConfig(model=str(folder), output=made[key], precision="fp32", loras=tuple(loras),
                                components=("text_encoder", "text_encoder_2", "text_encoder_3", "transformer",
                                            "vae_decoder") if family == "sd3" else
                                ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")))
        return folder, made[key]

    return make


@pytest.fixture(scope="module")
def flux_files(flow, tmp_path_factory):
    folder, _ = flow("flux")
    pipe = diffusers.FluxPipeline.from_pretrained(folder)
    root = tmp_path_factory.mktemp("flux-loras")
    return {"diffusers": diffusers_file(root / "flux_peft.safetensors", pipe, "flux", 1, 0.3, 0.3, alpha=2.0),
            "kohya": kohya_flux_file(root / "flux_kohya.safetensors", pipe, 2, 0.3, 0.3, alpha=4.0)}


def _report(name: str, figure: int, moved: int) -> None:
    print(f"flow LoRA {name}: max pixel difference {figure}/255 from diffusers (the LoRA moves the image {moved})")


@pytest.mark.slow
def test_flux_diffusers_lora_at_load_and_per_request_equal_diffusers(flow, flux_files):
    folder, engine = flow("flux")
    maps = {c: json.loads((engine / c / "weights_map.json").read_text())["weights"] for c in
            ("transformer", "text_encoder", "text_encoder_2")}
    assert len(maps["transformer"]) == len(linears(diffusers.FluxPipeline.from_pretrained(folder).transformer))
    lora = (flux_files["diffusers"], 0.8)
    theirs, base = reference(folder, "flux", [lora], FLUX_CALL), reference(folder, "flux", [], FLUX_CALL)
    at_load = ours(engine, "flux", FLUX_CALL, at_load=[lora])
    per_request = ours(engine, "flux", FLUX_CALL, loras=[lora])
    _report("FLUX.1 diffusers/PEFT at load", diff(at_load, theirs), diff(theirs, base))
    assert diff(theirs, base) >= MIN_MOVE
    assert diff(at_load, theirs) <= 1 and np.array_equal(per_request, at_load)
    assert diff(ours(engine, "flux", FLUX_CALL), base) <= 1  # the base engines are back for a request without it
    for part in ("text_encoder.", "text_encoder_2."):  # CLIP's and T5's deltas each matter: the bound would see them
        without = diff(at_load, reference(folder, "flux", [lora], FLUX_CALL, drop=part))
        print(f"  without its {part[:-1]} keys diffusers lands {without} levels away")
        assert without > 5


@pytest.mark.slow
def test_flux_kohya_lora_equals_diffusers(flow, flux_files):
    folder, engine = flow("flux")
    lora = (flux_files["kohya"], 0.7)
    theirs, base = reference(folder, "flux", [lora], FLUX_CALL), reference(folder, "flux", [], FLUX_CALL)
    mine = ours(engine, "flux", FLUX_CALL, loras=[lora])
    _report("FLUX.1 kohya per request", diff(mine, theirs), diff(theirs, base))
    assert diff(theirs, base) >= MIN_MOVE and diff(mine, theirs) <= 1


@pytest.mark.slow
def test_flux_loras_fused_at_export_equal_diffusers(flow, flux_files):
    loras = [(flux_files["kohya"], 0.7), (flux_files["diffusers"], -0.5)]
    folder, engine = flow("flux", loras)
    manifest = json.loads((engine / "manifest.json").read_text())
    assert [r["scale"] for r in manifest["loras"]] == [0.7, -0.5]
    assert all(c["gate"]["passed"] for c in manifest["components"].values())
    theirs, base = reference(folder, "flux", loras, FLUX_CALL), reference(folder, "flux", [], FLUX_CALL)
    mine = ours(engine, "flux", FLUX_CALL)
    _report("FLUX.1 two LoRAs fused at export", diff(mine, theirs), diff(theirs, base))
    assert diff(theirs, base) >= MIN_MOVE and diff(mine, theirs) <= 1


@pytest.mark.slow
def test_sd3_diffusers_lora_equals_diffusers(flow, tmp_path):
    folder, engine = flow("sd3")
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
    lora = (diffusers_file(tmp_path / "sd3.safetensors", pipe, "sd3", 5, 0.3, 0.3), 0.9)
    theirs, base = reference(folder, "sd3", [lora], SD3_CALL), reference(folder, "sd3", [], SD3_CALL)
    mine = ours(engine, "sd3", SD3_CALL, at_load=[lora])
    _report("SD3 diffusers/PEFT at load", diff(mine, theirs), diff(theirs, base))
    assert diff(theirs, base) >= MIN_MOVE and diff(mine, theirs) <= 1


@pytest.mark.slow
def test_bad_lora_at_load_is_one_line_naming_the_field(flow, flux_files, tmp_path):
    from sdrt.runtime.fields import InvalidRequest
    from sdrt.runtime.pipeline import Pipeline

    _, engine = flow("sd3")
    with pytest.raises(InvalidRequest) as e:  # a FLUX.1 file on SD3: its BFL names match nothing there
        Pipeline.load(engine, backend="ort-cpu", loras=[(flux_files["kohya"], 1.0)])
    assert e.value.field == "loras" and "is a LoRA for FLUX.1" in str(e.value) and "\n" not in str(e.value)
    old = tmp_path / "old-export"  # a transformer exported before it had a weights map
    shutil.copytree(engine, old)
    (old / "transformer" / "weights_map.json").unlink()
    sd3_file = diffusers_file(tmp_path / "sd3.safetensors", diffusers.StableDiffusion3Pipeline.from_pretrained(
        flow("sd3")[0]), "sd3", 5, 0.3, 0.3)
    with pytest.raises(InvalidRequest, match="exported without weights maps .* re-export it") as e:
        Pipeline.load(old, backend="ort-cpu", loras=[(sd3_file, 1.0)])
    assert e.value.field == "loras"
