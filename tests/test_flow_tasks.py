"""Image to image and inpainting on the flow-matching transformers (issue 24 §2): FLUX.1 against diffusers'
FluxImg2ImgPipeline and FluxInpaintPipeline, SD3 against StableDiffusion3InpaintPipeline (SD3 img2img: tests/test_sd3.py),
on the tiny pipelines of export/models/tiny_flow.py exported by sdrt and run by ONNX Runtime: batch 2 with per-image
generators, non-square, within 1/255. diffusers gets the init image and the mask once per image (image=[img, img]),
so that it samples each image's posteriors with that image's generator, as sdrt does (runtime/components.py).

Each parity case shows the bound could fail: the image moves far from text to image, a wrong strength (or the
noising as the UNet families do) lands tens of levels away, and the mask matters.

SD3 inpainting: diffusers 0.42's StableDiffusion3InpaintPipeline decodes `latents / scaling_factor` without adding the
VAE's shift_factor, unlike its encode and every other SD3 pipeline (diffusers issue #13611, item 1; PR #14671).
sdrt decodes as the other SD3 pipelines do, so the reference here is that pipeline's latents (output_type="latent")
decoded with the shift; the test also records how far diffusers' own decode lands."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.runtime.family import Family
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.request import Request
from sdrt.runtime.tasks import img2img

diffusers = pytest.importorskip("diffusers")

FLUX_PROMPTS = ["a red fox in the snow", "a blue car"]
FLUX_SIZE = dict(height=48, width=32)
FLUX_STEPS = {"schnell": 4, "dev": 6}
SD3_PROMPTS = ["a photo of a cat", "a red car in the desert"]
SD3_SIZE = dict(height=32, width=48)
SD3_NEGATIVE, SD3_STEPS, SD3_GUIDANCE = "blurry, low quality", 5, 4.0
SEED = 7


def _picture(height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask(height: int, width: int) -> Image.Image:
    """White (repaint) in a box that is not aligned to the latent grid's halves; black elsewhere."""
    m = np.zeros((height, width), np.uint8)
    m[height // 6: height - height // 6, width // 8: width * 3 // 4] = 255
    return Image.fromarray(m)


def _generators(n: int = 2) -> list:
    return [torch.Generator().manual_seed(SEED + i) for i in range(n)]


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images]).astype(int)


