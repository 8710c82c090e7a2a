"""IP-Adapter: image_encoder + unet_ip exported into an engine directory, equal to diffusers' load_ip_adapter +
set_ip_adapter_scale on tiny SD 1.5 and SDXL models with a tiny adapter the tests build (export/models/tiny.py), and the bad
inputs (no adapter in the directory, non-finite scale, no image encoder, an adapter for another width)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from test_parity import assert_same_images, diffusers_scheduler, generators, to_uint8

from sdrt.export.exporter import ExportConfig, add_controlnets, export
from sdrt.runtime.errors import UserError
from sdrt.runtime.conditioning import image_processors
from sdrt.runtime.loader import open_dir
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.validate import validate

SIZE = dict(width=48, height=32)


def _image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def pipes(conditioned):
    """sd15 loaded now; sdxl (its adapter added on first use: slow tests only) loaded when asked for."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = Pipeline.load(conditioned(family, ip=True)[0], backend="ort-cpu")
        return cache[family]

    return get


def _reference(tiny_pipeline, family, ip):
    import diffusers
    from transformers import CLIPVisionModelWithProjection

    encoder, adapter = ip
    extra = {} if family == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_pipeline(family), **extra)
    pipe.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder))
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler(pipe, "euler")
    return pipe


@pytest.mark.parametrize("family,batch,guidance", [("sd15", 2, 7.5),
                                                   pytest.param("sdxl", 1, 5.0, marks=pytest.mark.slow)])
def test_ip_adapter_equals_diffusers(conditioned, pipes, tiny_pipeline, family, batch, guidance):
    image = _image(7, 56, 40)  # not square: the CLIP processor resizes the short side and center-crops
    ref = _reference(tiny_pipeline, family, conditioned(family, ip=True)[1]["ip"])
    common = dict(prompt="a photo of a cat", steps=3, sampler="euler", seed=3, batch=batch, guidance=guidance, **SIZE)
    ref.set_ip_adapter_scale(0.7)
    theirs = ref("a photo of a cat", ip_adapter_image=image, num_inference_steps=3, guidance_scale=guidance,
                 num_images_per_prompt=batch, generator=generators(3, batch), output_type="np", **SIZE).images
    ours = pipes(family).generate(Request.of(**common, ip_image=image, ip_scale=0.7))
    assert_same_images(f"ip-adapter {family} scale 0.7", ours, theirs)
    plain = pipes(family).generate(Request.of(**common))
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(plain).astype(int)).max() > 8  # the image prompt shows
    if family == "sd15":  # scale 0: diffusers skips the branch, the graph adds exact zeros
        zero = pipes(family).generate(Request.of(**common, ip_image=image, ip_scale=0.0))
        assert_same_images("ip-adapter sd15 scale 0 vs plain", zero, plain)


def test_manifest_and_preprocessing(conditioned):
    from transformers import CLIPImageProcessor

    from sdrt.runtime.conditioning import ip_adapter

    engine, _ = conditioned("sd15")
    manifest = json.loads((engine / "manifest.json").read_text())
    assert [(a["name"], a["kind"]) for a in manifest["ip_adapter"]["adapters"]] == [("ip-adapter", "plain")]
    assert {"controlnet/canny", "unet_controlnet", "image_encoder", "unet_ip", "unet"} <= set(manifest["components"])
    inputs = {i["name"]: i for i in manifest["components"]["unet_ip"]["inputs"]}
    assert inputs["ip_scale_0"]["shape"] == [] and inputs["ip_image_embeds_0"]["shape"][:2] == ["batch_size", "ip_images"]
    config = json.loads((engine / "image_encoder" / "preprocessor_config.json").read_text())
    image = _image(8, 70, 45)
    want = CLIPImageProcessor(**{k: v for k, v in config.items() if k != "image_processor_type"})(
        image, return_tensors="pt").pixel_values
    assert float((image_processors.preprocess(image, config) - want).abs().max()) < 1e-6
    from sdrt.engines import trt_dir
    from sdrt.engines import trt_profiles as tp

    profile = tp.profiles(["48x32"], None, "2", True, 1)[0]
    plans = {p.component: p for p in trt_dir.plan(engine, [profile], ("image_encoder", "unet_ip"), None, None)}
    assert plans["image_encoder"].shapes["pixel_values"][2] == (1, 3, 32, 32)
    assert plans["unet_ip"].shapes["ip_image_embeds_0"][2] == (4, 1, 32)  # 2 images × guidance


