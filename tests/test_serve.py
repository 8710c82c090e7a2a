"""`sdrt serve` in process (ASGI, fastapi's TestClient): the OpenAI and AUTOMATIC1111 routes, images equal to
`sdrt run`'s, metadata, the model and operations routes, metrics, the error shape for bad input, and a property
test that no body makes a POST route answer 5xx."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import run_sdrt
from sdrt.runtime.limits import Limits
from sdrt.runtime.pipeline import Pipeline
from sdrt.serve import a1111, openai
from sdrt.serve.app import create_app
from sdrt.serve.edge import ServeConfig

GEN = "/v1/images/generations"
TXT = "/sdapi/v1/txt2img"
IMG = "/sdapi/v1/img2img"
SMALL = {"size": "32x32", "steps": 3, "guidance_scale": 5.0, "sampler": "euler_a"}
A_SMALL = {"width": 32, "height": 32, "steps": 3, "cfg_scale": 5.0, "sampler_name": "Euler a"}


@pytest.fixture(scope="module")
def engine(exported):
    return exported("sd15", "fp32")


@pytest.fixture(scope="module")
def pipe(engine):
    return Pipeline.load(engine, backend="ort-cpu")


def _client(engine, pipe, **config) -> TestClient:
    config = {"max_batch": 4, "max_wait_ms": 20, "warmup": False, "backend": "ort-cpu", **config}
    return TestClient(create_app(ServeConfig(engine_dir=engine, **config), pipeline=pipe))


@pytest.fixture(scope="module")
def client(engine, pipe):
    with _client(engine, pipe) as c:
        yield c


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a.convert("RGB"), dtype=int) - np.asarray(b.convert("RGB"), dtype=int)).max())


def _error(response, status: int, field: str | None = "any") -> dict:
    """The error body: OpenAI's error object on /v1/ routes (the field in `param`), sdrt's elsewhere."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    if response.request.url.path.startswith("/v1/"):
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        named = error["param"]
    else:
        assert set(error) == {"type", "field", "message"} and error["message"]
        named = error["field"]
    if field != "any":
        assert named == field, error
    return error


# ---- images ------------------------------------------------------------------------------------------------------

def test_openai_images_equal_sdrt_run_and_carry_its_metadata(client, engine, tmp_path):
    response = client.post(GEN, json={"prompt": "a red fox", "n": 2, "seed": 41, **SMALL})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int) and body["size"] == "32x32" and body["output_format"] == "png"
    assert [d["seed"] for d in body["data"]] == [41, 42]
    out = tmp_path / "fox.png"
    result = run_sdrt("run", str(engine), "a red fox", "--seed", "41", "--batch", "2", "--width", "32", "--height",
                      "32", "--steps", "3", "--guidance", "5", "--sampler", "euler_a", "--backend", "ort-cpu",
                      "-o", str(out))
    assert result.returncode == 0, result.stderr
    for i, item in enumerate(body["data"]):
        served = _png(item["b64_json"])
        with Image.open(tmp_path / f"fox-{i}.png") as written:
            written.load()
            assert _diff(served, written) <= 1
            assert served.info["parameters"] == written.info["parameters"]
    assert "Seed: 42" in _png(body["data"][1]["b64_json"]).info["parameters"]
    assert body["timings"]["total"] > 0 and body["timings"]["batch_size"] >= 2


