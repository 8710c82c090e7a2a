"""Outpainting (runtime/tasks/outpaint.py): the canvas and mask rule, parity with diffusers' inpainting pipeline given
the same padded image and mask (built here independently from the documented rule), and the bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from conftest import run_sdrt
from sdrt.runtime.tasks import outpaint
from sdrt.runtime.limits import Limits
from sdrt.runtime.loader import open_dir
from sdrt.runtime.pipeline import Request
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.validate import validate
from test_parity import assert_same_images, diffusers_scheduler, reference_pipeline


def _image(width: int, height: int, seed: int) -> Image.Image:
    # smooth colours, so that the edge fill and the original differ from the repainted area visibly
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128.0)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _rule(image: Image.Image, left=0, right=0, top=0, bottom=0, blur=0):
    """The documented rule, written out again: edge-padded canvas, mask 255 outside the original shrunk by `blur`
    on the extended sides, soft mask = that mask through GaussianBlur(blur / 2)."""
    a = np.asarray(image)
    padded = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
    h, w = a.shape[:2]
    m = np.full(padded.shape[:2], 255, np.uint8)
    m[top + (blur if top else 0):top + h - (blur if bottom else 0),
      left + (blur if left else 0):left + w - (blur if right else 0)] = 0
    mask = Image.fromarray(m)
    soft = mask.filter(ImageFilter.GaussianBlur(blur / 2)) if blur else None
    return Image.fromarray(padded), mask, soft


def test_the_rule_edge_fill_and_masks():
    image = _image(24, 16, 0)
    spec = outpaint.parse("left=8,bottom=16,blur=2")
    out = outpaint.outpaint(image, spec)
    padded, mask, soft = _rule(image, left=8, bottom=16, blur=2)
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out.image), np.asarray(padded))
    assert np.array_equal(np.asarray(out.mask), np.asarray(mask))
    assert np.array_equal(np.asarray(out.soft), np.asarray(soft))
    assert outpaint.parse({"left": 8, "bottom": 16, "blur": 2}) == spec


@pytest.mark.parametrize("fill", ["blur", "noise"])
def test_other_fills_keep_the_original_and_change_the_new_area(fill):
    image = _image(16, 16, 1)
    edge = np.asarray(outpaint.padded_image(image, outpaint.parse("right=16"), 0)).astype(int)
    other = np.asarray(outpaint.padded_image(image, outpaint.parse(f"right=16,fill={fill}"), 0)).astype(int)
    assert np.array_equal(other[:, :16], np.asarray(image))
    assert np.abs(other[:, 16:] - edge[:, 16:]).max() > 8
    again = np.asarray(outpaint.padded_image(image, outpaint.parse(f"right=16,fill={fill}"), 0)).astype(int)
    assert np.array_equal(other, again)  # deterministic (noise: from the seed)


@pytest.mark.parametrize("text,fragment", [
    ("left=-8", "must not be negative"), ("left=12", "multiple of 8"), ("left=8,fill=paint", "fill must be one of"),
    ("top=0", "every margin is 0"), ("up=8", "not an outpaint setting"), ("left8", "SIDE=PIXELS"),
    ("left=eight", "whole number"),
])
def test_bad_specifications(text, fragment):
    with pytest.raises(outpaint.OutpaintError, match=fragment):
        outpaint.parse(text)


def test_outpaint_with_a_9_channel_unet_equals_diffusers(ort_pipelines, tiny_pipeline):
    image = _image(24, 16, 2)
    padded, mask, _ = _rule(image, left=8, bottom=8)
    ref = reference_pipeline(tiny_pipeline("sd15-inpaint"))
    ref.scheduler = diffusers_scheduler(ref, "euler")
    theirs = ref("a wide landscape", image=padded, mask_image=mask, num_inference_steps=3, guidance_scale=7.5,
                 height=24, width=32, generator=[torch.Generator().manual_seed(5)], output_type="np").images
    ours = ort_pipelines("sd15-inpaint").generate(Request.of(
        prompt="a wide landscape", init_image=image, outpaint={"left": 8, "bottom": 8}, steps=3, guidance=7.5,
        sampler="euler", seed=5))
    assert ours[0].size == (32, 24)
    assert_same_images("sd15-inpaint-outpaint", ours, theirs)
    new = np.asarray(ours[0]).astype(int)[16:, :]  # the bottom margin was repainted, not left as the edge fill
    assert np.abs(new - np.asarray(padded).astype(int)[16:, :]).max() > 8


def test_outpaint_with_mask_blending_and_a_soft_border_equals_diffusers_with_its_overlay(ort_pipelines, tiny_pipeline):
    image = _image(16, 16, 3)
    padded, mask, soft = _rule(image, right=16, blur=4)
    ref = reference_pipeline(tiny_pipeline("sd15"), "StableDiffusionInpaintPipeline")
    ref.scheduler = diffusers_scheduler(ref, "euler")
    theirs = ref("a long corridor", image=padded, mask_image=mask, num_inference_steps=3, guidance_scale=7.5,
                 height=16, width=32, generator=[torch.Generator().manual_seed(6)]).images
    theirs = [ref.image_processor.apply_overlay(soft, padded, theirs[0])]
    ours = ort_pipelines("sd15").generate(Request.of(
        prompt="a long corridor", init_image=image, outpaint="right=16,blur=4", steps=3, guidance=7.5,
        sampler="euler", seed=6))
    assert_same_images("sd15-outpaint-blend-soft", ours, theirs)
    a = np.asarray(ours[0]).astype(int)
    # far from the seam: the original itself (apply_overlay's premultiplied alpha rounds by up to one level)
    assert np.abs(a[:, :4] - np.asarray(image).astype(int)[:, :4]).max() <= 1
    assert np.abs(a[:, 20:] - np.asarray(padded).astype(int)[:, 20:]).max() > 8  # the new area: generated


@pytest.fixture(scope="module")
def inpaint_dir(exported):
    return open_dir(exported("sd15-inpaint", "fp32"))


@pytest.mark.parametrize("fields,field,fragment", [
    ({"outpaint": "left=-8"}, "outpaint", "must not be negative"),
    ({"outpaint": {"left": 4}}, "outpaint", "multiple of 8"),
    ({"outpaint": "left=8", "width": 48}, "width", "set by the outpaint margins"),
    ({"outpaint": "left=8", "mask": Image.new("L", (16, 16))}, "mask", "builds its own mask"),
    ({"outpaint": "left=8,blur=12"}, "outpaint", "more than half"),
    ({"outpaint": "left=1024,top=1024"}, "outpaint", "pixels; at most"),
])
def test_bad_requests_name_the_field(inpaint_dir, fields, field, fragment):
    request = Request.of(prompt="x", init_image=_image(16, 16, 0), **fields)
    with pytest.raises(InvalidRequest, match=fragment) as e:
        validate(request, inpaint_dir, Limits(max_pixels=1024 * 1024))
    assert e.value.field == field


def test_without_an_init_image(inpaint_dir):
    with pytest.raises(InvalidRequest, match="needs an init image") as e:
        validate(Request.of(prompt="x", outpaint="left=8"), inpaint_dir)
    assert e.value.field == "outpaint"


def test_the_request_round_trips_and_validates_to_an_inpainting_job(inpaint_dir):
    request = Request.of(prompt="x", init_image=_image(16, 16, 0), outpaint={"top": 8, "fill": "noise"}, seed=3)
    assert Request.from_dict(request.to_dict(encode_images=True)).images.outpaint == {"top": 8, "fill": "noise"}
    job = validate(request, inpaint_dir)
    assert (job.width, job.height) == (16, 24) and job.mask is not None and job.overlay is None


def test_cli_bad_margin_is_one_line_and_exit_2(exported, tmp_path):
    init = tmp_path / "in.png"
    _image(16, 16, 0).save(init)
    result = run_sdrt("run", str(exported("sd15-inpaint", "fp32")), "x", "--init-image", str(init),
                      "--outpaint", "left=12", "-o", str(tmp_path / "out.png"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: --outpaint left must be a multiple of 8 (got 12; 8 or 16 would do)"]
    assert not (tmp_path / "out.png").exists()


def test_a1111_img2img_with_the_outpaint_extension(ort_pipelines, exported):
    import base64
    import io

    from fastapi.testclient import TestClient

    from sdrt.serve.app import create_app
    from sdrt.serve.edge import ServeConfig

    engine, pipe = exported("sd15", "fp32"), ort_pipelines("sd15")
    image = _image(16, 16, 4)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    body = {"prompt": "a harbour", "init_images": [base64.b64encode(buf.getvalue()).decode()], "seed": 2,
            "steps": 2, "cfg_scale": 5.0, "sampler_name": "Euler", "denoising_strength": 1.0, "width": 32,
            "height": 16, "outpaint": {"right": 16}, "mask_blur": 4, "inpainting_fill": 1}
    config = ServeConfig(engine_dir=engine, max_batch=2, max_wait_ms=5, warmup=False, backend="ort-cpu")
    with TestClient(create_app(config, pipeline=pipe)) as client:
        out = client.post("/sdapi/v1/img2img", json=body)
        assert out.status_code == 200, out.text
        served = Image.open(io.BytesIO(base64.b64decode(out.json()["images"][0])))
        direct = pipe.generate(Request.of(prompt="a harbour", init_image=image, seed=2, steps=2, guidance=5.0,
                                          sampler="euler", strength=1.0,
                                          outpaint={"right": 16, "blur": 4, "fill": "edge"}))[0]
        assert served.size == (32, 16)
        assert np.abs(np.asarray(served.convert("RGB"), int) - np.asarray(direct, int)).max() <= 1
        for change, field in (({"inpainting_fill": 3}, "inpainting_fill"), ({"outpaint": {"right": 12}, "width": None}, "outpaint"),
                              ({"width": 48}, "width"), ({"outpaint": [16]}, "outpaint"),
                              ({"inpainting_fill": [1]}, "inpainting_fill"), ({"mask_blur": [4]}, "outpaint"),
                              ({"outpaint": {"right": 16, "fill": [1]}, "inpainting_fill": None}, "outpaint")):
            bad = client.post("/sdapi/v1/img2img", json={**body, **change})
            assert bad.status_code == 422 and bad.json()["error"]["field"] == field, bad.text