def test_bad_ip_adapter_inputs(conditioned, exported, tiny_pipeline, tmp_path):
    engine = open_dir(conditioned("sd15")[0])
    image = _image(0, 32, 32)
    with pytest.raises(InvalidRequest) as e:
        validate(Request.of(prompt="x", ip_image=image, ip_scale=float("nan"), **SIZE), engine)
    assert e.value.field == "ip_scale"
    with pytest.raises(InvalidRequest, match="no IP-Adapter") as e:
        validate(Request.of(prompt="x", ip_image=image, **SIZE), open_dir(exported("sd15", "fp32")))
    assert e.value.field == "ip_image"
    with pytest.raises(InvalidRequest) as e:
        validate(Request.of(prompt="x", ip_image="a cat picture", **SIZE), engine)
    assert e.value.field == "ip_image"
    request = Request.of(prompt="x", ip_image=image, ip_scale=0.5, **SIZE)
    again = Request.from_dict(json.loads(json.dumps(request.to_dict(encode_images=True))))
    assert validate(again, engine).image_prompt.prompts[0].scale == 0.5
    encoder, adapter = conditioned("sd15")[1]["ip"]
    with pytest.raises(UserError, match="needs --image-encoder"):
        export(ExportConfig(model=str(tiny_pipeline("sd15")), output=tmp_path / "out", ip_adapter=str(adapter)))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_adapter_for_another_width_is_refused(conditioned, exported, tmp_path):
    encoder, adapter = conditioned("sd15")[1]["ip"]
    xl = tmp_path / "sdxl"  # an SD-width adapter into the SDXL UNet: refused, nothing written
    shutil.copytree(exported("sdxl", "fp32"), xl, copy_function=os.link)
    before = sorted(p.name for p in xl.iterdir())
    with pytest.raises(UserError, match="does not fit this model's UNet"):
        add_controlnets(xl, (), ip_adapter=str(adapter), image_encoder=str(encoder))
    assert sorted(p.name for p in xl.iterdir()) == before


def test_controlnet_and_ip_adapter_together_equal_diffusers(conditioned, pipes, tiny_pipeline):
    import diffusers
    from transformers import CLIPVisionModelWithProjection

    engine, parts = conditioned("sd15")
    encoder, adapter = parts["ip"]
    control, prompt_image = _image(11, 48, 32), _image(12, 40, 40)
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        tiny_pipeline("sd15"), controlnet=diffusers.ControlNetModel.from_pretrained(parts["controlnets"]["depth"]),
        safety_checker=None, requires_safety_checker=False)
    ref.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder))
    ref.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
    ref.set_ip_adapter_scale(0.6)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    theirs = ref("a cat", image=control, ip_adapter_image=prompt_image, controlnet_conditioning_scale=0.9,
                 num_inference_steps=3, generator=generators(1, 1), output_type="np", **SIZE).images
    common = dict(prompt="a cat", steps=3, sampler="euler", seed=1, **SIZE)
    ours = pipes("sd15").generate(Request.of(**common, controls=(("depth", control, 0.9),), ip_image=prompt_image,
                                             ip_scale=0.6))
    assert_same_images("controlnet + ip-adapter sd15", ours, theirs)
    for alone in (dict(controls=(("depth", control, 0.9),)), dict(ip_image=prompt_image, ip_scale=0.6)):
        single = pipes("sd15").generate(Request.of(**common, **alone))
        assert np.abs(to_uint8(ours).astype(int) - to_uint8(single).astype(int)).max() > 8  # both show


def test_controlnet_ip_adapter_and_lora_together_equal_diffusers(conditioned, pipes, tiny_pipeline, tmp_path):
    """InstantID-style: a ControlNet, an image prompt and a LoRA (UNet + text encoder) in one request; the LoRA reaches
    the combined UNet graph through its own weights map (runtime/conditioning/graphs.py)."""
    import diffusers
    from transformers import CLIPVisionModelWithProjection

    from test_lora import make_layers, write_diffusers

    engine, parts = conditioned("sd15")
    encoder, adapter = parts["ip"]
    lora = write_diffusers(tmp_path / "lora.safetensors", make_layers(
        tiny_pipeline("sd15"), {"unet": (4, 0.03), "text_encoder": (4, 0.1)}, seed=9))
    control, prompt_image = _image(13, 48, 32), _image(14, 40, 40)
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        tiny_pipeline("sd15"), controlnet=diffusers.ControlNetModel.from_pretrained(parts["controlnets"]["canny"]),
        safety_checker=None, requires_safety_checker=False)
    ref.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder))
    ref.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
    ref.set_ip_adapter_scale(0.5)
    ref.load_lora_weights(str(lora))
    ref.fuse_lora(lora_scale=0.8)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    theirs = ref("a cat", image=control, ip_adapter_image=prompt_image, controlnet_conditioning_scale=0.9,
                 num_inference_steps=3, generator=generators(2, 1), output_type="np", **SIZE).images
    common = dict(prompt="a cat", steps=3, sampler="euler", seed=2, controls=(("canny", control, 0.9),),
                  ip_image=prompt_image, ip_scale=0.5, **SIZE)
    ours = pipes("sd15").generate(Request.of(**common, loras=[(str(lora), 0.8)]))
    assert_same_images("controlnet + ip-adapter + lora sd15", ours, theirs)
    without = pipes("sd15").generate(Request.of(**common))
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(without).astype(int)).max() > 8  # the LoRA shows


