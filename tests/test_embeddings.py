"""Textual inversion: the file formats, their errors, and images equal to diffusers' load_textual_inversion.

Embedding files are made here (random vectors, torch + safetensors); the engine directories are the tiny
exports plus their text encoders' inputs_embeds variants (exported once per module).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdrt.runtime.prompts import embeddings as ti
from sdrt.runtime.loader import open_dir
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.fields import InvalidRequest
from test_parity import assert_same_images, generators, reference_pipeline, to_uint8

WIDTH = 32  # the tiny text encoders' hidden size
SD = (("*", WIDTH),)
SDXL = (("clip_l", WIDTH), ("clip_g", WIDTH))


def vectors(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


# ---- formats ------------------------------------------------------------------------------------------------

def test_every_format_loads_with_the_file_stem_as_trigger(tmp_path):
    v = vectors(3, 0)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "other", "step": 5},
               tmp_path / "a1111.pt")
    save_file({"emb_params": v}, str(tmp_path / "civitai.safetensors"))
    save_file({"<my-token>": v}, str(tmp_path / "learned_embeds.safetensors"))
    torch.save({"<my-token>": v[0]}, tmp_path / "single.bin")  # diffusers: one (dim,) vector
    for name in ("a1111.pt", "civitai.safetensors", "learned_embeds.safetensors"):
        e = ti.load(tmp_path / name, SD)
        assert e.name == name.split(".")[0] and e.count == 3 and np.array_equal(e.vectors[0], v.numpy())
    assert ti.load(tmp_path / "single.bin", SD).vectors[0].shape == (1, WIDTH)
    save_file({"clip_l": vectors(2, 1), "clip_g": vectors(2, 2)}, str(tmp_path / "xl.safetensors"))
    xl = ti.load(tmp_path / "xl.safetensors", SDXL)
    assert xl.count == 2 and np.array_equal(xl.vectors[1], vectors(2, 2).numpy())
    assert ti.load(tmp_path / "xl.safetensors", (("clip_g", WIDTH),)).vectors[0].shape == (2, WIDTH)  # refiner


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned",))


@pytest.mark.parametrize("make,fragment", [
    (lambda p: save_file({"emb_params": torch.randn(2, 16)}, str(p / "e.safetensors")), "16 wide"),
    (lambda p: save_file({"a": torch.randn(2, WIDTH), "b": torch.randn(2, WIDTH)}, str(p / "e.safetensors")),
     "expected one"),
    (lambda p: (p / "e.safetensors").write_bytes(b"not a safetensors file"), "cannot be read"),
    (lambda p: torch.save({"x": _Evil()}, p / "e.pt"), "cannot be read"),  # weights_only refuses code
    (lambda p: save_file({"emb_params": torch.full((1, WIDTH), float("nan"))}, str(p / "e.safetensors")), "NaN"),
    (lambda p: (p / "e.txt").write_text("x"), "unknown file type"),
])
def test_bad_files_are_one_clear_error_naming_the_file(tmp_path, make, fragment):
    make(tmp_path)
    (path,) = list(tmp_path.iterdir())
    with pytest.raises(ti.EmbeddingError, match=fragment) as e:
        ti.load(path, SD)
    assert str(path.name) in str(e.value)


def test_sdxl_needs_both_halves_and_a_folder_skips_what_does_not_fit(tmp_path):
    save_file({"emb_params": vectors(1, 0)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(ti.EmbeddingError, match="no clip_l vectors"):
        ti.load(tmp_path / "sd.safetensors", SDXL)
    save_file({"clip_l": vectors(1, 1), "clip_g": vectors(1, 2)}, str(tmp_path / "xl.safetensors"))
    assert [e.name for e in ti.resolve((), tmp_path, SDXL)] == ["xl"]
    # on SD 1.x an SDXL file's clip_l half fits (AUTOMATIC1111 reads clip_l there too); names come from the folder
    assert [e.name for e in ti.resolve(("sd",), tmp_path, SD)] == ["sd", "xl"]
    with pytest.raises(ti.EmbeddingError, match="no such file"):
        ti.resolve(("nothing",), tmp_path, SD)


# ---- images ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ti_engine(exported, tiny_pipeline, tmp_path_factory):
    """engine directory of a tiny family with its text encoders' inputs_embeds variants."""
    from sdrt.export.exporter import ExportConfig, export

    root, cache = tmp_path_factory.mktemp("ti"), {}

    def get(family: str):
        if family not in cache:
            out = root / family
            shutil.copytree(exported(family, "fp32"), out, copy_function=os.link)
            export(ExportConfig(model=str(tiny_pipeline(family)), output=root / f"{family}-variants",
                                precision="fp32", components=("text_encoder_embeds", "text_encoder_2_embeds")))
            for variant in (root / f"{family}-variants").glob("text_encoder*_embeds"):
                shutil.copytree(variant, out / variant.name)
            cache[family] = out
        return cache[family]

    return get


