"""Stable Diffusion 3 / 3.5 (issue 24): the tiny SD3 pipeline (export/models/tiny_flow.py) exported by sdrt and run
by ONNX Runtime equals diffusers' StableDiffusion3Pipeline within 1/255, and the comparison can fail: a wrong
scheduler shift, an ignored VAE shift_factor or another T5 sequence length move the image by tens of levels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.request import Request

PROMPTS = ["a photo of a cat", "a red car in the desert"]
NEGATIVE = "blurry, low quality"
SEED, WIDTH, HEIGHT, STEPS, GUIDANCE = 7, 48, 32, 5, 4.0


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(diffusers folder, fp32 engine directory)."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_flow import write_tiny_sd3

    root = tmp_path_factory.mktemp("sd3")
    folder = write_tiny_sd3(root / "tiny-sd3", seed=0)
    export(ExportConfig(model=str(folder), output=root / "engine", precision="fp32"))
    return folder, root / "engine"


@pytest.fixture(scope="module")
def reference(sd3):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipeline(sd3):
    from sdrt.runtime.pipeline import Pipeline

    return Pipeline.load(sd3[1])


def _diffusers(pipe, **kw) -> np.ndarray:
    args = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, output_type="pil",
                generator=[torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]) | kw
    return np.stack([np.asarray(im, dtype=np.int16) for im in pipe(**args).images])


def _sdrt(pipeline, **kw) -> np.ndarray:
    flat = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, steps=STEPS, guidance=GUIDANCE,
                seed=SEED) | kw
    return np.stack([np.asarray(im, dtype=np.int16) for im in pipeline.generate(Request.of(**flat))])


@pytest.fixture(scope="module")
def images(pipeline, reference):
    return _sdrt(pipeline), _diffusers(reference)


def test_manifest_and_layout(sd3):
    _, engine = sd3
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["family"] == "sd3" and manifest["prediction_type"] == "flow"
    assert set(manifest["components"]) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer",
                                           "vae_decoder", "vae_encoder"}
    assert all(c["gate"]["passed"] for c in manifest["components"].values())
    inputs = {i["name"] for i in manifest["components"]["transformer"]["inputs"]}
    assert inputs == {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"}
    assert [o["name"] for o in manifest["components"]["transformer"]["outputs"]] == ["out_hidden_states"]
    assert manifest["latent_multiple"] == 2  # the transformer's patch size
    assert manifest["transformer"] == {"latent_packing": "none", "patch_size": 2, "max_sequence_length": 256,
                                       "schedule": {"kind": "flow_match", "shift": 3.0, "dynamic_shift": False},
                                       "guidance_embedding": False}
    assert (engine / "tokenizer_3" / "tokenizer.json").is_file()
    assert json.loads((engine / "vae_decoder" / "config.json").read_text())["latent_channels"] == 16


def test_t5_tokenizer_equals_transformers(sd3):
    from transformers import AutoTokenizer

    from sdrt.runtime.prompts.t5_tokenizer import T5Tokenizer

    texts = ["a photo of a cat", "", "Portrait of a beautiful woman with long red hair, oil painting by greg rutkowski"]
    ours = T5Tokenizer.from_folder(sd3[1] / "tokenizer_3")
    theirs = AutoTokenizer.from_pretrained(sd3[1] / "tokenizer_3")
    for length in (8, 256):  # 8 truncates, keeping </s> last
        want = theirs(texts, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(ours.encode(texts, length), want)


def test_txt2img_equals_diffusers(images):
    ours, theirs = images
    assert ours.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours[0] - ours[1]).max() > 30  # two different images, not one repeated


def test_a_wrong_shift_or_shift_factor_is_seen(images, reference):
    """The comparison above could fail: diffusers itself with the scheduler's shift at 1 instead of 3, or the VAE's
    shift_factor ignored, lands tens of levels away from sdrt's image."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours, _ = images
    kept = reference.scheduler
    try:
        reference.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        assert np.abs(ours - _diffusers(reference)).max() > 30
    finally:
        reference.scheduler = kept
    shift = reference.vae.config.shift_factor
    try:
        reference.vae.register_to_config(shift_factor=0.0)
        assert np.abs(ours - _diffusers(reference)).max() > 30
    finally:
        reference.vae.register_to_config(shift_factor=shift)


def test_sequence_length_and_empty_negative(pipeline, reference, images):
    """max_sequence_length reaches T5 (128 tokens: diffusers' image at 128, not at 256); without a negative prompt
    "" is encoded, as diffusers does (not zeros)."""
    short = _sdrt(pipeline, max_sequence_length=128)
    assert np.abs(short - _diffusers(reference, max_sequence_length=128)).max() <= 1
    assert np.abs(short - images[0]).max() > 10
    unguided_negative = _sdrt(pipeline, negative_prompt=None, prompt=PROMPTS[:1], seed=SEED + 3)
    want = _diffusers(reference, negative_prompt=None, prompt=PROMPTS[:1],
                      generator=[torch.Generator().manual_seed(SEED + 3)])
    assert np.abs(unguided_negative - want).max() <= 1


