"""The AUTOMATIC1111 ControlNet extension's API (sd-webui-controlnet) through `webuiapi`, unchanged, against `sdrt
serve` on loopback (serve/a1111/controlnet.py): its model and module lists, and its units in alwayson_scripts giving
the images of sdrt's own Control fields through the Python API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import LoopbackServer

webuiapi = pytest.importorskip("webuiapi", reason="webuiapi is a test extra")
pytest.importorskip("cv2", reason="canny needs OpenCV (sdrt[canny])")

SIZE, STEPS, SEED = 32, 4, 5


@pytest.fixture(scope="module")
def engine(conditioned):
    return conditioned("sd15")[0]  # ControlNets canny and depth


@pytest.fixture(scope="module")
def pipe(engine):
    from sdrt.runtime.pipeline import Pipeline

    return Pipeline.load(engine, backend="ort-cpu")


@pytest.fixture(scope="module")
def webui(engine, pipe):
    server = LoopbackServer(engine, pipe, model_name="tiny-sd15")
    host, port = server.url.removeprefix("http://").split(":")
    yield webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=STEPS)
    server.stop()


def _picture(seed: int = 3) -> Image.Image:
    """Squares on a gradient with noise: canny finds edges in it."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    base = np.stack([x * 255 / SIZE, y * 255 / SIZE, np.full_like(x, 100.0)], axis=-1)
    base[8:20, 6:18] = (250, 30, 30)
    noise = np.random.default_rng(seed).normal(0, 20, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _txt2img(webui, units=()) -> np.ndarray:
    # a fresh alwayson_scripts each call: webuiapi adds the units to its default `alwayson_scripts={}`, one dict
    # shared by every call, so a later call without units would still send the earlier ones
    result = webui.txt2img(prompt="a fox", seed=SEED, width=SIZE, height=SIZE, controlnet_units=list(units),
                           alwayson_scripts={})
    return np.asarray(result.image.convert("RGB"), dtype=int)


def _model(webui, name: str) -> str:
    return next(m for m in webui.controlnet_model_list() if m.split(" [")[0] == name)


def test_model_and_module_lists(webui):
    models = webui.controlnet_model_list()
    assert [m.split(" [")[0] for m in models] == ["canny", "depth"]
    assert all(m.endswith("]") and len(m.split(" [")[1]) == 9 for m in models)  # "NAME [8 hex digits]"
    modules = webui.controlnet_module_list()
    assert modules[0] == "none" and "canny" in modules


def test_unit_is_sdrts_own_control_fields(webui, pipe):
    from sdrt.runtime.request import Request

    picture = _picture()
    unit = webuiapi.ControlNetUnit(image=picture, module="none", model=_model(webui, "canny"), weight=0.8,
                                   guidance_end=0.5)
    got = _txt2img(webui, [unit])
    own = pipe.generate(Request.of(prompt="a fox", negative_prompt="", steps=STEPS, seed=SEED, width=SIZE,
                                   height=SIZE, sampler="Euler", guidance=7.0, controls=(("canny", picture, 0.8),),
                                   control_end=0.5))[0]
    assert np.abs(got - np.asarray(own.convert("RGB"), dtype=int)).max() <= 1
    plain = _txt2img(webui)
    assert np.abs(got - plain).mean() > 3  # the unit applies
    # enabled=false: as if there were no unit; the name without its hash is the same model
    off = webuiapi.ControlNetUnit(image=picture, model="canny", weight=0.8, enabled=False)
    assert np.array_equal(_txt2img(webui, [off]), plain)
    # module canny runs the preprocessor: sdrt's control_preprocess with the unit's thresholds, not the photo
    edges = webuiapi.ControlNetUnit(image=picture, module="canny", model="canny", weight=0.8, guidance_end=0.5,
                                    threshold_a=150, threshold_b=50)  # OpenCV takes them in either order
    canny = _txt2img(webui, [edges])
    own = pipe.generate(Request.of(prompt="a fox", negative_prompt="", steps=STEPS, seed=SEED, width=SIZE,
                                   height=SIZE, sampler="Euler", guidance=7.0, controls=(("canny", picture, 0.8),),
                                   control_end=0.5, control_preprocess="canny:50:150"))[0]
    assert np.abs(canny - np.asarray(own.convert("RGB"), dtype=int)).max() <= 1
    # and the edge map is not the photo (the tiny random net barely reads its image's content, so the images part
    # by about 1/255 only; the equality above with control_preprocess is what shows canny ran)
    assert not np.array_equal(canny, got)


@pytest.mark.parametrize("unit,field,words", [
    (dict(model="control_sd15_openpose [fef5e48e]"), "model", "canny ["),
    (dict(model="canny", control_mode=1), "control_mode", "guess mode"),
    (dict(model="canny", module="openpose"), "module", "canny"),
    (dict(model="canny", guidance_start=0.6, guidance_end=0.4), "guidance_start", "below"),
])
def test_unit_errors_name_the_field(webui, unit, field, words):
    with pytest.raises(RuntimeError) as caught:
        _txt2img(webui, [webuiapi.ControlNetUnit(image=_picture(), **unit)])
    status, text = caught.value.args
    error = json.loads(text)["error"]
    assert status == 422 and error["field"] == f"alwayson_scripts.ControlNet.args[0].{field}", error
    assert words in error["message"], error


def test_resize_modes_crop_and_fill_to_the_output_aspect():
    from sdrt.serve.a1111.controlnet import _fit

    wide = Image.new("RGB", (64, 32), (0, 0, 0))
    wide.paste((255, 255, 255), (16, 0, 48, 32))  # a white centre between black sides
    assert _fit(wide, (32, 32), 0) is wide
    crop = _fit(wide, (32, 32), 1)
    assert crop.size == (32, 32) and np.asarray(crop).min() == 255
    fill = _fit(wide, (32, 32), 2)
    assert fill.size == (64, 64) and np.asarray(fill)[0, 32].tolist() == [0, 0, 0]  # the median border: black
    assert np.asarray(fill)[32, 32].tolist() == [255, 255, 255]