def test_several_images_for_one_adapter_equal_diffusers(conditioned, pipes, tiny_pipeline):
    """ip_adapter_image=[[a, b]]: both images' tokens in the adapter's attention (ip_images axis 2)."""
    images = (_image(21, 56, 40), _image(22, 40, 40))
    ref = _reference(tiny_pipeline, "sd15", conditioned("sd15", ip=True)[1]["ip"])
    ref.set_ip_adapter_scale(0.7)
    theirs = ref("a photo of a cat", ip_adapter_image=[list(images)], num_inference_steps=3, guidance_scale=7.5,
                 generator=generators(3, 1), output_type="np", **SIZE).images
    common = dict(prompt="a photo of a cat", steps=3, sampler="euler", seed=3, guidance=7.5, **SIZE)
    ours = pipes("sd15").generate(Request.of(**common, ip_image=list(images), ip_scale=0.7))
    assert_same_images("ip-adapter sd15, two images", ours, theirs)
    first = pipes("sd15").generate(Request.of(**common, ip_image=images[0], ip_scale=0.7))
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(first).astype(int)).max() > 8  # the second image shows
    with pytest.raises(InvalidRequest) as e:
        validate(Request.of(**common, ip_image=[images[0], "not an image"]), open_dir(conditioned("sd15")[0]))
    assert e.value.field == "ip_image[1]"


@pytest.mark.slow
@pytest.mark.parametrize("family,kind", [("sd15", "plus"), ("sd15", "full"), ("sdxl", "plus"), ("sdxl", "full")])
def test_ip_adapter_plus_and_full_face_equal_diffusers(exported, tiny_pipeline, tmp_path, family, kind):
    """IP-Adapter Plus / Plus Face (Resampler projection; the two differ only in training data) and Full Face
    (IPAdapterFullImageProjection): penultimate hidden states, the zero image's as the negative; one and two images."""
    from sdrt.export.models.tiny import write_tiny_ip_adapter

    engine = tmp_path / family
    shutil.copytree(exported(family, "fp32"), engine, copy_function=os.link)
    encoder, adapter = write_tiny_ip_adapter(tiny_pipeline(family), tmp_path / kind, seed=5, plus=kind == "plus",
                                             full=kind == "full")
    add_controlnets(engine, (), ip_adapter=str(adapter), image_encoder=str(encoder))
    assert json.loads((engine / "manifest.json").read_text())["ip_adapter"]["adapters"][0]["kind"] == kind
    ref = _reference(tiny_pipeline, family, (encoder, adapter))
    ref.set_ip_adapter_scale(0.7)
    pipe = Pipeline.load(engine, backend="ort-cpu")
    common = dict(prompt="a cat", steps=3, sampler="euler", seed=3, guidance=5.0, **SIZE)
    for images in ([_image(9, 56, 40)], [_image(9, 56, 40), _image(10, 40, 48)]):
        theirs = ref("a cat", ip_adapter_image=[images], num_inference_steps=3, guidance_scale=5.0,
                     generator=generators(3, 1), output_type="np", **SIZE).images
        ours = pipe.generate(Request.of(**common, ip_image=images, ip_scale=0.7))
        assert_same_images(f"ip-adapter {kind} {family}, {len(images)} image(s)", ours, theirs)
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(pipe.generate(Request.of(**common))).astype(int)).max() > 8