def _np(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(int)


def diff(a, b) -> int:
    return int(np.abs(a - b).max())


# ---- cheap checks (default run) ---------------------------------------------------------------------------------

def test_default_strengths_are_the_pipelines():
    """A request without a strength runs at its diffusers pipeline's __call__ default."""
    from diffusers import (FluxImg2ImgPipeline, FluxInpaintPipeline, StableDiffusion3Img2ImgPipeline,
                           StableDiffusion3InpaintPipeline, StableDiffusionImg2ImgPipeline,
                           StableDiffusionXLImg2ImgPipeline)

    def default(cls):
        return inspect.signature(cls.__call__).parameters["strength"].default

    assert img2img.default_strength(Family.FLUX, False) == default(FluxImg2ImgPipeline) == 0.6
    assert img2img.default_strength(Family.FLUX, True) == default(FluxInpaintPipeline) == 0.6
    assert img2img.default_strength(Family.SD3, False) == default(StableDiffusion3Img2ImgPipeline)
    assert img2img.default_strength(Family.SD3, True) == default(StableDiffusion3InpaintPipeline)
    assert img2img.default_strength(Family.SD15, False) == default(StableDiffusionImg2ImgPipeline) == 0.8
    assert img2img.default_strength(Family.SDXL_REFINER, False) == default(StableDiffusionXLImg2ImgPipeline) == 0.3
    assert img2img.default_strength(Family.SD15, True) == 1.0  # StableDiffusionInpaintPipeline


def test_flow_noising_is_scale_noise_at_the_first_and_next_sigma():
    """img2img.noised on a flow schedule equals FlowMatchEulerDiscreteScheduler.scale_noise as the Flux pipelines call
    it: at the first kept sigma before the loop (begin index), at the next sigma after each step (the inpaint loop's
    step_index), and the image itself after the last step; the VE form x0 + s·noise is far from it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdrt.runtime.samplers.schedules import Schedule

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16,
                                            max_image_seq_len=256, base_shift=0.5, max_shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=1.3)
    start = 2  # get_timesteps at 6 steps, strength 0.6
    sched.set_begin_index(start)
    x0, noise = torch.randn(2, 16, 6, 4), torch.randn(2, 16, 6, 4)
    kept = sched.sigmas[start:].numpy()  # a flow schedule cut to the window, float32 as sdrt's (samplers/flow.py)
    cut = Schedule(sigmas=kept, timesteps=kept[:-1].astype(np.float64) * 1000, init_noise_sigma=1.0,
                   targets=kept[1:], flow=True)
    first = sched.scale_noise(x0, sched.timesteps[start:start + 1], noise)
    assert torch.equal(img2img.noised(x0, noise, cut), first)
    assert (img2img.noised(x0, noise, cut) - (x0 + noise * float(kept[0]))).abs().max() > 0.5
    for i, t in enumerate(sched.timesteps[start:]):
        sched.step(torch.zeros_like(x0), t, x0)  # advances step_index as the inpaint loop's step does
        want = x0 if i + 1 == len(kept) - 1 else sched.scale_noise(x0, torch.tensor([0.0]), noise)
        assert torch.equal(img2img.noised(x0, noise, cut, i + 1), want)


# ---- FLUX.1 -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """flux(variant) → (diffusers folder, fp32 engine directory with the VAE encoder), each made once."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_flow import write_tiny_flux

    root = tmp_path_factory.mktemp("flux-tasks")
    made = {}

    def make(variant: str):
        if variant not in made:
            folder = write_tiny_flux(root / variant, variant)
            engine = root / f"{variant}-engine"
            export(ExportConfig(model=str(folder), output=engine, precision="fp32", components=(
                "text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder")))
            made[variant] = folder, engine
        return made[variant]

    return make


@pytest.fixture(scope="module")
def flux_pipe(flux):
    from sdrt.runtime.pipeline import Pipeline

    pipes = {}

    def get(variant: str):
        if variant not in pipes:
            pipes[variant] = Pipeline.load(flux(variant)[1], backend="ort-cpu")
        return pipes[variant]

    return get


def _flux_ours(pipe, variant: str, **kw) -> np.ndarray:
    flat = dict(prompt=FLUX_PROMPTS, steps=FLUX_STEPS[variant], guidance=3.5, seed=SEED, **FLUX_SIZE) | kw
    return _pixels(pipe.generate(Request.of(**flat)))


def _flux_theirs(cls, folder, variant: str, **kw) -> np.ndarray:
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt=FLUX_PROMPTS, num_inference_steps=FLUX_STEPS[variant], guidance_scale=3.5, output_type="np",
                generator=_generators(), **FLUX_SIZE) | kw
    return _np(pipe(**args).images)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_flux_img2img_equals_diffusers(flux, flux_pipe, variant):
    """FluxImg2ImgPipeline at its default strength 0.6: get_timesteps on Flux's linspace sigmas (dynamic shift for
    dev), the init image encoded ((z - shift_factor)·scaling_factor, one posterior per image), then the noise, then
    scale_noise at the first kept sigma; the latents packed around the transformer."""
    folder, _ = flux(variant)
    pipe = flux_pipe(variant)
    init = _picture(**FLUX_SIZE)
    ours = _flux_ours(pipe, variant, init_image=init)
    theirs = _flux_theirs(diffusers.FluxImg2ImgPipeline, folder, variant, image=[init, init])
    figure = diff(ours, theirs)
    print(f"FLUX.1 {variant} img2img: max pixel difference {figure}/255")
    assert ours.shape == (2, 48, 32, 3) and figure <= 1
    assert diff(ours[0], ours[1]) > 30  # per-image generators: two images
    assert diff(ours, _flux_ours(pipe, variant)) > 30  # the init image matters
    assert diff(_flux_ours(pipe, variant, init_image=init, strength=0.9), theirs) > 10  # so does the strength


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_flux_inpaint_equals_diffusers(flux, flux_pipe, variant, monkeypatch):
    """FluxInpaintPipeline (default strength 0.6): the mask binarized and resized to the latents, draws in its
    order (image posterior, noise, masked image posterior), and after each step the original re-imposed outside the
    mask at scale_noise(image_latents, next sigma, noise) (bit for bit: test_flow_noising_is_scale_noise_…). The mask
    matters (inpaint ≠ img2img); a wrong strength, or noising as the UNet families do (x0 + s·noise), lands tens of
    levels away."""
    folder, _ = flux(variant)
    pipe = flux_pipe(variant)
    init, mask = _picture(**FLUX_SIZE), _mask(**FLUX_SIZE)
    ours = _flux_ours(pipe, variant, init_image=init, mask=mask)
    theirs = _flux_theirs(diffusers.FluxInpaintPipeline, folder, variant, image=[init, init],
                          mask_image=[mask, mask])
    figure = diff(ours, theirs)
    print(f"FLUX.1 {variant} inpaint: max pixel difference {figure}/255")
    assert figure <= 1
    assert diff(ours, _flux_ours(pipe, variant, init_image=init)) > 30  # not img2img: the mask was applied
    if variant == "schnell":
        assert diff(_flux_ours(pipe, variant, init_image=init, mask=mask, strength=0.9), theirs) > 10
        monkeypatch.setattr(img2img, "noised", lambda x0, noise, schedule, index=0: x0 + noise * (
            float(schedule.sigmas[index]) if index < len(schedule.sigmas) else 0.0))
        assert diff(_flux_ours(pipe, variant, init_image=init, mask=mask), theirs) > 10


