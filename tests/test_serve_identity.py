"""The face-ID methods over HTTP: InstantID in the OpenAI route's extra_body (serve/openai.py), and InstantID,
PhotoMaker and PuLID in AUTOMATIC1111 bodies — `alwayson_scripts` entries named after the methods and InstantID as
the ControlNet extension's two units (serve/a1111/identity.py). The default run checks body → Request mapping and
refusals without a server; the `slow` cases run the real `openai` SDK and `webuiapi` against `sdrt serve` on
loopback over the engines of tests/test_instantid.py, test_photomaker.py and test_pulid.py and compare with the
Python API's pixels. (PhotoMaker's and PuLID's OpenAI parity: test_photomaker.py / test_pulid.py
*_over_openai_extra_body.)"""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import test_instantid
import test_photomaker
import test_pulid
from PIL import Image

from sdrt.runtime.request import Request
from sdrt.serve.a1111.fields import a1111_plan
from sdrt.serve.errors import HttpError
from sdrt.serve.fields import ModelContext
from sdrt.serve.openai import openai_plan

CTX = ModelContext("tiny-sdxl", 32, 8, 1000, 4, 4096 * 4096)
NO_CONTROLNETS = SimpleNamespace(manifest={})  # an engine directory's manifest without ControlNets
FACE = [float(x) for x in np.linspace(-3, 3, 512)]
KPS = [[15.0, 11.0], [33.0, 12.0], [24.0, 18.0], [17.0, 25.0], [31.0, 25.0]]
TOKENS = [[0.5] * 64] * 10


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PICTURE = Image.new("RGB", (48, 32), (200, 30, 90))
A1111_BASE = {"prompt": "a photo of a man img", "steps": 3, "cfg_scale": 5.0, "sampler_name": "Euler", "seed": 5,
              "width": 48, "height": 32}


def _units(embedding: dict | None = None, keypoints: dict | None = None) -> list:
    units = []
    if embedding is not None:
        units.append({"module": "instant_id_face_embedding", "model": "ip-adapter_instant_id_sdxl [eb2d3ec0]",
                      "weight": 0.9, "image": "", "instantid_face": FACE} | embedding)
    if keypoints is not None:
        units.append({"module": "none", "model": "control_instant_id_sdxl", "weight": 0.7,
                      "image": _b64(PICTURE)} | keypoints)
    return units


def _refused(make, body) -> HttpError:
    with pytest.raises(HttpError) as caught:
        make(body)
    assert 400 <= caught.value.status < 500, caught.value.status
    return caught.value


# ---- the default run: bodies → Requests, and refusals --------------------------------------------------------

def test_openai_instantid_fields_become_the_request():
    body = {"prompt": "a person", "instantid_face": FACE, "instantid_kps": KPS, "identitynet_scale": 0.6,
            "instantid_ip_scale": 0.9}
    group = openai_plan(body, CTX).requests[0].instantid
    assert (group.instantid_face, group.instantid_kps, group.identitynet_scale, group.instantid_ip_scale) == \
        (FACE, KPS, 0.6, 0.9)
    image = openai_plan(body | {"instantid_kps": _b64(PICTURE)}, CTX).requests[0].instantid.instantid_kps
    assert isinstance(image, Image.Image) and np.array_equal(np.asarray(image), np.asarray(PICTURE))
    region = openai_plan(body | {"enhance_face_region": True, "instantid_bbox": [4, 3, 40, 30]}, CTX)
    group = region.requests[0].instantid
    assert (group.enhance_face_region, group.instantid_bbox) == (True, [4, 3, 40, 30])
    assert openai_plan(body, CTX).requests[0].instantid.enhance_face_region is False  # off unless asked


@pytest.mark.parametrize("extra,field", [
    ({"instantid_kps": "nope"}, "instantid_kps"),
    ({"photomaker_images": ["nope"]}, "photomaker_images[0]"),
    ({"pulid_weight": 1.0}, "pulid_weight"),  # not a field: PuLID's scale is pulid_scale
])
def test_openai_identity_refusals_name_the_field(extra, field):
    error = _refused(lambda b: openai_plan(b, CTX), {"prompt": "a person"} | extra)
    assert error.field == field, error.message


