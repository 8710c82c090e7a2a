"""ControlNet: export (controlnet/NAME + the residual UNet, added into existing directories), parity with diffusers'
StableDiffusionControlNetPipeline / StableDiffusionXLControlNetPipeline on tiny ControlNets, bad inputs, plan logic.

The tiny ControlNets come from ControlNetModel.from_unet with their zero-initialised convolutions drawn at random
(export/models/tiny.py), so every case also checks that the control visibly changes the image.
"""

from __future__ import annotations

import json

from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from conftest import run_sdrt
from test_parity import assert_same_images, diffusers_scheduler, generators, to_uint8

from sdrt.export.exporter import add_controlnets
from sdrt.runtime.errors import UserError
from sdrt.runtime.loader import open_dir
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.validate import validate

PROMPTS = ("a photo of a cat", "a castle on a hill")
SIZE = dict(width=48, height=32)
STEPS = 3


def _image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def cn(conditioned):
    """{family: (engine dir with ControlNets added, {name: ControlNet folder})} (conftest.conditioned)."""
    return {family: (conditioned(family)[0], conditioned(family)[1]["controlnets"]) for family in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def pipes(cn):
    return {family: Pipeline.load(engine, backend="ort-cpu") for family, (engine, _) in cn.items()}


def _reference(tiny_pipeline, family, folders, names):
    import diffusers

    nets = [diffusers.ControlNetModel.from_pretrained(folders[n]) for n in names]
    cls = diffusers.StableDiffusionXLControlNetPipeline if family == "sdxl" else diffusers.StableDiffusionControlNetPipeline
    extra = {} if family == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(tiny_pipeline(family), controlnet=nets if len(nets) > 1 else nets[0], **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler(pipe, "euler")
    return pipe


CASES = {  # name: (controls as (net, image seed, scale), our extra fields, diffusers' extra arguments)
    "one_scaled": ((("canny", 0, 0.8),), {}, {}),
    "two_nets": ((("canny", 0, 0.8), ("depth", 1, 1.3)), {}, {}),
    "guess_mode": ((("depth", 1, 1.0),), {"guess_mode": True}, {"guess_mode": True}),
    "window": ((("canny", 0, 1.0), ("depth", 1, 0.5)), {"control_start": 0.3, "control_end": 0.7},
               {"control_guidance_start": 0.3, "control_guidance_end": 0.7}),
    # each net its own window (diffusers: lists); (net, image seed, scale, start, end)
    "windows_per_net": ((("canny", 0, 1.0, 0.0, 0.5), ("depth", 1, 0.9, 0.4, 1.0)), {},
                        {"control_guidance_start": [0.0, 0.4], "control_guidance_end": [0.5, 1.0]}),
}


def _ours(n, image, s, *window):
    return {"name": n, "image": image, "scale": s, "start": window[0], "end": window[1]} if window else (n, image, s)


@pytest.mark.parametrize("case", list(CASES))
def test_sd15_controlnet_equals_diffusers(cn, pipes, tiny_pipeline, case):
    controls, ours_extra, theirs_extra = CASES[case]
    images = {0: _image(0, 56, 40), 1: _image(1, 48, 32)}  # the first is resized (Lanczos) to the output size
    common = dict(prompt=PROMPTS, steps=STEPS, sampler="euler", seed=5, guidance=7.5, **SIZE)
    ours = pipes["sd15"].generate(Request.of(**common, controls=tuple(_ours(n, images[i], *rest) for n, i, *rest in controls),
                                             **ours_extra))
    ref = _reference(tiny_pipeline, "sd15", cn["sd15"][1], [c[0] for c in controls])
    scales = [c[2] for c in controls]
    theirs = ref(list(PROMPTS), image=[images[c[1]] for c in controls] if len(controls) > 1 else images[controls[0][1]],
                 controlnet_conditioning_scale=scales if len(scales) > 1 else scales[0], num_inference_steps=STEPS,
                 guidance_scale=7.5, generator=generators(5, 2), output_type="np", **SIZE, **theirs_extra).images
    assert_same_images(f"controlnet sd15 {case}", ours, theirs)
    plain = pipes["sd15"].generate(Request.of(**common))
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(plain).astype(int)).max() > 8  # the control shows


def test_canny_preprocessing_equals_diffusers_documented_recipe(cn, pipes, tiny_pipeline):
    """control_preprocess="canny" on a photo = diffusers given the canny map its ControlNet docs make with OpenCV
    (cv2.Canny(np.array(image), 100, 200), stacked to three channels), computed here by that recipe."""
    import cv2
    from PIL import ImageDraw

    photo = Image.new("RGB", (48, 32), (30, 60, 200))
    ImageDraw.Draw(photo).ellipse([8, 6, 30, 28], fill=(230, 200, 40))
    ImageDraw.Draw(photo).rectangle([30, 4, 44, 20], fill=(200, 30, 30))
    edges = cv2.Canny(np.array(photo), 100, 200)[:, :, None]
    canny = Image.fromarray(np.concatenate([edges, edges, edges], axis=2))
    assert 0 < (edges > 0).mean() < 0.5  # the recipe found edges
    common = dict(prompt="a photo of a cat", steps=STEPS, sampler="euler", seed=5, guidance=7.5, **SIZE)
    ours = pipes["sd15"].generate(Request.of(**common, controls=(("canny", photo, 1.0),), control_preprocess="canny"))
    ref = _reference(tiny_pipeline, "sd15", cn["sd15"][1], ["canny"])
    theirs = ref("a photo of a cat", image=canny, num_inference_steps=STEPS, guidance_scale=7.5,
                 generator=generators(5, 1), output_type="np", **SIZE).images
    assert_same_images("controlnet sd15 canny preprocessing", ours, theirs)
    # the net is given the canny map, not the photo (the tiny random net barely tells the two apart in pixels)
    engine = open_dir(cn["sd15"][0])
    job = validate(Request.of(**common, controls=(("canny", photo),), control_preprocess="canny:100:200"), engine)
    assert np.array_equal(np.asarray(job.controls.nets[0].image), np.asarray(canny))
    assert not np.array_equal(np.asarray(job.controls.nets[0].image), np.asarray(photo))
    for value, says in (("sobel", "unknown preprocessor 'sobel'"), ("canny:a:b", "two numbers"),
                        ("canny:200:100", "0 ≤ LOW ≤ HIGH"), (3, "must be a string")):
        with pytest.raises(InvalidRequest, match=says) as e:
            validate(Request.of(**common, controls=(("canny", photo),), control_preprocess=value), engine)
        assert e.value.field == "control_preprocess"


def test_sdxl_controlnet_equals_diffusers_with_guess_mode_and_window(cn, pipes, tiny_pipeline):
    image = _image(3, 64, 64)
    common = dict(prompt="a photo of a cat", steps=STEPS, sampler="euler", seed=2, guidance=5.0, **SIZE)
    ref = _reference(tiny_pipeline, "sdxl", cn["sdxl"][1], ["xl"])
    plain = to_uint8(pipes["sdxl"].generate(Request.of(**common))).astype(int)
    for ours_extra, theirs_extra in (({}, {}), ({"guess_mode": True, "control_end": 0.6},
                                                {"guess_mode": True, "control_guidance_end": 0.6})):
        ours = pipes["sdxl"].generate(Request.of(**common, controls=(("xl", image, 0.7),), **ours_extra))
        theirs = ref("a photo of a cat", image=image, controlnet_conditioning_scale=0.7, num_inference_steps=STEPS,
                     guidance_scale=5.0, generator=generators(2, 1), output_type="np", **SIZE, **theirs_extra).images
        assert_same_images(f"controlnet sdxl {'guess+window' if ours_extra else 'plain'}", ours, theirs)
        assert np.abs(to_uint8(ours).astype(int) - plain).max() > 8


def test_manifest_records_the_controlnets_and_keeps_the_plain_unet(cn, exported):
    engine, _ = cn["sd15"]
    manifest = json.loads((engine / "manifest.json").read_text())
    plain = json.loads((exported("sd15", "fp32") / "manifest.json").read_text())
    assert manifest["components"]["unet"]["sha256"] == plain["components"]["unet"]["sha256"]
    assert [r["name"] for r in manifest["controlnets"]] == ["canny", "depth"]
    jsonschema.validate(manifest, json.loads((Path(__file__).parents[1] / "export" / "manifest.schema.json").read_text()))
    for name in ("unet_controlnet", "controlnet/canny", "controlnet/depth"):
        entry = manifest["components"][name]
        assert entry["gate"]["passed"] and (engine / name / "model.onnx").is_file()
    outputs = [o["name"] for o in manifest["components"]["controlnet/canny"]["outputs"]]
    inputs = [i["name"] for i in manifest["components"]["unet_controlnet"]["inputs"]]
    assert outputs[-1] == "mid_block_res_sample" and "mid_block_additional_residual" in inputs
    assert len([i for i in inputs if i.startswith("down_block_additional_residual_")]) == len(outputs) - 1
    xl = json.loads((cn["sdxl"][0] / "manifest.json").read_text())["components"]["controlnet/xl"]
    assert {"text_embeds", "time_ids", "controlnet_cond", "conditioning_scale"} <= {i["name"] for i in xl["inputs"]}


def test_bad_control_requests(cn, exported):
    engine = open_dir(cn["sd15"][0])
    image = _image(0, 48, 32)

    def invalid(**fields):
        with pytest.raises(InvalidRequest) as e:
            validate(Request.of(prompt="x", **SIZE, **fields), engine)
        return e.value

    e = invalid(controls=(("pose", image, 1.0),))
    assert e.field == "controls[0].name" and "canny, depth" in e.message
    assert invalid(controls=(("canny", image, float("nan")),)).field == "controls[0].scale"
    assert invalid(controls=(("canny", image, float("inf")),)).field == "controls[0].scale"
    e = invalid(controls=(("canny", image),), control_start=0.6, control_end=0.6)
    assert e.field == "control_start" and "below" in e.message
    assert invalid(controls=(("canny", "not an image"),)).field == "controls[0].image"
    e = invalid(controls=(("canny", image),), guess_mode="yes")
    assert e.field == "guess_mode"
    with pytest.raises(InvalidRequest, match="has none"):
        validate(Request.of(prompt="x", controls=(("canny", image),)), open_dir(exported("sd15", "fp32")))
    # JSON: entries as objects with base64 images round-trip; a bad base64 image names its entry
    request = Request.of(prompt="x", controls=(("canny", image, 0.5),), guess_mode=True)
    again = Request.from_dict(json.loads(json.dumps(request.to_dict(encode_images=True))))
    assert validate(again, engine).controls.nets[0].scale == 0.5
    with pytest.raises(InvalidRequest, match=r"controls\[0\].image"):
        Request.from_dict({"prompt": "x", "controls": [{"name": "canny", "image": "@@@"}]})
    # a net's own window: checked like the request's, and kept through JSON
    e = invalid(controls=({"name": "canny", "image": image, "start": 0.7, "end": 0.2},))
    assert e.field == "controls[0].start" and "below its end" in e.message
    assert invalid(controls=({"name": "canny", "image": image, "end": 1.5},)).field == "controls[0].end"
    assert invalid(controls=({"name": "canny", "image": image, "stop": 0.5},)).field == "controls[0]"
    windowed = Request.of(prompt="x", controls=({"name": "canny", "image": image, "start": 0.2, "end": 0.6},
                                                ("depth", image)), control_end=0.9, **SIZE)
    again = Request.from_dict(json.loads(json.dumps(windowed.to_dict(encode_images=True))))
    nets = validate(again, engine).controls.nets
    assert [(u.start, u.end) for u in nets] == [(0.2, 0.6), (0.0, 0.9)]  # the second takes the request's window


def test_export_refuses_a_controlnet_of_another_family(cn, tiny_pipeline):
    engine, folders = cn["sdxl"]
    before = sorted(p.name for p in engine.iterdir())
    with pytest.raises(UserError, match=r"cross-attention width 32.*this model's UNet has 64"):
        add_controlnets(engine, (f"{cn['sd15'][1]['canny']}=wrong",))
    assert sorted(p.name for p in engine.iterdir()) == before  # nothing written
    assert not list(engine.parent.glob(f".{engine.name}.sdrt-tmp-*"))


def test_cli_control_errors_are_one_line(cn, tmp_path):
    engine, _ = cn["sd15"]
    _image(0, 48, 32).save(tmp_path / "c.png")
    result = run_sdrt("run", str(engine), "x", "--control", f"nope={tmp_path / 'c.png'}:0.5", "-o",
                      str(tmp_path / "o.png"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == "error: --control unknown ControlNet 'nope'; this model has canny, depth", lines[0]
    assert not (tmp_path / "o.png").exists()
    from sdrt.cli.generate import RunOptions, build_request  # the same checks the CLI makes before validation

    for controls, ip, expected in (((f"canny={tmp_path / 'missing.png'}:0.5",), None, "cannot read the image"),
                                   ((f"canny={tmp_path / 'c.png'}:high",), None, "the scale 'high' is not a number"),
                                   (("canny",), None, "give NAME=IMAGE"),
                                   ((), str(tmp_path / "missing.png"), "cannot read the image"),
                                   ((), (f"{tmp_path / 'c.png'}:0.5", f"{tmp_path / 'c.png'}:0.7"), "give it once")):
        with pytest.raises(UserError, match=expected):
            build_request(RunOptions(engine_dir=engine, prompts=("x",), controls=controls, ip_image=ip))
    control = (f"canny={tmp_path / 'c.png'}:0.5", f"depth={tmp_path / 'c.png'}")
    request = build_request(RunOptions(engine_dir=engine, prompts=("x",), controls=control,
                                       control_windows=("depth=0.3:0.8",)))
    assert [(c["name"], c.get("start"), c.get("end")) for c in request.control.controls] == \
        [("canny", None, None), ("depth", 0.3, 0.8)]
    for windows, expected in ((("depth=0.3",), "NAME=START:END"), (("pose=0:1",), "no --control pose")):
        with pytest.raises(UserError, match=expected):
            build_request(RunOptions(engine_dir=engine, prompts=("x",), controls=control, control_windows=windows))


def test_trt_plan_logic_covers_controlnets(cn):
    from sdrt.engines import trt_dir
    from sdrt.engines import trt_profiles as tp
    from sdrt.engines.select import locate

    engine, _ = cn["sd15"]
    profile = tp.profiles(["48x32"], None, "1-2", True, 1)[0]
    plans = {p.component: p for p in trt_dir.plan(engine, [profile], None, None, None)}
    assert {"unet_controlnet", "controlnet/canny", "controlnet/depth"} <= set(plans)
    net = plans["controlnet/canny"]
    assert net.file.startswith("trt/controlnet--canny__") and "/" not in net.file[4:]
    f = json.loads((engine / "manifest.json").read_text())["vae_scale_factor"]
    h, w = 32 // f, 48 // f
    # guess mode runs the net on the conditional half: batch 1 … 2·2 under guidance
    assert net.shapes["sample"] == ((1, 4, h, w), (2 * profile.batch.opt, 4, h, w), (4, 4, h, w))
    assert net.shapes["controlnet_cond"][2] == (4, 3, 32, 48)
    residual = plans["unet_controlnet"].shapes["mid_block_additional_residual"]
    assert residual[0][2:] == (-(-h // 2), -(-w // 2))
    assert locate(engine / "controlnet" / "canny" / "model.onnx") == (engine, "controlnet/canny")
    assert locate(engine / "unet" / "model.onnx") == (engine, "unet")


def test_http_controls_equal_the_python_request_and_errors_name_the_entry(cn, pipes):
    import base64
    import io

    from fastapi.testclient import TestClient

    from sdrt.serve.app import create_app
    from sdrt.serve.edge import ServeConfig

    engine, _ = cn["sd15"]
    image = _image(0, 48, 32)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    config = ServeConfig(engine_dir=engine, max_batch=2, max_wait_ms=20, warmup=False, backend="ort-cpu")
    with TestClient(create_app(config, pipeline=pipes["sd15"])) as client:
        body = {"prompt": "a fox", "size": "48x32", "steps": 2, "guidance_scale": 5.0, "sampler": "euler", "seed": 4,
                "controls": [{"name": "depth", "image": b64, "scale": 0.9}], "guess_mode": True}
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        got = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).convert("RGB")
        want = pipes["sd15"].generate(Request.of(prompt="a fox", steps=2, guidance=5.0, sampler="euler", seed=4,
                                                 controls=(("depth", image, 0.9),), guess_mode=True, **SIZE))[0]
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1
        for controls, field in (([{"name": "pose", "image": b64}], "controls[0].name"),
                                ([{"name": "depth", "image": "%%%"}], "controls[0].image"),
                                ([{"name": "depth", "image": b64, "scale": "high"}], "controls[0].scale")):
            response = client.post("/v1/images/generations", json=body | {"controls": controls})
            assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
        response = client.post("/v1/images/generations", json=body | {"control_start": 0.9, "control_end": 0.1})
        assert response.status_code == 400 and response.json()["error"]["param"] == "control_start"
        response = client.post("/v1/images/generations", json=body | {"ip_image": b64, "ip_scale": "x"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "ip_scale", response.text
        response = client.post("/v1/images/generations", json=body | {"ip_image": b64, "ip_scale": 0.5})
        assert response.status_code == 200, response.text  # ControlNet + IP-Adapter over HTTP
        response = client.post("/v1/images/generations", json=body | {"ip_image": [b64, "%%%"]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "ip_image[1]", response.text
        response = client.post("/v1/images/generations", json=body | {"ip_image": [b64, b64], "ip_scale": 0.5})
        assert response.status_code == 200, response.text  # two images for the one adapter
        named = {"ip_adapters": [{"name": "ip-adapter", "image": [b64, b64], "scale": 0.5}]}  # the file's stem
        response = client.post("/v1/images/generations", json=body | named)
        assert response.status_code == 200, response.text
        for entries, field in (([{"name": "hair", "image": b64}], "ip_adapters[0].name"),
                               ([{"name": "ip-adapter", "image": [b64, "%%%"]}], "ip_adapters[0].image[1]"),
                               ([{"name": "ip-adapter", "image": b64, "scale": None}], "ip_adapters[0].scale"),
                               ("ip-adapter", "ip_adapters")):
            response = client.post("/v1/images/generations", json=body | {"ip_adapters": entries})
            assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


@pytest.mark.slow
@pytest.mark.parametrize("cls", ["StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionControlNetInpaintPipeline"])
def test_sd15_controlnet_img2img_and_inpaint_equal_diffusers(cn, pipes, tiny_pipeline, cls):
    import diffusers

    control, init = _image(4, 48, 32), _image(5, 48, 32)
    mask = Image.fromarray(((np.random.default_rng(6).random((32, 48)) > 0.5) * 255).astype("uint8"))
    inputs = dict(init_image=init, strength=0.7) if "Img2Img" in cls else dict(init_image=init, mask=mask, strength=1.0)
    common = dict(prompt="a cat", steps=4, sampler="euler", seed=3, **SIZE, **inputs)
    ours = pipes["sd15"].generate(Request.of(**common, controls=(("canny", control, 0.8),), control_end=0.8))
    net = diffusers.ControlNetModel.from_pretrained(cn["sd15"][1]["canny"])
    ref = getattr(diffusers, cls).from_pretrained(tiny_pipeline("sd15"), controlnet=net, safety_checker=None,
                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    theirs = ref("a cat", image=init, control_image=control, strength=inputs["strength"], num_inference_steps=4,
                 controlnet_conditioning_scale=0.8, control_guidance_end=0.8, generator=generators(3, 1),
                 output_type="np", **({"mask_image": mask} if "mask" in inputs else {}), **SIZE).images
    assert_same_images(f"controlnet sd15 {cls}", ours, theirs)
    plain = pipes["sd15"].generate(Request.of(**common))
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(plain).astype(int)).max() > 8


def test_bench_reports_the_per_step_cost_of_each_conditioning(conditioned, tmp_path):
    """`sdrt bench DIR --conditioning` (bench/conditioning.py) on the tiny SD 1.5 with two ControlNets and an
    IP-Adapter: a time for the plain UNet, the residual UNet, each ControlNet and the IP-Adapter UNet."""
    import json

    from conftest import run_sdrt

    engine, _ = conditioned("sd15")
    done = run_sdrt("bench", str(engine), "--conditioning", "--resolution", "32", "--runs", "1", "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr
    text = json.dumps(json.loads((tmp_path / "result.json").read_text()))
    for part in ("unet", "unet_controlnet", "controlnet/canny", "controlnet/depth", "unet_ip"):
        assert f'"{part}' in text, (part, text[:600])
