"""The ×4 upscaler (StableDiffusionUpscalePipeline): export of its 7-channel UNet with class labels and its scale-4
VAE, parity with diffusers, per-image seeds, and the bad inputs (wrong kind of engine directory, noise level out of
range, image too large)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_sdrt
from sdrt.runtime.limits import Limits
from sdrt.runtime.loader import open_dir
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.validate import validate
from test_parity import assert_same_images, diffusers_scheduler, generators, reference_pipeline


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """(diffusers folder, engine directory) of a tiny ×4 upscaler, exported once."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_pipelines import write_tiny

    root = tmp_path_factory.mktemp("upscaler")
    folder = write_tiny("x4-upscaler", root / "model")
    manifest = export(ExportConfig(model=str(folder), output=root / "engine", precision="fp32"))
    assert manifest["pipeline_class"] == "StableDiffusionUpscalePipeline"
    assert set(manifest["components"]) == {"text_encoder", "unet", "vae_decoder"}
    assert manifest["vae_scale_factor"] == 4
    assert [i["name"] for i in manifest["components"]["unet"]["inputs"]][-1] == "class_labels"
    return folder, root / "engine"


@pytest.fixture(scope="module")
def pipe(upscaler):
    return Pipeline.load(upscaler[1], backend="ort-cpu")


def _low_res(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ref(upscaler):
    return reference_pipeline(upscaler[0])


@pytest.mark.parametrize("sampler", ["ddim", pytest.param("euler_a", marks=pytest.mark.slow)])
def test_equals_diffusers(ref, pipe, sampler):
    own = ref.scheduler
    if sampler != "ddim":  # ddim: the pipeline's own scheduler
        ref.scheduler = diffusers_scheduler(ref, sampler)
    image = _low_res()
    try:
        theirs = ref("a red fox", image=image, num_inference_steps=3, guidance_scale=7.5, noise_level=60,
                     negative_prompt="blurry", generator=generators(3, 1), output_type="np").images
    finally:
        ref.scheduler = own
    request = dict(prompt="a red fox", negative_prompt="blurry", init_image=image, steps=3, guidance=7.5, seed=3,
                   sampler=sampler)
    ours = pipe.generate(Request.of(**request, noise_level=60))
    assert ours[0].size == (64, 48)
    assert_same_images(f"x4-upscaler-{sampler}", ours, theirs)
    other = pipe.generate(Request.of(**request, noise_level=0))  # the noise level moves the pixels
    assert np.abs(np.asarray(other[0], int) - np.asarray(ours[0], int)).max() > 8


def test_each_image_of_a_batch_is_its_own_seed(pipe):
    request = dict(prompt="a lighthouse", init_image=_low_res(1), steps=2, guidance=5.0, noise_level=30)
    batch = pipe.generate(Request.of(**request, seed=10, batch=2))
    alone = pipe.generate(Request.of(**request, seed=11))
    assert np.abs(np.asarray(batch[1], int) - np.asarray(alone[0], int)).max() <= 1
    assert np.abs(np.asarray(batch[0], int) - np.asarray(batch[1], int)).max() > 8


@pytest.mark.parametrize("fields,field,fragment", [
    ({"noise_level": 351}, "noise_level", "at most 350"),
    ({"noise_level": -1}, "noise_level", "at least 0"),
    ({"init_image": None}, "init_image", "give the low-resolution image"),
    ({"strength": 0.5}, "strength", "takes no strength"),
    ({"width": 64}, "width", "4× the low-resolution image's"),
    ({"init_image": Image.new("RGB", (40, 40))}, "init_image", "upscaled ×4 it would be 160x160"),
])
def test_bad_requests(upscaler, fields, field, fragment):
    request = Request.of(**{"prompt": "x", "init_image": _low_res(), **fields})
    with pytest.raises(InvalidRequest, match=fragment) as e:
        validate(request, open_dir(upscaler[1]), Limits(max_pixels=100 * 100))
    assert e.value.field == field


def test_noise_level_on_another_model(exported):
    with pytest.raises(InvalidRequest, match="×4 upscaler and unCLIP variations only") as e:
        validate(Request.of(prompt="x", noise_level=20), open_dir(exported("sd15", "fp32")))
    assert e.value.field == "noise_level"


@pytest.mark.slow
def test_cli_upscale(upscaler, pipe, tmp_path):
    low = tmp_path / "low.png"
    _low_res(2).save(low)
    out = tmp_path / "up.png"
    ok = run_sdrt("upscale", str(upscaler[1]), str(low), "a harbour", "--steps", "2", "--noise-level", "40",
                  "--seed", "5", "--backend", "ort-cpu", "-o", str(out), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["width"] == 64
    direct = pipe.generate(Request.of(prompt="a harbour", init_image=_low_res(2), steps=2, guidance=9.0,
                                      noise_level=40, seed=5))
    assert np.abs(np.asarray(Image.open(out).convert("RGB"), int) - np.asarray(direct[0], int)).max() <= 1


def test_cli_upscale_bad_inputs(upscaler, exported, tmp_path):
    low = tmp_path / "low.png"
    _low_res(2).save(low)
    bad = run_sdrt("upscale", str(exported("sd15", "fp32")), str(low), "x", "-o", str(tmp_path / "bad.png"))
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), bad.stderr
    assert "needs a ×4 upscaler's engine directory" in lines[0]
    assert not (tmp_path / "bad.png").exists()
    from sdrt.cli.generate import RunOptions, generate
    from sdrt.runtime.errors import UserError

    for options, fragment in (
            (dict(engine_dir=upscaler[1], init_image=low, noise_level=400, needs="upscale"),
             "--noise-level must be at most 350"),
            (dict(engine_dir=exported("sd15", "fp32"), then_upscale=exported("sd15", "fp32")),
             "--then-upscale " + str(exported("sd15", "fp32")) + " holds a sd15 model"),
            (dict(engine_dir=exported("sd15", "fp32"), then_upscale=upscaler[1], noise_level=-1),
             "--then-upscale: --noise-level must be at least 0"),
    ):
        with pytest.raises(UserError, match=fragment):
            generate(RunOptions(prompts=("x",), steps=2, out=tmp_path / "bad.png", **options))
        assert not (tmp_path / "bad.png").exists()


def test_then_upscale_hands_each_image_to_the_upscaler(upscaler, pipe, exported, tmp_path):
    from sdrt.cli.generate import RunOptions, generate

    common = dict(engine_dir=exported("sd15", "fp32"), prompts=("a small boat",), steps=2, guidance=5.0, seed=4,
                  width=16, height=12, backend="ort-cpu")
    _, (base,) = generate(RunOptions(**common, out=tmp_path / "base.png"))
    _, (up,) = generate(RunOptions(**common, then_upscale=upscaler[1], noise_level=30, out=tmp_path / "up.png"))
    direct = pipe.generate(Request.of(prompt="a small boat", init_image=Image.open(base.path).convert("RGB"),
                                      steps=2, guidance=5.0, seed=4, noise_level=30))[0]
    image = Image.open(up.path).convert("RGB")
    assert image.size == (64, 48)
    assert np.abs(np.asarray(image, int) - np.asarray(direct, int)).max() <= 1


def test_through_the_service(pipe):
    from sdrt.runtime.service import Service

    request = Request.of(prompt="a quay", init_image=_low_res(3), steps=2, guidance=5.0, noise_level=20, seed=8)
    with Service(pipe, max_batch=2, max_wait_ms=5) as service:
        served = service.generate(request).images[0]
    assert served.size == (64, 48)
    assert np.abs(np.asarray(served, int) - np.asarray(pipe.generate(request)[0], int)).max() <= 1
