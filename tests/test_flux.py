"""FLUX.1 (schnell and dev) exported and run by sdrt against diffusers' FluxPipeline on tiny random-weight pipelines
(export/models/tiny_flow.py), batch 2 with per-image generators, non-square; each with a sensitivity check showing
the parity bound would catch a wrong T5 length, VAE shift, guidance or dynamic-shift sequence length."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import Request

diffusers = pytest.importorskip("diffusers")

PROMPTS = ("a red fox in the snow", "a blue car")
SIZE = dict(height=48, width=32)
STEPS = {"schnell": 4, "dev": 6}
COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """flux(variant, precision) → (source folder, engine directory), each built and exported once."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_flow import write_tiny_flux

    root = tmp_path_factory.mktemp("flux")

    def make(variant: str, precision: str = "fp32"):
        folder = root / "models" / variant
        if not folder.exists():
            write_tiny_flux(folder, variant)
        engine = root / "engines" / f"{variant}-{precision}"
        if not engine.exists():
            engine.parent.mkdir(exist_ok=True)
            export(ExportConfig(model=str(folder), output=engine, precision=precision, components=COMPONENTS))
        return folder, engine

    return make


def theirs(folder, variant: str, **overrides) -> np.ndarray:
    pipe = diffusers.FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(num_inference_steps=STEPS[variant], guidance_scale=3.5, **SIZE) | overrides
    images = pipe(prompt=list(PROMPTS), output_type="np", generator=[torch.Generator().manual_seed(7 + i)
                                                                     for i in range(2)], **settings).images
    return (images * 255).round().astype(int)


def ours(engine, variant: str) -> np.ndarray:
    pipe = Pipeline.load(engine, backend="ort-cpu")
    images = pipe.generate(Request.of(prompt=PROMPTS, steps=STEPS[variant], guidance=3.5, seed=7, **SIZE))
    return np.stack([np.asarray(im) for im in images]).astype(int)


def diff(a, b) -> int:
    return int(np.abs(a - b).max())


def test_schnell_equals_diffusers_and_the_bound_catches_a_wrong_t5_length_or_vae_shift(flux):
    folder, engine = flux("schnell")
    manifest = __import__("json").loads((engine / "manifest.json").read_text())
    assert manifest["family"] == "flux" and manifest["latent_multiple"] == 2
    assert manifest["components"]["transformer"]["opset"] == 18  # the dynamo exporter
    mine = ours(engine, "schnell")
    assert mine.shape == (2, 48, 32, 3)
    assert diff(mine, theirs(folder, "schnell")) <= 1
    assert diff(mine, theirs(folder, "schnell", max_sequence_length=256)) > 10  # T5 padded to 512, not 256
    pipe = diffusers.FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.register_to_config(shift_factor=0.0)
    unshifted = pipe(prompt=list(PROMPTS), num_inference_steps=4, output_type="np", **SIZE,
                     generator=[torch.Generator().manual_seed(7 + i) for i in range(2)]).images
    assert diff(mine, (unshifted * 255).round().astype(int)) > 10  # decode adds the VAE's shift_factor


def test_dev_equals_diffusers_and_the_bound_catches_wrong_guidance_or_sequence_length(flux, monkeypatch):
    from diffusers.pipelines.flux import pipeline_flux

    folder, engine = flux("dev")
    mine = ours(engine, "dev")
    assert diff(mine, theirs(folder, "dev")) <= 1
    assert diff(mine, theirs(folder, "dev", guidance_scale=1.0)) > 10  # the guidance input matters
    shift = pipeline_flux.calculate_shift  # mu read at h·w latents instead of the packed (h/2)·(w/2)
    monkeypatch.setattr(pipeline_flux, "calculate_shift", lambda n, *a: shift(4 * n, *a))
    assert diff(mine, theirs(folder, "dev")) > 10


def test_flux_refuses_what_it_does_not_run(flux):
    _, engine = flux("schnell")
    pipe = Pipeline.load(engine, backend="ort-cpu")
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(Request.of(prompt="a", negative_prompt="blurry", **SIZE))
    assert e.value.field == "negative_prompt"
    with pytest.raises(InvalidRequest) as e:  # img2img and inpainting run (tests/test_flow_tasks.py); a hand-off not
        pipe.validate(Request.of(prompt="a", init_latents=torch.zeros(1, 16, 24, 16), **SIZE))
    assert e.value.field == "init_latents"
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(Request.of(prompt="a", height=48, width=34))
    assert e.value.field == "width" and "multiple of 4" in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_fp16_exports_pass_their_gate_and_stay_near_diffusers(flux, variant):
    folder, engine = flux(variant, "fp16")
    manifest = __import__("json").loads((engine / "manifest.json").read_text())
    assert all(c["gate"]["passed"] for c in manifest["components"].values())
    figure = diff(ours(engine, variant), theirs(folder, variant))
    print(f"FLUX.1 {variant} fp16: max pixel difference {figure}/255 from diffusers' fp32")
    assert figure <= 4  # measured: schnell 1, dev 3


def test_max_sequence_length_follows_diffusers(flux):
    folder, engine = flux("schnell")
    pipe = Pipeline.load(engine, backend="ort-cpu")
    images = pipe.generate(Request.of(prompt=PROMPTS, steps=4, seed=7, max_sequence_length=256, **SIZE))
    mine = np.stack([np.asarray(im) for im in images]).astype(int)
    assert diff(mine, theirs(folder, "schnell", max_sequence_length=256)) <= 1