@pytest.mark.slow
def test_flux_refuses_init_latents_and_serves_img2img_and_inpaint_over_a1111(flux, flux_pipe):
    """Flux still refuses a refiner hand-off; AUTOMATIC1111's /sdapi/v1/img2img (a real server on loopback) runs
    img2img and inpainting (A1111's mask handling: runtime/tasks/inpaint_a1111.py) on a Flux engine and answers the
    Python API's images for the same request."""
    import base64
    import io

    import httpx

    from conftest import LoopbackServer

    _, engine = flux("schnell")
    pipe = flux_pipe("schnell")
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(Request.of(prompt="a", init_latents=torch.zeros(1, 16, 24, 16), **FLUX_SIZE))
    assert e.value.field == "init_latents"
    init, mask = _picture(**FLUX_SIZE), _mask(**FLUX_SIZE)
    def png(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    common = dict(prompt="a red car", steps=4, guidance=0.0, seed=3, width=32, height=48, strength=0.75)
    body = {"prompt": "a red car", "negative_prompt": "", "init_images": [png(init)], "steps": 4, "cfg_scale": 0.0,
            "seed": 3, "width": 32, "height": 48, "denoising_strength": 0.75, "sampler_name": "Euler"}
    server = LoopbackServer(engine, pipe, model_name="tiny-flux")
    try:
        plain = httpx.post(server.url + "/sdapi/v1/img2img", json=body, timeout=120)
        masked = httpx.post(server.url + "/sdapi/v1/img2img", timeout=120, json=body | {
            "mask": png(mask), "mask_blur": 2, "inpainting_fill": 1, "inpaint_full_res": False})
    finally:
        server.stop()
    assert plain.status_code == 200, plain.text
    assert masked.status_code == 200, masked.text
    decode = lambda b64: np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), int)  # noqa: E731
    want_plain = _pixels(pipe.generate(Request.of(**common, init_image=init)))[0]
    want_masked = _pixels(pipe.generate(Request.of(**common, init_image=init, mask=mask, inpaint={
        "mask_blur": 2, "fill": "original", "only_masked": False})))[0]
    assert np.array_equal(decode(plain.json()["images"][0]), want_plain)
    assert np.array_equal(decode(masked.json()["images"][0]), want_masked)
    assert diff(want_plain, want_masked) > 30


# ---- SD3 ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(diffusers folder, fp32 engine directory, sdrt Pipeline, diffusers StableDiffusion3InpaintPipeline)."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_flow import write_tiny_sd3
    from sdrt.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("sd3-tasks")
    folder = write_tiny_sd3(root / "tiny-sd3", seed=0)
    export(ExportConfig(model=str(folder), output=root / "engine", precision="fp32"))
    reference = diffusers.StableDiffusion3InpaintPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    return folder, root / "engine", Pipeline.load(root / "engine", backend="ort-cpu"), reference