def test_accept_image_png_returns_the_raw_png(client):
    response = client.post(GEN, json={"prompt": "a lighthouse", "seed": 3, **SMALL}, headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (32, 32) and "Seed: 3" in image.info["parameters"]
    assert response.headers["x-seed"] == "3"
    same = client.post(GEN, json={"prompt": "a lighthouse", "seed": 3, **SMALL}).json()
    assert _diff(image, _png(same["data"][0]["b64_json"])) <= 1
    _error(client.post(GEN, json={"prompt": "x", "n": 2, **SMALL}, headers={"Accept": "image/png"}), 400, "n")


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(client, fmt, pil):
    body = client.post(GEN, json={"prompt": "a boat", "seed": 1, "output_format": fmt, "output_compression": 80,
                                  **SMALL}).json()
    image = _png(body["data"][0]["b64_json"])
    assert image.format == pil and body["output_format"] == fmt
    comment = image.getexif().get_ifd(0x8769).get(0x9286)
    assert comment.startswith(b"UNICODE\0") and "Seed: 1".encode("utf-16-be") in comment


def test_random_seed_is_reported(client):
    a, b = (client.post(GEN, json={"prompt": "a cat", **SMALL}).json()["data"][0]["seed"] for _ in range(2))
    assert a != b and 0 <= a < 2 ** 64


def test_a1111_txt2img_n_iter_continues_seeds_and_equals_openai(client):
    body = {"prompt": "a castle", "negative_prompt": "fog", "seed": 100, "batch_size": 2, "n_iter": 2, **A_SMALL}
    response = client.post(TXT, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    info = json.loads(data["info"])
    assert info["all_seeds"] == [100, 101, 102, 103] and info["seed"] == 100
    assert info["all_prompts"] == ["a castle"] * 4 and info["all_negative_prompts"] == ["fog"] * 4
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 5.0 and info["steps"] == 3
    assert len(data["images"]) == 4 and data["parameters"] == body
    text = info["infotexts"][3]
    assert "Seed: 103, Size: 32x32, Model hash: " in text and ", Model: sd15-fp32, Version: " in text
    openai = client.post(GEN, json={"prompt": "a castle", "negative_prompt": "fog", "seed": 102, "n": 2,
                                    **SMALL}).json()
    for a, b in zip(data["images"][2:], openai["data"]):
        assert _diff(_png(a), _png(b["b64_json"])) <= 1
        assert _png(a).info["parameters"] == info["infotexts"][2 + data["images"][2:].index(a)]


def test_a1111_webuiapi_style_defaults_are_accepted(client):
    """What webuiapi's txt2img sends by default, with sdrt's size and steps."""
    body = {"enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
            "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
            "prompt": "a tree", "styles": [], "seed": 5, "subseed": -1, "subseed_strength": 0.0,
            "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": None, "batch_size": 1, "n_iter": 1,
            "steps": 3, "cfg_scale": 7.0, "width": 32, "height": 32, "restore_faces": False, "tiling": False,
            "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0,
            "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
            "override_settings_restore_afterwards": True, "script_args": [], "script_name": None,
            "send_images": True, "save_images": False, "alwayson_scripts": {}, "sampler_index": "Euler a"}
    response = client.post(TXT, json=body)
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["info"])["sampler_name"] == "Euler a"


@pytest.mark.parametrize("field,value", [
    ("restore_faces", True), ("tiling", True), ("enable_hr", True), ("subseed_strength", 0.5), ("styles", ["x"]),
    ("s_churn", 1.0), ("save_images", True), ("script_name", "x/y plot"), ("alwayson_scripts", {"adetailer": {"args": []}}),
    ("override_settings", {"CLIP_stop_at_last_layers": 2}), ("eta", 0.3), ("refiner_checkpoint", "sdxl-refiner"),
    ("hires_fix_please", 1)])
def test_a1111_fields_sdrt_does_not_do_are_named(client, field, value):
    error = _error(client.post(TXT, json={"prompt": "x", **A_SMALL, field: value}), 422, field)
    assert field in error["message"]


def test_a1111_send_images_false_and_extra_networks(client):
    data = client.post(TXT, json={"prompt": "x", "seed": 1, "send_images": False, **A_SMALL}).json()
    assert data["images"] == [] and json.loads(data["info"])["all_seeds"] == [1]
    _error(client.post(TXT, json={"prompt": "x <lora:foo:1>", **A_SMALL}), 422, "prompt")


def test_a1111_img2img_and_inpaint(client):
    source = client.post(GEN, json={"prompt": "a house", "seed": 9, **SMALL}).json()["data"][0]["b64_json"]
    body = {"prompt": "a house at night", "init_images": [source], "denoising_strength": 0.5, "seed": 4,
            "resize_mode": 0, "mask_blur": 4, "inpainting_fill": 0, **A_SMALL}
    data = client.post(IMG, json=body)
    assert data.status_code == 200, data.text
    info = json.loads(data.json()["info"])
    assert info["denoising_strength"] == 0.5 and "init_images" not in data.json()["parameters"]
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    masked = {**body, "mask": base64.b64encode(buf.getvalue()).decode(), "mask_blur": 0, "inpainting_fill": 1,
              "include_init_images": True}
    out = client.post(IMG, json=masked)
    assert out.status_code == 200, out.text
    assert out.json()["parameters"]["init_images"] == [source]
    result, original = np.asarray(_png(out.json()["images"][0]), int), np.asarray(_png(source), int)
    assert np.abs(result[:6, :6] - original[:6, :6]).mean() < np.abs(result[12:20, 12:20] -
                                                                       original[12:20, 12:20]).mean()
    _error(client.post(IMG, json={**masked, "mask_blur": -1}), 422, "mask_blur")
    _error(client.post(IMG, json={**body, "init_images": []}), 422, "init_images")
    _error(client.post(IMG, json={**body, "init_images": ["not base64!"]}), 422, "init_images")
    _error(client.post(IMG, json={**body, "denoising_strength": 1.5}), 422, "denoising_strength")
    _error(client.post(IMG, json={**body, "denoising_strength": 0.01, "steps": 2}), 422, "denoising_strength")


# ---- what the server says about itself ---------------------------------------------------------------------------

def test_models_samplers_and_operations(client):
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "sd15-fp32" and model["family"] == "sd15" and model["default_size"] == 32
    assert model["size_multiple"] == 2 and "euler_a" in model["samplers"] and model["img2img"] is True
    assert model["limits"]["max_images_per_request"] == 16 and model["ready"] is True
    samplers = client.get("/sdapi/v1/samplers").json()
    names = {s["name"] for s in samplers}
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC"} <= names
    assert {s["name"] for s in client.get("/sdapi/v1/schedulers").json()} >= {"automatic", "karras"}
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "sd15-fp32"
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/openapi.json").json()["paths"][GEN]["post"]["requestBody"]


def test_metrics(client):
    client.post(GEN, json={"prompt": "metrics", **SMALL})
    client.post(GEN, json={"prompt": 5})
    text = client.get("/metrics").text
    for name in ("sdrt_queue_depth", "sdrt_queue_wait_seconds_bucket", "sdrt_batch_images_bucket",
                 'sdrt_stage_seconds_bucket{le="0.005",stage="steps"}', "sdrt_generation_seconds_count",
                 "sdrt_http_request_duration_seconds_bucket", "process_resident_memory_bytes", "sdrt_ready 1.0"):
        assert name in text, name
    assert 'sdrt_http_requests_total{method="POST",route="/v1/images/generations",status="200"}' in text
    assert 'sdrt_http_requests_total{method="POST",route="/v1/images/generations",status="400"}' in text
    client.get("/no/such/route")
    assert 'route="unmatched",status="404"' in client.get("/metrics").text


# ---- errors --------------------------------------------------------------------------------------------------------

BAD = [  # (route, body, status, field)
    (GEN, b"{not json", 400, "body"),
    (GEN, b"", 400, "body"),
    (GEN, b"[1, 2]", 400, "body"),
    (GEN, b'"a prompt"', 400, "body"),
    (GEN, b"\xff\xfe\x00garbage", 400, "body"),
    (GEN, b"[" * 100_000 + b"]" * 100_000, 400, "body"),
    (GEN, b'{"prompt": "\\ud800"}', 400, "prompt"),
    (GEN, {"n": 1}, 400, "prompt"),
    (GEN, {"prompt": 5}, 400, "prompt"),
    (GEN, {"prompt": "x" * (10 * 2 ** 20)}, 400, "prompt"),
    (GEN, {"prompt": "x", "n": 10 ** 6}, 400, "n"),
    (GEN, {"prompt": "x", "n": 0}, 400, "n"),
    (GEN, {"prompt": "x", "n": "2"}, 400, "n"),
    (GEN, {"prompt": "x", "size": "100000x100000"}, 400, "size"),
    (GEN, {"prompt": "x", "size": "33x32"}, 400, "size"),
    (GEN, {"prompt": "x", "size": "0x32"}, 400, "size"),
    (GEN, {"prompt": "x", "size": "big"}, 400, "size"),
    (GEN, {"prompt": "x", "size": [32, 32]}, 400, "size"),
    (GEN, {"prompt": "x", "steps": 0}, 400, "steps"),
    (GEN, {"prompt": "x", "steps": 10 ** 9}, 400, "steps"),
    (GEN, {"prompt": "x", "steps": 2.5}, 400, "steps"),
    (GEN, {"prompt": "x", "num_inference_steps": "many"}, 400, "num_inference_steps"),
    (GEN, {"prompt": "x", "steps": 3, "num_inference_steps": 3}, 400, "num_inference_steps"),
    (GEN, {"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale"),
    (GEN, {"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale"),
    (GEN, {"prompt": "x", "guidance_scale": 1e9}, 400, "guidance_scale"),
    (GEN, b'{"prompt": "x", "guidance_scale": NaN}', 400, "guidance_scale"),
    (GEN, {"prompt": "x", "guidance_rescale": 2}, 400, "guidance_rescale"),
    (GEN, {"prompt": "x", "sampler": "dpm_fast"}, 400, "sampler"),
    (GEN, {"prompt": "x", "sampler": 7}, 400, "sampler"),
    (GEN, {"prompt": "x", "sampler": "euler_a", "schedule": "karras"}, 400, "sampler"),
    (GEN, {"prompt": "x", "schedule": "zigzag"}, 400, "schedule"),
    (GEN, {"prompt": "x", "schedule": {}}, 400, "schedule"),
    (GEN, {"prompt": "x", "sampler": "DPM++ 2M Karras", "schedule": "exponential"}, 400, "schedule"),
    (GEN, {"prompt": "x", "seed": -2}, 400, "seed"),
    (GEN, {"prompt": "x", "seed": 2 ** 64}, 400, "seed"),
    (GEN, {"prompt": "x", "seed": 2 ** 64 - 1, "n": 2}, 400, "seed"),
    (GEN, {"prompt": "x", "seed": True}, 400, "seed"),
    (GEN, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, "body"),
    (GEN, {"prompt": "x", "negative_prompt": ["a", "b"]}, 400, "negative_prompt"),
    (GEN, {"prompt": "x", "negative_prompt": 3}, 400, "negative_prompt"),
    (GEN, {"prompt": "x", "response_format": "url"}, 400, "response_format"),
    (GEN, {"prompt": "x", "output_format": "gif"}, 400, "output_format"),
    (GEN, {"prompt": "x", "output_compression": 50}, 400, "output_compression"),
    (GEN, {"prompt": "x", "model": "dall-e-3"}, 400, "model"),
    (GEN, {"prompt": "x", "stream": 1}, 400, "stream"),
    (GEN, {"prompt": "x", "quality": "ultra"}, 400, "quality"),
    (GEN, {"prompt": "x", "background": "transparent"}, 400, "background"),
    (TXT, {"prompt": "x", "width": 31, "height": 32}, 422, "width"),
    (TXT, {"prompt": "x", "batch_size": 17}, 422, "batch_size"),
    (TXT, {"prompt": "x", "n_iter": 10 ** 6}, 422, "n_iter"),
    (TXT, {"prompt": "x", "cfg_scale": "x"}, 422, "cfg_scale"),
    (TXT, {"prompt": "x", "sampler_name": "Nope"}, 422, "sampler_name"),
    (TXT, {"prompt": "x", "sampler_index": "Nope"}, 422, "sampler_index"),
    (TXT, {"prompt": "x", "scheduler": "Align Your Steps"}, 422, "scheduler"),
    (TXT, {"prompt": "x", "seed": "abc"}, 422, "seed"),
    (TXT, {"prompt": ["a", "b"]}, 422, "prompt"),
    (IMG, {"prompt": "x", "init_images": "abc"}, 422, "init_images"),
    (IMG, {"prompt": "x", "width": 32, "height": 32, "steps": 2,
           "init_images": [base64.b64encode(b"\x89PNG not really").decode()]}, 422, "init_images"),
]


@pytest.mark.parametrize("route,body,status,field", BAD, ids=[f"{i}-{b[0].rsplit('/', 1)[1]}"
                                                              for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(client, route, body, status, field):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    _error(client.post(route, content=content, headers={"content-type": "application/json"}), status, field)


def test_tiny_init_image_and_memory_limit(client, engine, pipe):
    small = io.BytesIO()
    Image.new("RGB", (4, 4)).save(small, format="PNG")
    _error(client.post(IMG, json={"prompt": "x", "init_images": [base64.b64encode(small.getvalue()).decode()],
                                  **A_SMALL}), 422, "init_images")
    with _client(engine, pipe, limits=Limits(max_memory_bytes=1024)) as tight:
        _error(tight.post(GEN, json={"prompt": "x", **SMALL}), 400, "size")


def test_after_bad_input_the_next_valid_request_is_answered(client):
    for route, body, status, field in BAD[:12]:
        client.post(route, content=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert client.post(GEN, json={"prompt": "still here", **SMALL}).status_code == 200


def test_body_limit_from_content_length_and_while_reading(engine, pipe):
    with _client(engine, pipe, max_body_bytes=1000) as small:
        _error(small.post(GEN, content=b"{" + b" " * 2000 + b"}"), 413, "body")

        def chunks():  # no Content-Length: chunked transfer
            for _ in range(10):
                yield b" " * 300

        _error(small.post(GEN, content=chunks()), 413, "body")
        assert small.post(GEN, json={"prompt": "ok", **SMALL}).status_code == 200


def test_unknown_routes_and_methods_answer_json(client):
    _error(client.get("/v1/nothing"), 404, None)
    _error(client.post("/sdapi/v1/nothing"), 404, None)
    _error(client.post("/sdapi/v1/progress"), 405, None)  # a GET route (AUTOMATIC1111's progress)
    _error(client.get(GEN), 405, None)


def test_api_key(engine, pipe, monkeypatch):
    with _client(engine, pipe, api_key="s3cret") as guarded:
        assert _error(guarded.post(GEN, json={"prompt": "x", **SMALL}), 401)["code"] == "invalid_api_key"
        assert _error(guarded.get("/sdapi/v1/sd-models"), 401)["type"] == "unauthorized"
        _error(guarded.post(GEN, json={"prompt": "x", **SMALL}, headers={"Authorization": "Bearer wrong"}), 401)
        _error(guarded.get("/metrics"), 401)
        assert guarded.get("/healthz").status_code == 200 and guarded.get("/readyz").status_code == 200
        ok = guarded.post(GEN, json={"prompt": "x", **SMALL}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_cli_refuses_an_unset_api_key_variable(engine):
    result = run_sdrt("serve", str(engine), "--api-key-env", "SDRT_TEST_SURELY_UNSET_KEY", "--port", "0",
                      env={"SDRT_TEST_SURELY_UNSET_KEY": ""}, timeout=120)
    assert result.returncode == 2 and "SDRT_TEST_SURELY_UNSET_KEY" in result.stderr, result.stderr


def test_draining_answers_503(engine, pipe):
    with _client(engine, pipe) as c:
        c.app.state.sdrt.begin_drain()
        _error(c.post(GEN, json={"prompt": "x", **SMALL}), 503)
        _error(c.get("/readyz"), 503)
        assert c.get("/healthz").status_code == 200


# ---- no body makes a POST route answer 5xx -----------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                                      max_size=4),
                    max_leaves=12)
PLAUSIBLE = st.one_of(JSON, st.integers(-3, 70), st.sampled_from(
    ["32x32", "64x32", "auto", "31x32", "Euler a", "DPM++ 2M Karras", "euler", "karras", "Karras", "png", "jpeg",
     "b64_json", "sd15-fp32", "", "<lora:x:1>", 0.5, 1.0, -1, 2 ** 64, "iVBORw0KGgo="]))
FIELDS = {GEN: openai.OPENAI_FIELDS,
          TXT: a1111.A1111_USED + tuple(a1111.a1111_neutral("sd15-fp32", False)),
          IMG: a1111.A1111_USED + a1111.A1111_IMG2IMG_USED + tuple(a1111.a1111_neutral("sd15-fp32", True))}


def _b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


SMALL_INT = st.one_of(st.integers(-1, 3), PLAUSIBLE)
NEAR_VALID = {  # values that often pass the edge, so that validation and generation are reached too
    "steps": SMALL_INT, "num_inference_steps": SMALL_INT, "n": SMALL_INT, "batch_size": SMALL_INT,
    "n_iter": SMALL_INT, "size": st.one_of(st.sampled_from(["32x32", "16x32", "32x16", "30x30", "auto"]), PLAUSIBLE),
    "width": st.one_of(st.sampled_from([16, 32, 30, 33]), PLAUSIBLE),
    "height": st.one_of(st.sampled_from([16, 32, 30, 33]), PLAUSIBLE),
    "seed": st.one_of(st.integers(-2, 2 ** 64), PLAUSIBLE),
    "sampler": st.one_of(st.sampled_from(["euler", "Euler a", "DPM++ 2M Karras", "ddim", "heun", "lcm"]), PLAUSIBLE),
    "init_images": st.one_of(st.just([_b64_png(Image.new("RGB", (32, 32), (90, 60, 30)))]), PLAUSIBLE),
    "mask": st.one_of(st.just(_b64_png(Image.new("L", (32, 32), 255))), PLAUSIBLE),
    "denoising_strength": st.one_of(st.floats(0, 1.2), PLAUSIBLE),
}
NEAR_VALID["sampler_name"] = NEAR_VALID["sampler"]


def _valid(route: str):
    """Mostly valid bodies: random combinations of good values (some still conflict, e.g. sampler and schedule)."""
    if route == GEN:
        return st.fixed_dictionaries(
            {"prompt": st.text(max_size=30), "steps": st.integers(1, 2), "size": st.sampled_from(["32x32", "16x32"])},
            optional={"n": st.integers(1, 2), "seed": st.integers(-1, 2 ** 64 - 3),
                      "sampler": st.sampled_from(["euler", "Euler a", "DPM++ 2M Karras", "ddim", "heun", "unipc"]),
                      "schedule": st.sampled_from(["default", "karras", "sgm_uniform", "simple"]),
                      "guidance_scale": st.floats(0, 12), "negative_prompt": st.text(max_size=10),
                      "output_format": st.sampled_from(["png", "jpeg", "webp"]), "model": st.just("sd15-fp32")})
    body = {"prompt": st.text(max_size=30), "steps": st.integers(1, 2), "width": st.sampled_from([16, 32]),
            "height": st.sampled_from([16, 32])}
    if route == IMG:  # two steps at strength ≥ 0.5 leave at least one denoising step
        body["steps"] = st.just(2)
        body["init_images"] = st.just([_b64_png(Image.new("RGB", (32, 32), (90, 60, 30)))])
    optional = {"batch_size": st.integers(1, 2), "n_iter": st.integers(1, 2), "seed": st.integers(-1, 2 ** 32),
                "sampler_name": st.sampled_from(["Euler", "Euler a", "DPM++ 2M", "DDIM", "UniPC"]),
                "scheduler": st.sampled_from(["Automatic", "Karras", "SGM Uniform"]), "cfg_scale": st.floats(0, 12),
                "restore_faces": st.just(False), "eta": st.sampled_from([None, 0, 1.0]),
                "send_images": st.booleans()}
    if route == IMG:
        optional |= {"denoising_strength": st.floats(0.5, 1.0), "mask": st.just(_b64_png(Image.new("L", (32, 32), 255))),
                     "inpainting_mask_invert": st.sampled_from([0, 1])}
    return st.fixed_dictionaries(body, optional=optional)


def _near_valid(route: str):
    used = {GEN: [f for f in openai.OPENAI_FIELDS if f not in ("model", "user", "stream")], TXT: a1111.A1111_USED,
            IMG: a1111.A1111_USED + a1111.A1111_IMG2IMG_USED}[route]
    required = {"prompt": st.text(max_size=30), "steps": st.integers(1, 3)}
    if route == IMG:
        required["init_images"] = NEAR_VALID["init_images"]
    optional = {k: NEAR_VALID.get(k, PLAUSIBLE) for k in used if k not in required}
    return st.fixed_dictionaries(required, optional=optional)


@pytest.fixture(scope="module")
def fuzz_client(engine, pipe):
    """Tight limits: whatever random body happens to be valid is cheap to generate."""
    with _client(engine, pipe, limits=Limits(max_steps=2, max_batch=2, max_pixels=32 * 32), timeout_s=60) as c:
        yield c


@pytest.mark.parametrize("route", [GEN, TXT, IMG])
def test_random_bodies_never_answer_5xx(fuzz_client, route):
    encode = lambda v: json.dumps(v).encode()  # noqa: E731
    bodies = st.one_of(
        JSON.map(encode),
        st.binary(max_size=64),
        st.dictionaries(st.sampled_from(FIELDS[route]), PLAUSIBLE, max_size=8).map(encode),
        _near_valid(route).map(encode),
        _valid(route).map(encode))

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(bodies)
    def check(content):
        response = fuzz_client.post(route, content=content, headers={"content-type": "application/json"})
        assert response.status_code < 500, (content[:300], response.status_code, response.text[:300])
        if response.status_code != 200:
            shape = {"message", "type", "param", "code"} if route == GEN else {"type", "field", "message"}
            assert set(response.json()["error"]) == shape

    check()
    assert fuzz_client.post(GEN, json={"prompt": "after the fuzz", "size": "32x32", "steps": 2}).status_code == 200