def test_a1111_scripts_become_the_request():
    scripts = {"PhotoMaker": {"args": [{"photomaker_images": [_b64(PICTURE)] * 2, "photomaker_style_strength": 30}]},
               "pulid": {"pulid_id": TOKENS, "pulid_scale": 1.1, "pulid_mode": "style"},  # the bare object
               "instantid": [{"instantid_face": FACE, "instantid_kps": KPS, "identitynet_scale": 0.5,
                              "enhance_face_region": True, "instantid_bbox": [4, 3, 40, 30]}]}
    plan = a1111_plan(A1111_BASE | {"alwayson_scripts": scripts}, CTX, False)
    request = plan.requests[0]
    photos = request.photomaker.photomaker_images
    assert len(photos) == 2 and np.array_equal(np.asarray(photos[1]), np.asarray(PICTURE))
    assert request.photomaker.photomaker_style_strength == 30
    assert (request.pulid.pulid_id, request.pulid.pulid_scale, request.pulid.pulid_mode) == (TOKENS, 1.1, "style")
    assert (request.instantid.instantid_face, request.instantid.instantid_kps, request.instantid.identitynet_scale,
            request.instantid.instantid_ip_scale) == (FACE, KPS, 0.5, 0.8)
    assert (request.instantid.enhance_face_region, request.instantid.instantid_bbox) == (True, [4, 3, 40, 30])
    assert plan.field("instantid_bbox") == "alwayson_scripts.instantid.args[0].instantid_bbox"
    # the runtime's refusals come back under the body's path
    assert plan.field("pulid_mode") == "alwayson_scripts.pulid.pulid_mode"
    assert plan.field("photomaker_trigger") == "photomaker_trigger"  # not given: its own name
    assert plan.field("instantid_face") == "alwayson_scripts.instantid.args[0].instantid_face"
    off = a1111_plan(A1111_BASE | {"alwayson_scripts": {"pulid": {"enabled": False, "pulid_id": TOKENS}}}, CTX, False)
    assert off.requests[0].pulid.pulid_id is None


def test_a1111_instantid_units_become_the_request():
    canny = {"module": "none", "model": "canny", "image": _b64(PICTURE)}  # another unit stays a ControlNet's
    body = A1111_BASE | {"alwayson_scripts": {"ControlNet": {"args": _units({}, {}) + [canny | {"enabled": False}]}}}
    plan = a1111_plan(body, CTX, False, NO_CONTROLNETS)
    group = plan.requests[0].instantid
    assert group.instantid_face == FACE and (group.instantid_ip_scale, group.identitynet_scale) == (0.9, 0.7)
    assert np.array_equal(np.asarray(group.instantid_kps), np.asarray(PICTURE))
    assert plan.requests[0].control.controls == ()
    assert plan.field("identitynet_scale") == "alwayson_scripts.ControlNet.args[1].weight"
    numbers = a1111_plan(A1111_BASE | {"alwayson_scripts": {"controlnet": _units(
        {}, {"module": "instant_id_face_keypoints", "image": "", "instantid_kps": KPS})}}, CTX, False, NO_CONTROLNETS)
    assert numbers.requests[0].instantid.instantid_kps == KPS


@pytest.mark.parametrize("scripts,field,words", [
    ({"photomaker": {"args": [{"photomaker_images": ["nope"]}]}},
     "alwayson_scripts.photomaker.args[0].photomaker_images[0]", "image"),
    ({"pulid": {"args": [{"pulid_id": TOKENS, "id_scale": 1}]}}, "alwayson_scripts.pulid.args[0].id_scale",
     "pulid_scale"),
    ({"pulid": {"args": [{"pulid_id": TOKENS}, {"pulid_id": TOKENS}]}}, "alwayson_scripts.pulid.args", "one object"),
    ({"instantid": {"instantid_face": FACE, "instantid_kps": "nope"}}, "alwayson_scripts.instantid.instantid_kps",
     "image"),
    ({"controlnet": _units({"instantid_face": None}, {})}, "alwayson_scripts.controlnet.args[0].instantid_face",
     "face analysis"),
    ({"controlnet": _units({}, {"module": "instant_id_face_keypoints"})}, "alwayson_scripts.controlnet.args[1].module",
     "keypoint image"),
    ({"controlnet": _units({})}, "alwayson_scripts.controlnet.args", "keypoints unit"),
    ({"controlnet": _units({}, {"guidance_end": 0.5})}, "alwayson_scripts.controlnet.args[1].guidance_end",
     "whole schedule"),
    ({"controlnet": _units({}, {}), "instantid": {"instantid_face": FACE, "instantid_kps": KPS}},
     "alwayson_scripts.instantid.instantid_face", "twice"),
    ({"roop": {"args": []}}, "alwayson_scripts", "face-ID"),
])
def test_a1111_identity_refusals_name_the_field(scripts, field, words):
    error = _refused(lambda b: a1111_plan(b, CTX, False, NO_CONTROLNETS), A1111_BASE | {"alwayson_scripts": scripts})
    assert error.field == field and words in error.message, (error.field, error.message)


