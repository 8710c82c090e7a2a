"""sdrt.compat.DiffusionPipeline against diffusers' own pipelines: the same call on the same tiny folder (diffusers)
and its export (sdrt, ORT CPU, fp32) gives images within 1/255 (tests/test_parity.py's bound): one generator and a
list (diffusers' draw semantics, compat/pipeline.py DiffusersDraws), scheduler swaps by from_config, LoRA adapters
(set_adapters, fuse/unfuse), img2img and inpainting, latents in and out, step callbacks, SDXL's own defaults; and
every argument sdrt does not do raises, naming it. The SDXL, 9-channel inpainting and textual-inversion checks export
more and are marked slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_lora import MIN_MOVE, make_layers, moved, write_diffusers
from test_parity import _test_image, _test_mask, assert_same_images, reference_pipeline

from sdrt.compat import DiffusionPipeline

SIZE, STEPS = 32, 3


def one(seed: int = 3):
    return torch.Generator().manual_seed(seed)


def each(count: int, seed: int = 3):
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def scheduler(pipe, name: str, **config):
    """diffusers' scheduler class `name` from the pipeline's scheduler config."""
    import diffusers

    return getattr(diffusers, name).from_config(pipe.scheduler.config, **config)


@pytest.fixture(scope="module")
def sd15(tiny_pipeline, exported):
    """(diffusers' pipeline, sdrt's engine directory); `theirs` makes pipelines sharing its modules (the LoRA test
    loads its own, as LoRA layers change the modules)."""
    return reference_pipeline(tiny_pipeline("sd15")), exported("sd15")


def ours(exported_dir, name: str | None = None, **config) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(exported_dir, backend="ort-cpu")
    if name:
        pipe.scheduler = scheduler(pipe, name, **config)
    return pipe


def theirs(ref, cls: str = "StableDiffusionPipeline", name: str | None = None, **config):
    import diffusers

    pipe = getattr(diffusers, cls)(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    if name:
        pipe.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config, **config)
    return pipe


# ---- text to image --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,config,gens", [
    (None, {}, "one"),  # the model's PNDM
    ("EulerAncestralDiscreteScheduler", {}, "one"),  # noise drawn every step from the one generator
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, "list"),
])
def test_txt2img_with_one_generator_or_a_list_equals_diffusers(sd15, name, config, gens):
    ref, engine = sd15
    make = (lambda: one()) if gens == "one" else (lambda: each(2))
    kw = dict(num_inference_steps=STEPS, negative_prompt="blurry", num_images_per_prompt=2, height=SIZE,
              width=SIZE, output_type="np")
    expected = theirs(ref, name=name, **config)("a red fox", generator=make(), **kw).images
    got = ours(engine, name, **config)("a red fox", generator=make(), **kw).images
    assert_same_images(f"compat-{name or 'pndm'}-{gens}", got, expected)
    # the one generator really is drawn for the whole batch: image 1 is not what a generator of its own gives
    if gens == "one":
        alone = ours(engine, name, **config)("a red fox", generator=each(2), **kw).images
        assert moved(alone[1:], got[1:]) > 1


def test_scheduler_assignment_selects_the_equal_sampler_or_says_why_not(sd15):
    import diffusers

    _, engine = sd15
    pipe = ours(engine)
    model = pipe.scheduler.config
    assert pipe.scheduler.sampler is None and model["_class_name"] == "PNDMScheduler"
    cases = [(diffusers.EulerAncestralDiscreteScheduler, {}, ("euler_a", None)),
             (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, ("dpmpp_2m", "karras")),
             # karras off explicitly: in a long session diffusers' from_config was seen carrying the previous
             # DPMSolverMultistep's use_karras_sigmas into this one (order-dependent, outside sdrt)
             (diffusers.DPMSolverMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": False},
              ("dpmpp_3m", None)),
             (diffusers.UniPCMultistepScheduler, {"timestep_spacing": "trailing"}, ("unipc", None))]
    for cls, config, (sampler, schedule) in cases:
        pipe.scheduler = cls.from_config(model, **config)
        assert (pipe.scheduler.sampler, pipe.scheduler.schedule) == (sampler, schedule)
    assert pipe.scheduler.timestep_spacing == "trailing"
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the config carries on
    assert (pipe.scheduler.sampler, pipe.scheduler.timestep_spacing) == ("euler", "trailing")
    pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(model, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="DDPMScheduler"):
        pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler.*dpmpp_2m"):
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                           algorithm_type="dpmsolver",
                                                                           final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                      rescale_betas_zero_snr=True)
    assert pipe.scheduler.sampler == "unipc"  # a refused assignment leaves the scheduler as it was


def test_latents_in_and_out_and_a_step_callback_that_changes_them(sd15):
    ref, engine = sd15
    seen = {"theirs": [], "ours": []}

    def callback(key):
        def f(pipe, i, t, kwargs):
            seen[key].append((i, float(t), kwargs["latents"].clone()))
            return {"latents": kwargs["latents"] * 0.6} if i == 1 else kwargs
        return f

    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=one(5))
    kw = dict(num_inference_steps=4, height=SIZE, width=SIZE, latents=latents)
    expected = theirs(ref)("a boat", callback_on_step_end=callback("theirs"), output_type="latent", **kw).images
    got = ours(engine)("a boat", callback_on_step_end=callback("ours"), output_type="latent", **kw).images
    assert [(i, t) for i, t, _ in seen["ours"]] == [(i, t) for i, t, _ in seen["theirs"]]
    for (_, _, a), (_, _, b) in zip(seen["ours"], seen["theirs"]):  # PNDM: diffusers' alpha-space latents
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    plain = ours(engine)("a boat", output_type="latent", **kw).images
    assert (plain - got).abs().max() > 0.05  # the callback's change went into the loop
    images = ours(engine)("a boat", output_type="np", **kw).images
    assert images.dtype == np.float32 and images.shape == (1, SIZE, SIZE, 3)
    assert_same_images("compat-latents-np", images, theirs(ref)("a boat", output_type="np", **kw).images)

    def stop(pipe, i, t, kwargs):  # diffusers' way to end early: the latents held after step 1 are decoded
        pipe._interrupt = pipe._interrupt or i == 1
        return kwargs

    kw = dict(num_inference_steps=4, height=SIZE, width=SIZE, output_type="np", callback_on_step_end=stop)
    assert_same_images("compat-interrupt", ours(engine)("a boat", generator=one(), **kw).images,
                       theirs(ref)("a boat", generator=one(), **kw).images)


def test_diffusers_is_not_imported(exported):
    code = ("import sys, torch; from sdrt.compat import DiffusionPipeline; "
            f"p = DiffusionPipeline.from_pretrained({str(exported('sd15'))!r}, backend='onnxruntime'); "
            "p('a cat', num_inference_steps=1, height=32, width=32, generator=torch.Generator().manual_seed(0)); "
            "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# ---- images in ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,name,gens", [
    ("StableDiffusionImg2ImgPipeline", "EulerAncestralDiscreteScheduler", "one"),
    ("StableDiffusionImg2ImgPipeline", None, "list"),
    ("StableDiffusionInpaintPipeline", "EulerAncestralDiscreteScheduler", "one"),
    ("StableDiffusionInpaintPipeline", "DDIMScheduler", "list"),
])
def test_img2img_and_inpainting_draw_as_diffusers(sd15, cls, name, gens):
    ref, engine = sd15
    image, mask = _test_image(SIZE, SIZE, 1), _test_mask(SIZE, SIZE)
    inpaint = "Inpaint" in cls
    kw = dict(image=image, num_inference_steps=5, num_images_per_prompt=2, output_type="np",
              **({"mask_image": mask, "strength": 0.7} if inpaint else {"strength": 0.6}))
    make = (lambda: one(4)) if gens == "one" else (lambda: each(2, 4))
    expected = theirs(ref, cls, name)("a door", generator=make(), **kw).images
    got = ours(engine, name)("a door", generator=make(), **kw).images
    assert_same_images(f"compat-{cls}-{name}-{gens}", got, expected)


# ---- LoRA -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_files(tiny_pipeline, tmp_path_factory):
    root, folder = tmp_path_factory.mktemp("compat-loras"), tiny_pipeline("sd15")
    return (write_diffusers(root / "a.safetensors", make_layers(folder, {"unet": (4, 0.02), "text_encoder": (4, 0.1)},
                                                                 seed=1)),
            write_diffusers(root / "b.safetensors", make_layers(folder, {"unet": (4, 0.03)}, seed=3)))


def test_lora_adapters_set_fused_and_unfused_equal_diffusers(sd15, tiny_pipeline, lora_files):
    a, b = map(str, lora_files)
    _, engine = sd15
    ref, pipe = reference_pipeline(tiny_pipeline("sd15")), ours(engine)
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np")

    def both():  # (diffusers', sdrt's)
        return ref("a fox", generator=one(), **kw).images, pipe("a fox", generator=one(), **kw).images

    base = pipe("a fox", generator=one(), **kw).images  # sdrt's base equals diffusers' (the tests above)
    for p in (ref, pipe):
        p.load_lora_weights(a, adapter_name="a")
    expected, got = both()
    assert moved(expected, base) >= MIN_MOVE
    assert_same_images("compat-lora-a", got, expected)
    for p in (ref, pipe):
        p.load_lora_weights(b, adapter_name="b")  # diffusers: b on the UNet, a still on the text encoder
    with pytest.raises(ValueError, match="set_adapters"):
        pipe("a fox", generator=one(), **kw)
    for p in (ref, pipe):
        p.set_adapters(["a", "b"], adapter_weights=[0.5, -0.7])
    assert pipe.get_active_adapters() == ["a", "b"]
    expected, got = both()
    assert moved(expected, base) >= MIN_MOVE
    assert_same_images("compat-lora-a+b", got, expected)
    scaled = pipe("a fox", generator=one(), cross_attention_kwargs={"scale": 0.5}, **kw).images
    pipe.set_adapters(["a", "b"], adapter_weights=[0.25, -0.35])  # diffusers' scale multiplies every weight
    assert moved(scaled, got) > 1 and moved(scaled, pipe("a fox", generator=one(), **kw).images) == 0
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, -0.7])
    for p in (ref, pipe):
        p.fuse_lora(lora_scale=0.8)
    assert_same_images("compat-lora-fused", *reversed(both()))
    for p in (ref, pipe):
        p.unfuse_lora()  # diffusers leaves the adapters scaled by lora_scale
    assert pipe.get_active_adapters() == ["a", "b"]
    assert_same_images("compat-lora-unfused", *reversed(both()))


# ---- what sdrt does not do ----------------------------------------------------------------------------------

def test_every_argument_sdrt_does_not_do_raises_naming_it(sd15):
    _, engine = sd15
    pipe = ours(engine)
    kw = dict(num_inference_steps=1, height=SIZE, width=SIZE)
    cases = [
        (TypeError, "prompt_embeds", dict(prompt_embeds=torch.zeros(1, 77, 32))),
        (TypeError, "ip_adapter_image", dict(ip_adapter_image=_test_image(SIZE, SIZE))),
        (TypeError, "made_up_argument", dict(made_up_argument=1)),
        (ValueError, "eta", dict(eta=0.5)),
        (ValueError, "output_type", dict(output_type="pt")),
        (ValueError, "callback_on_step_end_tensor_inputs", dict(callback_on_step_end_tensor_inputs=["prompt_embeds"])),
        (ValueError, "cross_attention_kwargs", dict(cross_attention_kwargs={"ip_adapter_masks": None})),
        (ValueError, "generator", dict(generator=each(3))),
        (TypeError, "generator", dict(generator=3)),
        (TypeError, "image", dict(image=np.zeros((SIZE, SIZE, 3), np.uint8))),
        (ValueError, "strength", dict(strength=0.5)),
        (ValueError, "latents", dict(latents=torch.zeros(1, 4, 3, 3))),
        (ValueError, "num_inference_steps", dict(num_inference_steps=0)),
        (ValueError, "guidance_scale", dict(guidance_scale=-1.0)),
        (ValueError, "mask_image", dict(mask_image=_test_mask(SIZE, SIZE))),
    ]
    for error, name, extra in cases:
        with pytest.raises(error, match=name):
            pipe("a cat", **{**kw, **extra})
    with pytest.raises(ValueError, match="prompt"):
        pipe(**kw)
    with pytest.raises(TypeError, match="variant"):
        DiffusionPipeline.from_pretrained(engine, variant="fp16")
    with pytest.raises(ValueError, match="torch_dtype"):
        DiffusionPipeline.from_pretrained(engine, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="to: "):
        pipe.to("cuda")
    with pytest.raises(TypeError, match="components"):
        pipe.fuse_lora(components=["unet"])
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        pipe.set_adapters(["x"])
    with pytest.raises(ValueError, match="load_textual_inversion.*inputs_embeds"):
        pipe.load_textual_inversion(str(engine / "manifest.json"), token="x")


# ---- heavier: SDXL, a 9-channel inpainting UNet, textual inversion ---------------------------------------------

@pytest.mark.slow
def test_sdxl_defaults_and_img2img_equal_diffusers(tiny_pipeline, exported):
    import diffusers

    ref = reference_pipeline(tiny_pipeline("sdxl"))
    pipe = ours(exported("sdxl"))
    kw = dict(num_inference_steps=4, height=SIZE, width=SIZE, num_images_per_prompt=2, output_type="np")
    # guidance_scale left out: SDXL's pipelines default to 5.0, not SD's 7.5
    assert_same_images("compat-sdxl", pipe("a cozy library", generator=one(2), **kw).images,
                       ref("a cozy library", generator=one(2), **kw).images)
    i2i = theirs(ref, "StableDiffusionXLImg2ImgPipeline")
    kw = dict(image=_test_image(SIZE, SIZE), num_inference_steps=6, num_images_per_prompt=2, output_type="np")
    assert isinstance(i2i, diffusers.StableDiffusionXLImg2ImgPipeline)  # strength left out: SDXL's 0.3
    assert_same_images("compat-sdxl-img2img", pipe("a cozy library", generator=one(2), **kw).images,
                       i2i("a cozy library", generator=one(2), **kw).images)


@pytest.mark.slow
def test_nine_channel_inpainting_equals_diffusers(tiny_pipeline, exported):
    ref, pipe = reference_pipeline(tiny_pipeline("sd15-inpaint")), ours(exported("sd15-inpaint"))
    kw = dict(image=_test_image(SIZE, SIZE, 1), mask_image=_test_mask(SIZE, SIZE), num_inference_steps=4,
              num_images_per_prompt=2, output_type="np")
    for name, make in (("one", lambda: one(3)), ("list", lambda: each(2))):
        assert_same_images(f"compat-inpaint-9ch-{name}", pipe("a door", generator=make(), **kw).images,
                           ref("a door", generator=make(), **kw).images)


@pytest.mark.slow
def test_textual_inversion_under_its_own_token_equals_diffusers(tiny_pipeline, exported, tmp_path):
    from safetensors.torch import save_file

    from sdrt.export.exporter import ExportConfig, export

    engine = tmp_path / "sd15-ti"
    shutil.copytree(exported("sd15"), engine, copy_function=os.link)
    export(ExportConfig(model=str(tiny_pipeline("sd15")), output=tmp_path / "variants", precision="fp32",
                        components=("text_encoder_embeds",)))
    shutil.copytree(tmp_path / "variants" / "text_encoder_embeds", engine / "text_encoder_embeds")
    path = tmp_path / "shiny.safetensors"
    save_file({"emb_params": 2.0 * torch.randn(2, 32, generator=one(1))}, str(path))
    ref, pipe = reference_pipeline(tiny_pipeline("sd15")), ours(engine)
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np")
    base = ref("a photo of a <sparkle> cat", generator=one(), **kw).images
    for p in (ref, pipe):
        p.load_textual_inversion(str(path), token="<sparkle>")  # not the file's stem
    expected = ref("a photo of a <sparkle> cat", generator=one(), **kw).images
    assert moved(expected, base) >= MIN_MOVE
    assert_same_images("compat-ti", pipe("a photo of a <sparkle> cat", generator=one(), **kw).images, expected)