def test_requests_sd3_does_not_take(pipeline):
    for flat, field in ((dict(prompt_syntax="compel"), "prompt_syntax"), (dict(clip_skip=1), "clip_skip"),
                        (dict(max_sequence_length=600), "max_sequence_length"),
                        (dict(init_latents=torch.zeros(1, 16, HEIGHT // 2, WIDTH // 2)), "init_latents")):
        with pytest.raises(InvalidRequest) as e:
            pipeline.validate(Request.of(prompt="a cat", width=WIDTH, height=HEIGHT, steps=2, **flat))
        assert e.value.field == field


@pytest.mark.slow
def test_fp16_export_gates_and_runs(sd3, reference, tmp_path):
    """fp16: every component passes its gate (T5 kept fp32 with the reason written if its fp16 graph fails) and
    the image stays near diffusers' fp32 one."""
    from sdrt.export.exporter import ExportConfig, T5_FP32_REASON, export
    from sdrt.runtime.pipeline import Pipeline

    manifest = export(ExportConfig(model=str(sd3[0]), output=tmp_path / "fp16", precision="fp16"))
    t5 = manifest["components"]["text_encoder_3"]
    assert t5["precision"] == "fp16" or t5["kept_fp32_reason"] == T5_FP32_REASON
    assert manifest["components"]["transformer"]["precision"] == "fp16"
    ours = _sdrt(Pipeline.load(tmp_path / "fp16"))
    diff = np.abs(ours - _diffusers(reference))
    assert diff.mean() < 2 and diff.max() < 40


@pytest.mark.parametrize("sampler", ["flow_heun", pytest.param("DPM++ 2M", marks=pytest.mark.slow),
                                     pytest.param("UniPC", marks=pytest.mark.slow)])  # layer 1 covers all three
def test_flow_samplers_equal_diffusers_with_that_scheduler(pipeline, reference, sampler):
    """Flow-match Heun, and DPM-Solver++(2M)/UniPC on flow sigmas (AUTOMATIC1111's names select them on a flow
    model), against the SD3 pipeline with the scheduler the registry entry names (tests/test_samplers_flow_multistep.py
    has the sampler-level cases)."""
    import diffusers
    from sdrt.runtime.samplers import flow, registry

    name = registry.for_model(registry.resolve(sampler)[0], dict(reference.scheduler.config))
    spec = registry.get(name)
    kept = reference.scheduler
    try:
        reference.scheduler = getattr(diffusers, spec.diffusers_class).from_config(
            kept.config, **flow.reference_config(spec, kept.config))
        theirs = _diffusers(reference, num_inference_steps=4)
    finally:
        reference.scheduler = kept
    ours = _sdrt(pipeline, sampler=sampler, steps=4)
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - _sdrt(pipeline, steps=4)).max() > 2, "the sampler choice changed nothing"


def _init_image():
    from PIL import Image

    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("sampler,strength", [(None, 0.5), ("flow_heun", None)])
def test_img2img_equals_diffusers(pipeline, reference, sampler, strength):
    """StableDiffusion3Img2ImgPipeline: the init image encoded ((z - shift_factor)·scaling_factor), noised by the flow
    scheduler's scale_noise (s·noise + (1 - s)·x0) at the first kept timestep, get_timesteps with steps·strength not
    floored (5 steps at 0.5 run 3, where SD's img2img runs 2), default strength 0.6. Sensitivity: the VE-style
    noising x0 + s·noise, or the floored step count, moves the image by more than 10 levels."""
    import diffusers
    from sdrt.runtime.samplers import flow, registry
    from sdrt.runtime.tasks import img2img

    img2img_pipe = diffusers.StableDiffusion3Img2ImgPipeline.from_pipe(reference)
    if sampler is not None:
        spec = registry.get(sampler)
        img2img_pipe.scheduler = getattr(diffusers, spec.diffusers_class).from_config(
            reference.scheduler.config, **flow.reference_config(spec, reference.scheduler.config))
    kw = {} if strength is None else {"strength": strength}
    theirs = _diffusers(img2img_pipe, prompt=PROMPTS[:1], image=_init_image(),
                        generator=[torch.Generator().manual_seed(SEED)], **kw)
    flat = dict(prompt=PROMPTS[:1], init_image=_init_image(), seed=SEED, **kw)
    if sampler is not None:
        flat["sampler"] = sampler
    ours = _sdrt(pipeline, **flat)
    assert ours.shape == (1, HEIGHT, WIDTH, 3)
    assert np.abs(ours - theirs).max() <= 1
    if sampler is None:
        kept = img2img.noised
        try:
            img2img.noised = lambda x0, noise, schedule: x0 + noise * float(schedule.sigmas[0])
            assert np.abs(_sdrt(pipeline, **flat) - theirs).max() > 10
        finally:
            img2img.noised = kept
        assert np.abs(_sdrt(pipeline, **{**flat, "strength": 0.4}) - theirs).max() > 10  # 2 steps, SD's count


def test_served_over_both_http_dialects_as_the_python_api(sd3, pipeline):
    """The batching service, the OpenAI route and AUTOMATIC1111's txt2img on an SD3 engine: the images the Python API
    draws for the same request (PNG bytes decoded), and the infotext names the flow sampler."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from sdrt.runtime.request import Request
    from sdrt.serve.app import create_app
    from sdrt.serve.edge import ServeConfig

    expected = [np.asarray(im) for im in pipeline.generate(Request.of(
        prompt="a red car", negative_prompt="blurry", steps=3, guidance=4.0, seed=11, batch=2, width=48, height=32))]
    config = ServeConfig(engine_dir=sd3[1], max_batch=4, max_wait_ms=20, warmup=False, backend="ort-cpu")
    with TestClient(create_app(config, pipeline=pipeline)) as client:
        openai = client.post("/v1/images/generations", json={
            "prompt": "a red car", "negative_prompt": "blurry", "n": 2, "size": "48x32", "steps": 3,
            "guidance_scale": 4.0, "seed": 11, "response_format": "b64_json"})
        assert openai.status_code == 200, openai.text
        a1111 = client.post("/sdapi/v1/txt2img", json={
            "prompt": "a red car", "negative_prompt": "blurry", "batch_size": 2, "width": 48, "height": 32,
            "steps": 3, "cfg_scale": 4.0, "seed": 11})
        assert a1111.status_code == 200, a1111.text
    decode = lambda b64: np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))  # noqa: E731
    for got in ([decode(d["b64_json"]) for d in openai.json()["data"]], [decode(b) for b in a1111.json()["images"]]):
        assert all(np.array_equal(g, e) for g, e in zip(got, expected)) and len(got) == 2
    assert "flow_euler" in a1111.json()["info"] or "Euler" in a1111.json()["info"]


@pytest.mark.slow
def test_sd35_medium_layout_equals_diffusers(tmp_path):
    """SD3.5 medium's transformer additions (a dual-attention layer, RMSNorm on q and k) export through the gate and
    run equal to diffusers, batch 2 with per-image generators, CFG with a negative prompt."""
    from diffusers import StableDiffusion3Pipeline

    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_flow import write_tiny_sd3
    from sdrt.runtime.pipeline import Pipeline

    folder = write_tiny_sd3(tmp_path / "tiny-sd35", seed=1, sd35=True)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["dual_attention_layers"] == [0] and config["qk_norm"] == "rms_norm"
    export(ExportConfig(model=str(folder), output=tmp_path / "engine", precision="fp32",
                        components=("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder")))
    reference = StableDiffusion3Pipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    ours, theirs = _sdrt(Pipeline.load(tmp_path / "engine")), _diffusers(reference)
    worst = int(np.abs(ours - theirs).max())
    print(f"SD3.5-medium layout vs StableDiffusion3Pipeline: {worst}/255")
    assert worst <= 1
    assert int(np.abs(ours - _diffusers(reference, guidance_scale=1.0)).max()) > 10  # guidance visibly matters


@pytest.mark.slow
def test_without_t5_equals_diffusers_with_text_encoder_3_none(sd3, tmp_path):
    """An export without text_encoder_3 (the memory-saving way to run SD3): zeros stand in for T5's sequence, as
    StableDiffusion3Pipeline(text_encoder_3=None) does."""
    from diffusers import StableDiffusion3Pipeline

    from sdrt.export.exporter import ExportConfig, export
    from sdrt.runtime.pipeline import Pipeline

    folder, _ = sd3
    export(ExportConfig(model=str(folder), output=tmp_path / "engine", precision="fp32",
                        components=("text_encoder", "text_encoder_2", "transformer", "vae_decoder")))
    reference = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    reference.set_progress_bar_config(disable=True)
    ours, theirs = _sdrt(Pipeline.load(tmp_path / "engine")), _diffusers(reference)
    worst = int(np.abs(ours - theirs).max())
    print(f"SD3 without T5 vs StableDiffusion3Pipeline(text_encoder_3=None): {worst}/255")
    assert worst <= 1
    assert int(np.abs(ours - _sdrt(Pipeline.load(sd3[1]))).max()) > 10  # T5's sequence matters with it there
