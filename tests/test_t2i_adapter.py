"""T2I-Adapter: t2i_adapter/NAME + unet_t2i added into an engine directory, equal to diffusers'
StableDiffusionAdapterPipeline on a tiny adapter the tests build (export/models/tiny.py), and the bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from test_parity import assert_same_images, diffusers_scheduler, generators, to_uint8

from sdrt.runtime.loader import open_dir
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.validate import validate

SIZE = dict(width=48, height=32)


def _image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


def test_t2i_adapter_equals_diffusers(conditioned, tiny_pipeline):
    import diffusers

    engine, parts = conditioned("sd15")
    image = _image(21, 56, 40)  # resized (Lanczos) to the output size
    ref = diffusers.StableDiffusionAdapterPipeline.from_pretrained(
        tiny_pipeline("sd15"), adapter=diffusers.T2IAdapter.from_pretrained(parts["t2i"]), safety_checker=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    theirs = ref("a cat", image=image, adapter_conditioning_scale=0.8, num_inference_steps=3, num_images_per_prompt=2,
                 generator=generators(3, 2), output_type="np", **SIZE).images
    pipe = Pipeline.load(engine, backend="ort-cpu")
    common = dict(prompt="a cat", steps=3, sampler="euler", seed=3, batch=2, **SIZE)
    ours = pipe.generate(Request.of(**common, adapter_name="sketch", adapter_image=image, adapter_scale=0.8))
    assert_same_images("t2i-adapter sd15", ours, theirs)
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(pipe.generate(Request.of(**common))).astype(int)).max() > 8
    record = json.loads((engine / "manifest.json").read_text())["t2i_adapters"][0]
    assert record["name"] == "sketch" and record["features_used"] == 2


def test_bad_t2i_requests(conditioned):
    engine = open_dir(conditioned("sd15")[0])
    image = _image(0, 48, 32)

    def invalid(**fields):
        with pytest.raises(InvalidRequest) as e:
            validate(Request.of(prompt="x", **{**SIZE, **fields}), engine)
        return e.value

    e = invalid(adapter_name="lineart", adapter_image=image)
    assert e.field == "adapter_name" and "sketch" in e.message
    assert invalid(adapter_name="sketch", adapter_image=image, adapter_scale=float("inf")).field == "adapter_scale"
    assert invalid(adapter_name="sketch", adapter_image=image, width=36).field == "width"  # adapter needs multiples of 8
    assert invalid(adapter_name="sketch").field == "adapter_image"
    e = invalid(adapter_name="sketch", adapter_image=image, controls=(("canny", image),))
    assert e.field == "adapter_name" and "together" in e.message


def test_http_t2i_adapter_equals_the_python_request(conditioned):
    import base64
    import io

    from fastapi.testclient import TestClient

    from sdrt.serve.app import create_app
    from sdrt.serve.edge import ServeConfig

    engine, _ = conditioned("sd15")
    image = _image(4, 48, 32)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    pipe = Pipeline.load(engine, backend="ort-cpu")
    config = ServeConfig(engine_dir=engine, max_batch=2, max_wait_ms=20, warmup=False, backend="ort-cpu")
    body = {"prompt": "a fox", "size": "48x32", "steps": 2, "guidance_scale": 5.0, "sampler": "euler", "seed": 4,
            "adapter_name": "sketch", "adapter_image": b64, "adapter_scale": 0.8}
    with TestClient(create_app(config, pipeline=pipe)) as client:
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        got = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).convert("RGB")
        want = pipe.generate(Request.of(prompt="a fox", steps=2, guidance=5.0, sampler="euler", seed=4,
                                        adapter_name="sketch", adapter_image=image, adapter_scale=0.8, **SIZE))[0]
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1
        for bad, field in (({"adapter_name": "lineart"}, "adapter_name"), ({"adapter_image": "%%%"}, "adapter_image"),
                           ({"adapter_scale": "high"}, "adapter_scale")):
            response = client.post("/v1/images/generations", json=body | bad)
            assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


@pytest.mark.slow
def test_sdxl_t2i_adapter_equals_diffusers(exported, tiny_pipeline, tmp_path):
    """StableDiffusionXLAdapterPipeline (adapter_conditioning_factor 1: the features join every step)."""
    import os
    import shutil

    import diffusers

    from sdrt.export.exporter import add_controlnets
    from sdrt.export.models.tiny import write_tiny_t2i_adapter

    engine = tmp_path / "sdxl"
    shutil.copytree(exported("sdxl", "fp32"), engine, copy_function=os.link)
    folder = write_tiny_t2i_adapter(tmp_path / "sketch-src", seed=6)
    add_controlnets(engine, (), t2i_adapters=(f"{folder}=sketch",))
    image = _image(22, 56, 40)
    ref = diffusers.StableDiffusionXLAdapterPipeline.from_pretrained(
        tiny_pipeline("sdxl"), adapter=diffusers.T2IAdapter.from_pretrained(folder))
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    theirs = ref("a cat", image=image, adapter_conditioning_scale=0.8, num_inference_steps=3, guidance_scale=6.0,
                 generator=generators(4, 1), output_type="np", **SIZE).images
    pipe = Pipeline.load(engine, backend="ort-cpu")
    common = dict(prompt="a cat", steps=3, sampler="euler", seed=4, guidance=6.0, **SIZE)
    ours = pipe.generate(Request.of(**common, adapter_name="sketch", adapter_image=image, adapter_scale=0.8))
    assert_same_images("t2i-adapter sdxl", ours, theirs)
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(pipe.generate(Request.of(**common))).astype(int)).max() > 8
