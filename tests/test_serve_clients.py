"""Clients users already have, unchanged, against `sdrt serve` on loopback: the official `openai` SDK and `webuiapi`
(AUTOMATIC1111's common client), as far as issue 25 goes in this step: model look-up by id, random seeds a
JavaScript client can send back, webuiapi's model helpers, img2img with webuiapi's defaults, png-info."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import LoopbackServer

openai = pytest.importorskip("openai", reason="the openai SDK is a test extra")
webuiapi = pytest.importorskip("webuiapi", reason="webuiapi is a test extra")

SIZE, STEPS = 32, 3


@pytest.fixture(scope="module")
def server(exported):
    from sdrt.runtime.pipeline import Pipeline

    engine = exported("sd15", "fp32")
    s = LoopbackServer(engine, Pipeline.load(engine, backend="ort-cpu"), model_name="tiny-sd15")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def webui(server):
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


def test_the_sdk_retrieves_the_served_model_by_id_and_404s_another(sdk):
    model = sdk.models.retrieve("tiny-sd15")
    assert model.id == "tiny-sd15" and model.object == "model"
    assert [m.id for m in sdk.models.list()] == ["tiny-sd15"]
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("dall-e-3")


def test_random_seeds_fit_a_javascript_number_and_give_the_image_again(sdk, server):
    seeds = []
    for _ in range(3):
        response = httpx.post(server.url + "/v1/images/generations", timeout=120,
                              json={"prompt": "a cat", "size": f"{SIZE}x{SIZE}", "steps": STEPS, "n": 2})
        data = response.json()["data"]
        seeds += [d["seed"] for d in data]
        assert data[1]["seed"] == data[0]["seed"] + 1
    assert all(0 <= s < 2 ** 53 for s in seeds) and len(set(seeds)) == len(seeds)
    first = httpx.post(server.url + "/v1/images/generations", timeout=120,
                       json={"prompt": "a dog", "size": f"{SIZE}x{SIZE}", "steps": STEPS}).json()["data"][0]
    again = sdk.images.generate(prompt="a dog", size=f"{SIZE}x{SIZE}",  # the SDK sends the seed back as a number
                                extra_body={"steps": STEPS, "seed": json.loads(json.dumps(first["seed"]))})
    assert again.data[0].b64_json == first["b64_json"]


def test_webuiapi_model_helpers_and_options(webui, server):
    title = httpx.get(server.url + "/sdapi/v1/sd-models").json()[0]["title"]  # "NAME [hash]", as A1111 lists it
    assert title.startswith("tiny-sd15") and webui.util_get_current_model() == title
    webui.util_set_model("tiny-sd15")  # looks the title up, posts /sdapi/v1/options {"sd_model_checkpoint": title}
    refused = httpx.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "other"})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "sd_model_checkpoint"
    unknown = httpx.post(server.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "CLIP_stop_at_last_layers"
    assert httpx.get(server.url + "/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert httpx.get(server.url + "/sdapi/v1/cmd-flags").json()["api"] is True


def test_webuiapi_img2img_with_its_defaults_and_png_info(webui, server):
    start = Image.fromarray(np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    result = webui.img2img(images=[start], prompt="a red circle", steps=STEPS, seed=9, width=SIZE, height=SIZE,
                           denoising_strength=0.6, sampler_name="Euler")  # image_cfg_scale 1.5, as webuiapi sends
    assert result.image.size == (SIZE, SIZE) and result.info["all_seeds"] == [9]
    buffer = io.BytesIO()
    result.image.save(buffer, "PNG", pnginfo=_png_text(result.info["infotexts"][0]))
    info = httpx.post(server.url + "/sdapi/v1/png-info",
                      json={"image": base64.b64encode(buffer.getvalue()).decode()}).json()
    assert info["info"] == result.info["infotexts"][0]
    assert info["parameters"]["Prompt"] == "a red circle" and info["parameters"]["Seed"] == "9"
    assert info["parameters"]["Steps"] == str(STEPS) and info["parameters"]["Size-1"] == str(SIZE)


def _png_text(text: str):
    from PIL import PngImagePlugin

    chunk = PngImagePlugin.PngInfo()
    chunk.add_text("parameters", text)
    return chunk


def test_http_basic_auth_as_automatic1111s_api_auth_for_webuiapis_set_auth(exported):
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.serve.edge import parse_api_auth

    engine = exported("sd15", "fp32")
    s = LoopbackServer(engine, Pipeline.load(engine, backend="ort-cpu"), api_key="k3y",
                       api_auth=parse_api_auth("ann:pw1,bob:pw2"))
    try:
        host, port = s.url.removeprefix("http://").split(":")
        client = webuiapi.WebUIApi(host=host, port=int(port))
        refused = httpx.get(s.url + "/sdapi/v1/sd-models")
        assert refused.status_code == 401 and "Basic" in refused.headers["www-authenticate"]
        client.set_auth("bob", "pw2")
        assert client.util_get_current_model().startswith("sd15")
        assert httpx.get(s.url + "/sdapi/v1/sd-models", auth=("ann", "pw1")).status_code == 200
        assert httpx.get(s.url + "/sdapi/v1/sd-models", auth=("ann", "pw2")).status_code == 401
        assert httpx.get(s.url + "/sdapi/v1/sd-models", headers={"Authorization": "Bearer k3y"}).status_code == 200
    finally:
        s.stop()
    with pytest.raises(Exception, match="user:password"):
        parse_api_auth("ann")
