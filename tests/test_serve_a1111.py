"""AUTOMATIC1111's API through `webuiapi`, unchanged, against `sdrt serve` on loopback: inpainting with webuiapi's
defaults (blur 4, fill, only masked), progress / interrupt / skip from a second thread, the generation info and PNG
parameters A1111 writes, and (where configured) the upscaler and ControlNet routes."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import LoopbackServer

webuiapi = pytest.importorskip("webuiapi", reason="webuiapi is a test extra")

SIZE, STEPS = 32, 3


@pytest.fixture(scope="module")
def pipe(exported):
    from sdrt.runtime.pipeline import Pipeline

    return Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu")


@pytest.fixture(scope="module")
def server(exported, pipe):
    s = LoopbackServer(exported("sd15", "fp32"), pipe, model_name="tiny-sd15")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def webui(server):
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=STEPS)


def _picture(width: int, height: int, seed: int = 3) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 100.0)], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 25, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def test_webuiapi_inpainting_with_its_defaults_is_a1111s(webui, pipe):
    from sdrt.runtime.request import Request
    from sdrt.runtime.tasks import inpaint_a1111

    big = _picture(64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (30, 30, 50, 46))
    result = webui.img2img(images=[big], mask_image=mask, prompt="a red ball", seed=11, width=SIZE, height=SIZE)
    out = np.asarray(result.image, int)
    assert out.shape == (64, 64, 3)  # only masked (webuiapi's default): pasted back into the original's size
    far = np.asarray(inpaint_a1111.blur_mask(mask, 4, 4)) == 0  # webuiapi's mask_blur 4
    assert far.sum() > 1500 and np.array_equal(out[far], np.asarray(big, int)[far])
    # the same through sdrt's own request fields (A1111's defaults: blur 4, fill, only masked, padding 0)
    own = pipe.generate(Request.of(prompt="a red ball", negative_prompt="", init_image=big, mask=mask, strength=0.75,
                                   steps=STEPS, seed=11, width=SIZE, height=SIZE, sampler="Euler", guidance=7.0,
                                   inpaint={"mask_blur": 4, "fill": "fill", "only_masked": True}))[0]
    assert np.abs(out - np.asarray(own, int)).max() <= 1
    whole = webui.img2img(images=[big], mask_image=mask, prompt="a red ball", seed=11, width=64, height=64,
                          inpaint_full_res=False, inpainting_fill=1, mask_blur=0)
    inside = np.asarray(mask) == 255
    assert np.abs(np.asarray(whole.image, int)[inside] - out[inside]).mean() > 3
    assert np.array_equal(np.asarray(whole.image, int)[~inside], np.asarray(big, int)[~inside])
    info = result.info
    assert info["denoising_strength"] == 0.75 and info["extra_generation_params"]["Mask blur"] == 4
    text = info["infotexts"][0]
    assert "Denoising strength: 0.75" in text and "Mask blur: 4" in text and "Inpaint area: Only masked" in text


def test_inpainting_fields_are_checked(server):
    image = base64.b64encode(_png(_picture(SIZE, SIZE))).decode()
    mask = base64.b64encode(_png(Image.new("L", (SIZE, SIZE), 255))).decode()
    body = {"prompt": "x", "init_images": [image], "mask": mask, "steps": 2, "width": SIZE, "height": SIZE}
    for field, value in (("inpainting_fill", 4), ("mask_blur", -1), ("inpaint_full_res", "yes"),
                         ("inpaint_full_res_padding", -8), ("mask_blur_x", 1.5)):
        r = httpx.post(server.url + "/sdapi/v1/img2img", json={**body, field: value}, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, (field, r.text)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_progress_and_interrupt_from_another_thread(webui, server):
    idle = webui.get_progress()
    assert idle["state"]["job_count"] == 0 and idle["progress"] == 0
    answer = {}

    def run():
        started = time.monotonic()
        answer["result"] = webui.txt2img(prompt="a long one", steps=400, width=SIZE, height=SIZE, seed=4)
        answer["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(seen) < 2:
        p = webui.get_progress()
        if p["state"]["sampling_step"] > (seen[-1]["state"]["sampling_step"] if seen else 0):
            seen.append(p)
        time.sleep(0.05)
    assert len(seen) == 2, "no progress seen"
    first, second = seen
    assert second["state"]["sampling_step"] > first["state"]["sampling_step"]
    assert second["state"]["sampling_steps"] == 400 and second["state"]["job_count"] == 1
    assert 0 < first["progress"] < second["progress"] < 0.5 and second["eta_relative"] > 0
    preview = Image.open(io.BytesIO(base64.b64decode(second["current_image"])))
    assert preview.format == "PNG" and preview.size == (SIZE // 2, SIZE // 2)  # the tiny VAE's factor is 2
    skipped = httpx.get(server.url + "/sdapi/v1/progress", params={"skip_current_image": "true"}).json()
    assert skipped["current_image"] is None
    interrupted_at = time.monotonic()
    webui.interrupt()
    thread.join(60)
    assert not thread.is_alive()
    assert time.monotonic() - interrupted_at < 10  # far from the 400 steps
    result = answer["result"]
    assert result.image.size == (SIZE, SIZE) and result.info["all_seeds"] == [4]
    assert webui.get_progress()["state"]["job_count"] == 0


def test_info_and_png_parameters_as_a1111_writes_them(webui, server):
    result = webui.txt2img(prompt="a blue box", negative_prompt="blur", seed=21, width=SIZE, height=SIZE,
                           sampler_name="Euler", scheduler="Automatic")
    info = result.info
    short = httpx.get(server.url + "/sdapi/v1/sd-models").json()[0]["hash"]
    assert info["sd_model_hash"] == short and info["scheduler"] == "Automatic" and info["sampler_name"] == "Euler"
    assert info["version"].startswith("sdrt")
    png = base64.b64decode(result.json["images"][0])
    parsed = httpx.post(server.url + "/sdapi/v1/png-info", json={"image": base64.b64encode(png).decode()}).json()
    assert parsed["info"] == info["infotexts"][0]
    params = parsed["parameters"]
    assert params["Prompt"] == "a blue box" and params["Negative prompt"] == "blur" and params["Seed"] == "21"
    assert params["Schedule type"] == "Automatic" and params["Sampler"] == "Euler"
    assert params["Model hash"] == short and params["Model"] == "tiny-sd15" and params["Version"] == info["version"]
    assert "Denoising strength" not in params  # txt2img without hires fix: A1111 writes none


def test_upscalers_and_extra_single_image(webui, server):
    names = [u["name"] for u in webui.get_upscalers()]
    assert names == ["None", "Lanczos", "Nearest"]
    image = _picture(20, 12)
    out = webui.extra_single_image(image, upscaler_1="Lanczos", upscaling_resize=3)
    assert out.image.size == (60, 36)
    assert np.array_equal(np.asarray(out.image), np.asarray(image.resize((60, 36), Image.Resampling.LANCZOS)))
    nearest = webui.extra_single_image(image, upscaler_1="Nearest", upscaling_resize=2)
    assert np.array_equal(np.asarray(nearest.image)[::2, ::2], np.asarray(image))
    body = {"image": base64.b64encode(_png(image)).decode(), "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 4}
    r = httpx.post(server.url + "/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 422 and r.json()["error"]["field"] == "upscaler_1" and "Lanczos" in r.text
    r = httpx.post(server.url + "/sdapi/v1/extra-single-image", json={**body, "upscaler_1": "Lanczos",
                                                                       "gfpgan_visibility": 0.5})
    assert r.status_code == 422 and r.json()["error"]["field"] == "gfpgan_visibility"
