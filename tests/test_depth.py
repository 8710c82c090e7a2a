"""Depth-to-image (StableDiffusionDepth2ImgPipeline): export of the 5-channel UNet and the DPT depth estimator,
parity with diffusers with the estimator and with a given depth map, and the bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_sdrt
from sdrt.runtime.tasks import depth
from sdrt.runtime.conditioning import image_processors
from sdrt.runtime.loader import open_dir
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.validate import validate
from test_parity import assert_same_images, diffusers_scheduler, generators, reference_pipeline


@pytest.fixture(scope="module")
def depth2img(tmp_path_factory):
    """(diffusers folder, engine directory) of a tiny depth-to-image pipeline, exported once."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_pipelines import write_tiny

    root = tmp_path_factory.mktemp("depth2img")
    folder = write_tiny("depth2img", root / "model")
    manifest = export(ExportConfig(model=str(folder), output=root / "engine", precision="fp32"))
    assert manifest["pipeline_class"] == "StableDiffusionDepth2ImgPipeline"
    assert "depth_estimator" in manifest["components"]
    return folder, root / "engine"


@pytest.fixture(scope="module")
def pipe(depth2img):
    return Pipeline.load(depth2img[1], backend="ort-cpu")


@pytest.fixture(scope="module")
def ref(depth2img):
    return reference_pipeline(depth2img[0])


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8))


def _depth_map() -> Image.Image:
    y, x = np.mgrid[0:24, 0:32]
    return Image.fromarray((x * 200 / 31 + y * 2).astype(np.uint8))


def test_estimator_input_equals_the_image_processor(depth2img, ref):
    image = _image(1)
    theirs = ref.feature_extractor(images=[image], return_tensors="pt").pixel_values
    ours = image_processors.DptInput.of(depth2img[1] / "depth_estimator").tensor(image)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("given,sampler", [(False, None), (True, None), pytest.param(False, "euler", marks=pytest.mark.slow)])
def test_equals_diffusers(ref, pipe, given, sampler):
    image = _image()
    own = ref.scheduler  # None: the pipeline's own (DDIM)
    if sampler is not None:
        ref.scheduler = diffusers_scheduler(ref, sampler)
    kwargs = {"depth_map": depth.map_tensor(_depth_map())} if given else {}
    try:
        theirs = ref("a stone bridge", image=image, strength=0.7, num_inference_steps=4, guidance_scale=7.5,
                     generator=generators(3, 1), output_type="np", **kwargs).images
    finally:
        ref.scheduler = own
    request = dict(prompt="a stone bridge", init_image=image, strength=0.7, steps=4, guidance=7.5, seed=3,
                   sampler=sampler)
    ours = pipe.generate(Request.of(**request, **({"depth_map": _depth_map()} if given else {})))
    assert_same_images(f"depth2img-{'map' if given else 'estimator'}-{sampler or 'ddim'}", ours, theirs)
    if given:  # the depth moves the pixels: the given map's image differs from the estimator's
        estimated = pipe.generate(Request.of(**request))
        assert np.abs(np.asarray(estimated[0], int) - np.asarray(ours[0], int)).max() > 8


@pytest.mark.parametrize("fields,field,fragment", [
    ({"init_image": None}, "init_image", "give the image to start from"),
    ({"mask": Image.new("L", (32, 24), 255)}, "mask", "take no mask"),
    ({"depth_map": Image.new("L", (32, 24), 7)}, "depth_map", "is constant"),
])
def test_bad_requests(depth2img, fields, field, fragment):
    request = Request.of(**{"prompt": "x", "init_image": _image(), **fields})
    with pytest.raises(InvalidRequest, match=fragment) as e:
        validate(request, open_dir(depth2img[1]))
    assert e.value.field == field


def test_depth_map_on_another_model_and_on_the_cli(exported, tmp_path):
    with pytest.raises(InvalidRequest, match="depth-to-image models only") as e:
        validate(Request.of(prompt="x", init_image=_image(), depth_map=_depth_map()),
                 open_dir(exported("sd15", "fp32")))
    assert e.value.field == "depth_map"
    init, dm = tmp_path / "in.png", tmp_path / "d.png"
    _image().save(init)
    _depth_map().save(dm)
    bad = run_sdrt("run", str(exported("sd15", "fp32")), "x", "--init-image", str(init), "--depth-map", str(dm),
                   "-o", str(tmp_path / "o.png"))
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --depth-map applies to "
                                                                           "depth-to-image models only"), bad.stderr
    assert not (tmp_path / "o.png").exists()


def test_through_the_service(pipe):
    from sdrt.runtime.service import Service

    request = Request.of(prompt="a quay", init_image=_image(2), strength=0.8, steps=3, guidance=5.0, seed=8)
    with Service(pipe, max_batch=2, max_wait_ms=5) as service:
        served = service.generate(request).images[0]
    assert np.abs(np.asarray(served, int) - np.asarray(pipe.generate(request)[0], int)).max() <= 1


def test_a1111_img2img_on_a_depth_model(depth2img, pipe):
    import base64
    import io

    from fastapi.testclient import TestClient

    from sdrt.serve.app import create_app
    from sdrt.serve.edge import ServeConfig

    buf = io.BytesIO()
    _image(4).save(buf, format="PNG")
    body = {"prompt": "a tower", "init_images": [base64.b64encode(buf.getvalue()).decode()], "seed": 2, "steps": 3,
            "cfg_scale": 5.0, "sampler_name": "Euler", "denoising_strength": 0.6, "width": 32, "height": 24}
    config = ServeConfig(engine_dir=depth2img[1], max_batch=2, max_wait_ms=5, warmup=False, backend="ort-cpu")
    with TestClient(create_app(config, pipeline=pipe)) as client:
        out = client.post("/sdapi/v1/img2img", json=body)
        assert out.status_code == 200, out.text
    served = Image.open(io.BytesIO(base64.b64decode(out.json()["images"][0]))).convert("RGB")
    direct = pipe.generate(Request.of(prompt="a tower", init_image=_image(4), seed=2, steps=3, guidance=5.0,
                                      sampler="euler", strength=0.6, width=32, height=24))[0]
    assert np.abs(np.asarray(served, int) - np.asarray(direct, int)).max() <= 1