def _diffusers(family, tiny_pipeline, loads, prompt):
    ref = reference_pipeline(tiny_pipeline(family))
    for kwargs in loads:
        ref.load_textual_inversion(**kwargs)
    return ref(prompt, negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.0, height=32, width=32,
               generator=generators(3, 1), output_type="np").images


def _ours(pipe, prompt, **kw):
    return pipe.generate(Request.of(prompt=prompt, negative_prompt="blurry", steps=3, guidance=6.0, seed=3,
                                    height=32, width=32, **kw))


@pytest.mark.parametrize("count", [1, 3])
def test_sd15_embedding_equals_diffusers_load_textual_inversion(ti_engine, tiny_pipeline, tmp_path, count):
    path = tmp_path / "shiny.safetensors"
    save_file({"emb_params": vectors(count, count, scale=2.0)}, str(path))
    prompt = "a photo of a shiny cat"
    theirs = _diffusers("sd15", tiny_pipeline, [{"pretrained_model_name_or_path": str(path), "token": "shiny"}],
                        prompt)
    pipe = Pipeline.load(ti_engine("sd15"), backend="ort-cpu")
    for syntax in ("plain", "a1111", "compel"):  # one trigger, no other syntax: the same vectors in every mode
        assert_same_images(f"sd15-ti-{count}-vector-{syntax}", _ours(pipe, prompt, embeddings=[str(path)],
                                                                     prompt_syntax=syntax), theirs)
    without = _ours(pipe, prompt)
    assert np.abs(to_uint8(without).astype(int) - to_uint8(theirs).astype(int)).max() > 1


def test_sdxl_embedding_equals_diffusers_loading_both_halves(ti_engine, tiny_pipeline, tmp_path):
    halves = {"clip_l": vectors(2, 5, 2.0), "clip_g": vectors(2, 6, 2.0)}
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file(halves, str(folder / "glossy.safetensors"))
    ref = reference_pipeline(tiny_pipeline("sdxl"))
    ref.load_textual_inversion(halves["clip_l"], token="glossy", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(halves["clip_g"], token="glossy", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    prompt = "a glossy cozy library"
    theirs = ref(prompt, negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.0, height=32, width=32,
                 generator=generators(3, 1), output_type="np").images
    pipe = Pipeline.load(ti_engine("sdxl"), backend="ort-cpu", embeddings_dir=folder)  # the folder: all active
    assert_same_images("sdxl-ti-2-vector", _ours(pipe, prompt, prompt_syntax="plain"), theirs)
    assert_same_images("sdxl-ti-2-vector-a1111", _ours(pipe, prompt), theirs)


def test_a1111_embedding_keeps_its_weight_and_a_model_without_variants_says_so(ti_engine, exported, tmp_path):
    path = tmp_path / "shiny.safetensors"
    save_file({"emb_params": vectors(2, 9, 2.0)}, str(path))
    pipe = Pipeline.load(ti_engine("sd15"), backend="ort-cpu")
    plain = to_uint8(_ours(pipe, "a shiny cat", embeddings=[str(path)])).astype(int)
    weighted = to_uint8(_ours(pipe, "a (shiny:1.6) cat", embeddings=[str(path)])).astype(int)
    assert np.abs(plain - weighted).max() > 1
    bare = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu")
    with pytest.raises(Exception, match="no inputs_embeds variant of text_encoder; re-export"):
        _ours(bare, "a shiny cat", embeddings=[str(path)])
    _ours(bare, "a cat", embeddings=[str(path)])  # no trigger in the prompt: the plain encoder serves


def test_request_and_cli_errors(ti_engine, tmp_path):
    model = open_dir(ti_engine("sd15"))
    from sdrt.runtime.validate import validate

    with pytest.raises(InvalidRequest) as e:
        validate(Request.of(prompt="a", embeddings="x.pt"), model)
    assert e.value.field == "embeddings" and "list" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        validate(Request.of(prompt="a", embeddings=[str(tmp_path / "missing.pt")]), model)
    assert e.value.field == "embeddings" and "no such file" in e.value.message
    job = validate(Request.from_dict({"prompt": {"text": "a", "embeddings": []}}), model)
    assert job.embeddings == ()
    bad = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.randn(1, 8)}, str(bad))
    from sdrt.cli.generate import RunOptions, generate
    from sdrt.runtime.errors import UserError

    out = tmp_path / "x.png"
    with pytest.raises(UserError) as e:  # the CLI prints this one line and exits 2 (tests/test_prompt_syntax.py)
        generate(RunOptions(engine_dir=ti_engine("sd15"), prompts=("a wide cat",), steps=1, out=out,
                            embeddings=(bad,)))
    assert str(e.value).startswith("--embedding embedding ") and "8 wide" in str(e.value) and not out.exists()