def test_served_over_both_http_dialects_as_the_python_api(flux):
    """FLUX.1 schnell behind the batching service: the OpenAI route and AUTOMATIC1111's txt2img (whose clients send
    negative_prompt "" by default) give the Python API's images for the same request."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from sdrt.serve.app import create_app
    from sdrt.serve.edge import ServeConfig

    _, engine = flux("schnell")
    pipe = Pipeline.load(engine, backend="ort-cpu")
    expected = [np.asarray(im) for im in pipe.generate(Request.of(prompt="a red car", steps=4, guidance=0.0, seed=3,
                                                                  batch=2, width=32, height=48))]
    config = ServeConfig(engine_dir=engine, max_batch=4, max_wait_ms=20, warmup=False, backend="ort-cpu")
    with TestClient(create_app(config, pipeline=pipe)) as client:
        openai = client.post("/v1/images/generations", json={
            "prompt": "a red car", "n": 2, "size": "32x48", "steps": 4, "guidance_scale": 0.0, "seed": 3,
            "response_format": "b64_json"})
        assert openai.status_code == 200, openai.text
        a1111 = client.post("/sdapi/v1/txt2img", json={
            "prompt": "a red car", "negative_prompt": "", "batch_size": 2, "width": 32, "height": 48, "steps": 4,
            "cfg_scale": 0.0, "seed": 3})
        assert a1111.status_code == 200, a1111.text
    decode = lambda b64: np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))  # noqa: E731
    for got in ([decode(d["b64_json"]) for d in openai.json()["data"]], [decode(b) for b in a1111.json()["images"]]):
        assert len(got) == 2 and all(np.array_equal(g, e) for g, e in zip(got, expected))


def test_tensorrt_plan_for_a_flux_directory(flux):
    """`sdrt build --plan`'s logic on a real FLUX.1 export: the transformer and T5 are planned with the manifest's own
    ONNX dims (packed sequence, T5 length), no guidance batch; nothing is built (no TensorRT here)."""
    from sdrt.engines import trt_dir, trt_profiles as tp

    _, engine = flux("schnell")
    profile = tp.profiles(["64x48"], None, "2", True, 16, text_length="128")[0]
    planned = {p.component: p for p in trt_dir.plan(engine, [profile], None, (9, 0), "10.13.0")}
    assert list(planned) == ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"]
    t = planned["transformer"].shapes
    manifest = json.loads((engine / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads((Path(__file__).parents[1] / "export" / "manifest.schema.json").read_text()))
    assert manifest["transformer"]["latent_packing"] == "2x2" and manifest["transformer"]["max_sequence_length"] == 512
    assert manifest["transformer"]["schedule"]["dynamic_shift"] is False  # schnell: static shift 1
    f = manifest["vae_scale_factor"]  # the tiny VAE's: 2
    assert t["hidden_states"][2][:2] == (2, (48 // f // 2) * (64 // f // 2)) and t["encoder_hidden_states"][2][1] == 128
    assert planned["text_encoder_2"].shapes["input_ids"][2] == (2, 128)
    assert planned["text_encoder"].shapes["input_ids"][2] == (2, 77)
    assert planned["transformer"].file.startswith("trt/transformer__b2_h48_w64_s128_cfg")


@pytest.mark.slow
@pytest.mark.parametrize("variant,sampler", [("schnell", "UniPC"), ("dev", "UniPC"), ("dev", "DPM++ 2M")])
def test_multistep_samplers_equal_flux_pipeline_with_that_scheduler(flux, variant, sampler):
    """DPM++ 2M and UniPC on flow sigmas: FluxPipeline hands such a scheduler mu and no sigmas (dev: the dynamic
    shift at the packed length; schnell: UniPC's static flow_shift 1)."""
    from sdrt.runtime.samplers import flow, registry

    folder, engine = flux(variant)
    pipe = diffusers.FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    name = registry.for_model(registry.resolve(sampler)[0], dict(pipe.scheduler.config))
    spec = registry.get(name)
    pipe.scheduler = getattr(diffusers, spec.diffusers_class).from_config(
        pipe.scheduler.config, **flow.reference_config(spec, pipe.scheduler.config))
    images = pipe(prompt=list(PROMPTS), num_inference_steps=5, guidance_scale=3.5, output_type="np", **SIZE,
                  generator=[torch.Generator().manual_seed(7 + i) for i in range(2)]).images
    theirs = (images * 255).round().astype(int)
    ours_pipe = Pipeline.load(engine, backend="ort-cpu")
    run = dict(prompt=PROMPTS, steps=5, guidance=3.5, seed=7, **SIZE)
    ours = np.stack([np.asarray(im) for im in ours_pipe.generate(Request.of(sampler=sampler, **run))]).astype(int)
    euler = np.stack([np.asarray(im) for im in ours_pipe.generate(Request.of(**run))]).astype(int)
    print(f"FLUX.1 {variant} {sampler} vs FluxPipeline + {spec.diffusers_class}: {diff(ours, theirs)}/255")
    assert diff(ours, theirs) <= 1
    assert diff(ours, euler) > 2, "the sampler choice changed nothing"