# ---- slow: the real clients against `sdrt serve`, equal to the Python API --------------------------------------

iid, pm = test_instantid.iid, test_photomaker.pm  # their module fixtures (and engines), reused by import
pm_file = getattr(test_photomaker, "pm_file", None)  # pm's own fixture, where test_photomaker.py has one
pulid_file, pulid_engine = test_pulid.pulid_file, test_pulid.pulid_engine
IID_KPS, SIZE, PROMPT = test_instantid.KPS, test_instantid.SIZE, test_photomaker.PROMPT
_face, _photo = test_instantid._face, test_photomaker._photo


def _server(engine, pipe):
    from conftest import LoopbackServer

    return LoopbackServer(engine, pipe, model_name="tiny-sdxl")


def _webui(server):
    webuiapi = pytest.importorskip("webuiapi")
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi, webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3)


def _a1111(webui, prompt: str, scripts: dict, units=()) -> np.ndarray:
    result = webui.txt2img(prompt=prompt, seed=5, cfg_scale=5.0, width=SIZE["width"], height=SIZE["height"],
                           alwayson_scripts=scripts, controlnet_units=list(units))
    return np.asarray(result.image.convert("RGB"))


def _a1111_refusal(webui, prompt: str, scripts: dict, field: str) -> None:
    with pytest.raises(RuntimeError) as caught:
        _a1111(webui, prompt, scripts)
    status, text = caught.value.args
    error = json.loads(text)["error"]
    assert status == 422 and error["field"] == field, error


def _python(pipe, prompt: str, **fields) -> np.ndarray:
    request = Request.of(prompt=prompt, negative_prompt="", steps=3, seed=5, guidance=5.0, sampler="Euler", **SIZE,
                         **fields)
    return np.asarray(pipe.generate(request)[0])