def _sd3_ours(pipe, **kw) -> np.ndarray:
    flat = dict(prompt=SD3_PROMPTS, negative_prompt=SD3_NEGATIVE, steps=SD3_STEPS, guidance=SD3_GUIDANCE, seed=SEED,
                **SD3_SIZE) | kw
    return _pixels(pipe.generate(Request.of(**flat)))


def _sd3_theirs(pipe, shift_on_decode: bool = True, **kw) -> np.ndarray:
    """StableDiffusion3InpaintPipeline's image: its latents decoded as StableDiffusion3Pipeline decodes
    (latents / scaling_factor + shift_factor), or with its own decode (no shift) when `shift_on_decode` is false."""
    args = dict(prompt=SD3_PROMPTS, negative_prompt=SD3_NEGATIVE, num_inference_steps=SD3_STEPS,
                guidance_scale=SD3_GUIDANCE, generator=_generators(), **SD3_SIZE) | kw
    if not shift_on_decode:
        return _np(pipe(output_type="np", **args).images)
    latents = pipe(output_type="latent", **args).images
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor,
                                return_dict=False)[0]
    return _np(pipe.image_processor.postprocess(image, output_type="np"))


@pytest.mark.slow
def test_sd3_inpaint_equals_diffusers(sd3):
    """StableDiffusion3InpaintPipeline with CFG and a negative prompt, at its default strength 0.6 and at 1.0 (pure
    noise start): draws in its order (image posterior, noise, masked image posterior), scale_noise at the first kept
    sigma, the original re-imposed outside the mask at the next sigma after each step. A wrong strength, or no mask,
    lands tens of levels away; diffusers' own decode (no shift_factor) is far from both."""
    _, _, pipe, reference = sd3
    init, mask = _picture(**SD3_SIZE), _mask(**SD3_SIZE)
    images = dict(image=[init, init], mask_image=[mask, mask])
    ours = _sd3_ours(pipe, init_image=init, mask=mask)
    theirs = _sd3_theirs(reference, **images)
    figure = diff(ours, theirs)
    full = diff(_sd3_ours(pipe, init_image=init, mask=mask, strength=1.0), _sd3_theirs(reference, strength=1.0,
                                                                                          **images))
    unshifted = diff(ours, _sd3_theirs(reference, shift_on_decode=False, **images))
    print(f"SD3 inpaint: max pixel difference {figure}/255 (strength 0.6), {full}/255 (strength 1.0); "
          f"diffusers' own decode without the VAE shift: {unshifted}/255")
    assert ours.shape == (2, 32, 48, 3) and figure <= 1 and full <= 1
    assert unshifted > 30
    assert diff(_sd3_ours(pipe, init_image=init, mask=mask, strength=0.8), theirs) > 10
    assert diff(ours, _sd3_ours(pipe, init_image=init)) > 30  # the mask was applied
    assert diff(ours[0], ours[1]) > 30


@pytest.mark.slow
def test_sd3_img2img_batch_of_two_equals_diffusers(sd3):
    """StableDiffusion3Img2ImgPipeline (default strength 0.6) on a batch of two with per-image generators (the
    single-image cases are tests/test_sd3.py's)."""
    _, _, pipe, reference = sd3
    init = _picture(**SD3_SIZE)
    img2img_pipe = diffusers.StableDiffusion3Img2ImgPipeline.from_pipe(reference)
    theirs = _sd3_theirs(img2img_pipe, shift_on_decode=False, image=[init, init])  # img2img decodes with the shift
    ours = _sd3_ours(pipe, init_image=init)
    figure = diff(ours, theirs)
    print(f"SD3 img2img batch 2: max pixel difference {figure}/255")
    assert figure <= 1 and diff(ours[0], ours[1]) > 30
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(Request.of(prompt="a", init_latents=torch.zeros(1, 16, 16, 24), **SD3_SIZE))
    assert e.value.field == "init_latents"