def test_two_adapters_in_one_directory_equal_diffusers(exported, tiny_pipeline, tmp_path):
    """load_ip_adapter([plain, plus]) + set_ip_adapter_scale([a, b]) + ip_adapter_image=[x, [y, z]]: both adapters
    exported into one unet_ip (ip_image_embeds_0/1, ip_scale_0/1), sharing the one image encoder; an adapter the
    request leaves out equals diffusers with its scale 0."""
    import diffusers
    from transformers import CLIPVisionModelWithProjection

    from sdrt.cli.generate import _ip_fields
    from sdrt.export.models.tiny import write_tiny_ip_adapter

    engine = tmp_path / "engine"
    shutil.copytree(exported("sd15", "fp32"), engine, copy_function=os.link)
    encoder, style = write_tiny_ip_adapter(tiny_pipeline("sd15"), tmp_path / "style", seed=4)
    _, face = write_tiny_ip_adapter(tiny_pipeline("sd15"), tmp_path / "face", seed=6, plus=True)  # its encoder unused
    add_controlnets(engine, (), ip_adapter=(f"{style}=style", f"{face}=face"), image_encoder=str(encoder))
    manifest = json.loads((engine / "manifest.json").read_text())
    assert [(a["name"], a["kind"]) for a in manifest["ip_adapter"]["adapters"]] == [("style", "plain"), ("face", "plus")]
    assert {"ip_image_embeds_1", "ip_scale_1"} <= {i["name"] for i in manifest["components"]["unet_ip"]["inputs"]}

    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_pipeline("sd15"), safety_checker=None,
                                                           requires_safety_checker=False)
    ref.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder))
    ref.load_ip_adapter([str(style.parent), str(face.parent)], subfolder=["", ""], weight_name=[style.name, face.name],
                        image_encoder_folder=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    pipe = Pipeline.load(engine, backend="ort-cpu")
    x, y, z = _image(31, 56, 40), _image(32, 40, 40), _image(33, 48, 40)
    common = dict(prompt="a cat", steps=3, sampler="euler", seed=3, guidance=7.5, **SIZE)

    def theirs(scales, images):
        ref.set_ip_adapter_scale(scales)
        return ref("a cat", ip_adapter_image=images, num_inference_steps=3, guidance_scale=7.5,
                   generator=generators(3, 1), output_type="np", **SIZE).images

    both = pipe.generate(Request.of(**common, ip_adapters=[{"name": "style", "image": x, "scale": 0.7},
                                                           {"name": "face", "image": [y, z], "scale": 0.5}]))
    assert_same_images("two ip-adapters (plain + plus, 1 + 2 images)", both, theirs([0.7, 0.5], [x, [y, z]]))
    face_only = pipe.generate(Request.of(**common, ip_adapters=[("face", y, 0.6)]))
    assert_same_images("two ip-adapters, the plain one left out", face_only, theirs([0.0, 0.6], [x, y]))
    for one in (face_only, pipe.generate(Request.of(**common, ip_adapters=[("style", x, 0.7)]))):
        assert np.abs(to_uint8(both).astype(int) - to_uint8(one).astype(int)).max() > 8  # each adapter shows

    opened = open_dir(engine)
    request = Request.of(**common, ip_adapters=[{"name": "face", "image": [y, z], "scale": 0.5}])
    again = Request.from_dict(json.loads(json.dumps(request.to_dict(encode_images=True))))
    job = validate(again, opened).image_prompt
    assert [(p.name, len(p.images), p.scale) for p in job.prompts] == [("face", 2, 0.5)]
    for bad, field, text in [(dict(ip_image=x), "ip_image", "style, face"),
                             (dict(ip_adapters=[("hair", x)]), "ip_adapters[0].name", "it has style, face"),
                             (dict(ip_adapters=[("face", x), ("face", y)]), "ip_adapters[1].name", "twice"),
                             (dict(ip_adapters=[("face", x, float("inf"))]), "ip_adapters[0].scale", "finite"),
                             (dict(ip_adapters=[{"name": "face"}]), "ip_adapters[0].image", "required")]:
        with pytest.raises(InvalidRequest, match=text) as e:
            validate(Request.of(**common, **bad), opened)
        assert e.value.field == field

    for name, image in (("x", x), ("y", y), ("z", z)):
        image.save(tmp_path / f"{name}.png")
    fields = _ip_fields((f"style={tmp_path}/x.png:0.7", f"face={tmp_path}/y.png", f"face={tmp_path}/z.png:0.5"))
    assert [(e["name"], len(e["image"]) if isinstance(e["image"], tuple) else 1, e["scale"])
            for e in fields["ip_adapters"]] == [("style", 1, 0.7), ("face", 2, 0.5)]
    with pytest.raises(UserError, match="of every image"):
        _ip_fields((f"{tmp_path}/x.png", f"face={tmp_path}/y.png"))


def test_faceid_equals_diffusers_with_face_embeddings(exported, tiny_pipeline, tmp_path):
    """IP-Adapter FaceID (IPAdapterFaceIDImageProjection + its own LoRA, loaded by diffusers through
    load_lora_weights): exported without an image encoder; the caller's face embeddings with zeros as the negative,
    as diffusers' FaceID recipe passes ip_adapter_image_embeds=[cat(zeros, embeds)]. Scale 0 keeps the LoRA, as in
    diffusers, so it still differs from the plain UNet."""
    import diffusers

    from sdrt.cli.generate import _ip_fields
    from sdrt.export.models.tiny import FACEID_WIDTH, write_tiny_ip_adapter

    engine = tmp_path / "engine"
    shutil.copytree(exported("sd15", "fp32"), engine, copy_function=os.link)
    _, adapter = write_tiny_ip_adapter(tiny_pipeline("sd15"), tmp_path / "faceid", seed=8, faceid=True)
    add_controlnets(engine, (), ip_adapter=f"{adapter}=faceid")  # no --image-encoder: FaceID needs none
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["ip_adapter"]["adapters"][0]["kind"] == "faceid" and "image_encoder" not in manifest["components"]

    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_pipeline("sd15"), safety_checker=None,
                                                           requires_safety_checker=False)
    ref.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    pipe = Pipeline.load(engine, backend="ort-cpu")
    faces = np.random.default_rng(5).standard_normal((2, FACEID_WIDTH)).astype(np.float32)
    common = dict(prompt="a cat", steps=3, sampler="euler", seed=3, guidance=7.5, **SIZE)

    def theirs(scale):
        import torch

        ref.set_ip_adapter_scale(scale)
        positive = torch.from_numpy(faces)[None]  # [1, faces, D]
        return ref("a cat", ip_adapter_image_embeds=[torch.cat([torch.zeros_like(positive), positive])],
                   num_inference_steps=3, guidance_scale=7.5, generator=generators(3, 1), output_type="np",
                   **SIZE).images

    ours = pipe.generate(Request.of(**common, ip_adapters=[{"name": "faceid", "embeds": faces, "scale": 0.6}]))
    assert_same_images("ip-adapter faceid sd15, two faces", ours, theirs(0.6))
    zero = pipe.generate(Request.of(**common, ip_adapters=[{"name": "faceid", "embeds": faces[0], "scale": 0.0}]))
    assert_same_images("ip-adapter faceid sd15, scale 0 (the LoRA alone)", zero, theirs(0.0))
    plain = pipe.generate(Request.of(**common))
    for a, b in ((ours, zero), (zero, plain)):  # the face embeddings show, and so does the FaceID LoRA
        assert np.abs(to_uint8(a).astype(int) - to_uint8(b).astype(int)).max() > 8

    opened = open_dir(engine)
    request = Request.of(**common, ip_adapters=[{"name": "faceid", "embeds": faces, "scale": 0.6}])
    again = Request.from_dict(json.loads(json.dumps(request.to_dict(encode_images=True))))
    assert np.array_equal(validate(again, opened).image_prompt.prompts[0].embeds, faces)
    for bad, field, text in [(dict(ip_image=_image(0, 32, 32)), "ip_image", "face embeddings"),
                             (dict(ip_adapters=[{"name": "faceid", "image": _image(0, 32, 32)}]), "ip_adapters[0].embeds",
                              "not an image"),
                             (dict(ip_adapters=[{"name": "faceid", "embeds": faces[:, :5]}]), "ip_adapters[0].embeds",
                              rf"\[2, 5\]"),
                             (dict(ip_adapters=[{"name": "faceid", "embeds": [[float("nan")] * FACEID_WIDTH]}]),
                              "ip_adapters[0].embeds", "finite"),
                             (dict(ip_adapters=[{"name": "faceid", "embeds": "abc"}]), "ip_adapters[0].embeds", "shape")]:
        with pytest.raises(InvalidRequest, match=text) as e:
            validate(Request.of(**common, **bad), opened)
        assert e.value.field == field
    np.save(tmp_path / "face.npy", faces)
    fields = _ip_fields((f"faceid={tmp_path}/face.npy:0.6",))
    assert np.array_equal(fields["ip_adapters"][0]["embeds"], faces) and fields["ip_adapters"][0]["scale"] == 0.6
    with pytest.raises(UserError, match="named FaceID adapter"):
        _ip_fields((f"{tmp_path}/face.npy",))