@pytest.mark.slow
def test_instantid_over_both_dialects_equals_the_python_api(iid):
    from sdrt.runtime.conditioning.instantid import draw_kps

    openai = pytest.importorskip("openai")
    engine, _, pipe = iid
    face = _face(2)
    server = _server(engine, pipe)
    try:
        # OpenAI: the embedding and the 5 keypoints as numbers
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        extra = {"steps": 3, "seed": 5, "guidance_scale": 5.0, "sampler": "Euler", "negative_prompt": "",
                 "instantid_face": face.tolist(), "instantid_kps": IID_KPS, "identitynet_scale": 0.6,
                 "instantid_ip_scale": 0.9}
        answer = sdk.images.generate(prompt="a photo of a person", size="48x32", extra_body=extra)
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB"))
        want = _python(pipe, "a photo of a person", instantid_face=face, instantid_kps=IID_KPS, identitynet_scale=0.6,
                       instantid_ip_scale=0.9)
        plain = _python(pipe, "a photo of a person")
        assert np.array_equal(got, want) and np.abs(want.astype(int) - plain).max() > 2  # the face moved it
        with pytest.raises(openai.BadRequestError) as e:
            sdk.images.generate(prompt="a photo of a person", size="48x32",
                                extra_body=extra | {"instantid_kps": [[1.0, 2.0]]})
        assert e.value.status_code == 400 and e.value.param == "instantid_kps", e.value.body
        # the demo's "enhance non-face region", its face box given in output pixels
        region = {"enhance_face_region": True, "instantid_bbox": test_instantid.BOX}
        answer = sdk.images.generate(prompt="a photo of a person", size="48x32", extra_body=extra | region)
        masked = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB"))
        want_masked = _python(pipe, "a photo of a person", instantid_face=face, instantid_kps=IID_KPS,
                              identitynet_scale=0.6, instantid_ip_scale=0.9, **region)
        assert np.array_equal(masked, want_masked) and np.abs(masked.astype(int) - want).max() > 2
        with pytest.raises(openai.BadRequestError) as e:
            sdk.images.generate(prompt="a photo of a person", size="48x32",
                                extra_body=extra | region | {"instantid_bbox": [1.0, 2.0]})
        assert e.value.status_code == 400 and e.value.param == "instantid_bbox", e.value.body

        # A1111: the instantid script entry, and the ControlNet extension's two units
        webuiapi, webui = _webui(server)
        scripts = {"instantid": {"args": [{"instantid_face": face.tolist(), "instantid_kps": IID_KPS,
                                           "identitynet_scale": 0.6, "instantid_ip_scale": 0.9}]}}
        assert np.array_equal(_a1111(webui, "a photo of a person", scripts), want)
        scripts["instantid"]["args"][0] |= region
        assert np.array_equal(_a1111(webui, "a photo of a person", scripts), want_masked)

        class FaceUnit(webuiapi.ControlNetUnit):  # webuiapi's unit plus sdrt's precomputed embedding
            def to_dict(self):
                return super().to_dict() | {"instantid_face": face.tolist()}

        kps_image = draw_kps(np.array(IID_KPS), SIZE["width"], SIZE["height"])
        units = [FaceUnit(module="instant_id_face_embedding", model="ip-adapter_instant_id_sdxl", weight=0.9),
                 webuiapi.ControlNetUnit(image=kps_image, module="none", model="control_instant_id_sdxl", weight=0.6)]
        assert np.array_equal(_a1111(webui, "a photo of a person", {}, units), want)
        bad = {"instantid": {"args": [{"instantid_face": [1.0] * 7, "instantid_kps": IID_KPS}]}}
        _a1111_refusal(webui, "a photo of a person", bad, "alwayson_scripts.instantid.args[0].instantid_face")
    finally:
        server.stop()


@pytest.mark.slow
def test_photomaker_over_a1111_equals_the_python_api(pm):
    engine, _, _, pipe = pm
    photos = [_photo(1), _photo(2)]
    server = _server(engine, pipe)
    try:
        _, webui = _webui(server)
        scripts = {"photomaker": {"args": [{"photomaker_images": [_b64(p) for p in photos],
                                            "photomaker_style_strength": 40}]}}
        want = _python(pipe, PROMPT, photomaker_images=photos, photomaker_style_strength=40)
        assert np.array_equal(_a1111(webui, PROMPT, scripts), want)
        bad = {"photomaker": {"args": [scripts["photomaker"]["args"][0] | {"photomaker_trigger": "two words"}]}}
        _a1111_refusal(webui, PROMPT, bad, "alwayson_scripts.photomaker.args[0].photomaker_trigger")
    finally:
        server.stop()


@pytest.mark.slow
def test_pulid_over_a1111_equals_the_python_api(pulid_engine):
    engine, pipe = pulid_engine
    tokens = np.random.default_rng(4).standard_normal((10, 64)).astype(np.float32)
    server = _server(engine, pipe)
    try:
        _, webui = _webui(server)
        scripts = {"pulid": {"args": [{"pulid_id": tokens.tolist(), "pulid_scale": 1.2, "pulid_mode": "style"}]}}
        want = _python(pipe, "a photo of a person", pulid_id=tokens, pulid_scale=1.2, pulid_mode="style")
        assert np.array_equal(_a1111(webui, "a photo of a person", scripts), want)
        bad = {"pulid": {"args": [scripts["pulid"]["args"][0] | {"pulid_mode": "extreme"}]}}
        _a1111_refusal(webui, "a photo of a person", bad, "alwayson_scripts.pulid.args[0].pulid_mode")
    finally:
        server.stop()
