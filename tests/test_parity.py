"""Image-for-image parity: sdrt's runtime on ORT CPU (fp32 engines) against the diffusers pipeline itself.

Same tiny folder, same seed, same settings; the bound is 1/255 per pixel (one uint8 step), which covers
the different operator order of ONNX Runtime against torch on fp32 weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.runtime.pipeline import Pipeline, Request

MAX_PIXEL_DIFF = 1  # uint8 levels
FIGURES: dict[str, int] = {}


def diffusers_scheduler(pipe, sampler: str, karras: bool = False, **overrides):
    import diffusers

    from sdrt.runtime.samplers.registry import get

    name, extra = get(sampler).diffusers_class, dict(get(sampler).diffusers_config)
    kwargs = {**extra, **overrides}
    if karras:
        kwargs["use_karras_sigmas"] = True
    return getattr(diffusers, name).from_config(pipe.scheduler.config, **kwargs)


def generators(seed: int, count: int) -> list:
    """What sdrt uses for a request seeded `seed` with `count` images: image i has its own generator, seed + i."""
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def reference_pipeline(folder, cls_name: str | None = None):
    import diffusers

    cls = getattr(diffusers, cls_name) if cls_name else diffusers.DiffusionPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_uint8(images) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return (images * 255).round().astype(np.uint8)
    return np.stack([np.asarray(im) for im in images])


def assert_same_images(name: str, ours, theirs) -> None:
    a, b = to_uint8(ours).astype(int), to_uint8(theirs).astype(int)
    assert a.shape == b.shape
    diff = int(np.abs(a - b).max())
    FIGURES[name] = diff
    print(f"parity {name}: max pixel difference {diff}/255")
    assert diff <= MAX_PIXEL_DIFF, f"{name}: max pixel difference {diff}/255"


@pytest.fixture(scope="module")
def engines(ort_pipelines):
    return ort_pipelines


SAMPLER_CASES = [
    ("euler", False), ("euler_a", False), ("heun", False), ("dpmpp_2m", False), ("dpmpp_2m", True),
    ("dpmpp_2m_sde", False), ("ddim", False), ("lcm", False), ("euler", True),
]


@pytest.mark.parametrize("sampler,karras", SAMPLER_CASES)
def test_sd15_samplers_with_guidance_negative_prompt_and_batch(engines, tiny_pipeline, sampler, karras):
    ref = reference_pipeline(tiny_pipeline("sd15"))
    ref.scheduler = diffusers_scheduler(ref, sampler, karras)
    prompts = ["a photo of a cat", "an oil painting of a castle on a hill"]
    kwargs = dict(num_inference_steps=6, guidance_scale=7.5, height=32, width=48)
    theirs = ref(prompts, negative_prompt=["blurry", "ugly"], generator=generators(7, 2),
                 output_type="np", **kwargs).images
    ours = engines("sd15").generate(Request.of(prompt=tuple(prompts), negative_prompt=("blurry", "ugly"), steps=6,
                                            guidance=7.5, sampler=sampler, karras=karras, seed=7, height=32, width=48))
    assert_same_images(f"sd15-{sampler}{'-karras' if karras else ''}", ours, theirs)


def test_sd21_v_prediction_ddim(engines, tiny_pipeline):
    ref = reference_pipeline(tiny_pipeline("sd21v"))
    theirs = ref("a red car", negative_prompt="blurry", num_inference_steps=8, guidance_scale=5.0, height=32,
                 width=32, generator=torch.Generator().manual_seed(3), output_type="np").images
    ours = engines("sd21v").generate(Request.of(prompt=("a red car",), negative_prompt=("blurry",), steps=8,
                                             guidance=5.0, seed=3, height=32, width=32))
    assert_same_images("sd21v-ddim", ours, theirs)


@pytest.mark.parametrize("negative", [None, "low quality"])
def test_sdxl_guidance_with_and_without_negative_prompt_and_images_per_prompt(engines, tiny_pipeline, negative):
    ref = reference_pipeline(tiny_pipeline("sdxl"))
    theirs = ref("a cozy library", negative_prompt=negative, num_inference_steps=5, guidance_scale=5.0,
                 num_images_per_prompt=2, height=32, width=32, generator=generators(11, 2),
                 output_type="np").images
    ours = engines("sdxl").generate(Request.of(prompt=("a cozy library",), negative_prompt=(negative,) if negative else None,
                                            steps=5, guidance=5.0, images_per_prompt=2, seed=11, height=32, width=32))
    assert_same_images(f"sdxl-euler-{'negative' if negative else 'zeros'}", ours, theirs)


def test_sdxl_guidance_rescale(engines, tiny_pipeline):
    ref = reference_pipeline(tiny_pipeline("sdxl"))
    theirs = ref("a cozy library", num_inference_steps=4, guidance_scale=6.0, guidance_rescale=0.7, height=32,
                 width=32, generator=torch.Generator().manual_seed(5), output_type="np").images
    ours = engines("sdxl").generate(Request.of(prompt=("a cozy library",), steps=4, guidance=6.0, guidance_rescale=0.7,
                                            seed=5, height=32, width=32))
    assert_same_images("sdxl-guidance-rescale", ours, theirs)


@pytest.mark.parametrize("steps,prediction", [(4, None), (2, None), (1, "sample")])
def test_sdxl_lightning_presets(engines, tiny_pipeline, steps, prediction):
    ref = reference_pipeline(tiny_pipeline("sdxl-lightning"))
    overrides = {"timestep_spacing": "trailing"} | ({"prediction_type": prediction} if prediction else {})
    ref.scheduler = diffusers_scheduler(ref, "euler", **overrides)
    theirs = ref(["a horse", "a dog"], num_inference_steps=steps, guidance_scale=0, height=32, width=32,
                 generator=generators(42, 2), output_type="np").images
    ours = engines("sdxl-lightning").generate(Request.of(prompt=("a horse", "a dog"), steps=steps, guidance=0,
                                                      sampler="euler", timestep_spacing="trailing",
                                                      prediction_type=prediction, seed=42, height=32, width=32))
    assert_same_images(f"sdxl-lightning-{steps}step", ours, theirs)


def test_sdxl_base_to_refiner_hand_off(engines, tiny_pipeline):
    base, refiner = reference_pipeline(tiny_pipeline("sdxl")), reference_pipeline(tiny_pipeline("sdxl-refiner"))
    g = torch.Generator().manual_seed(9)
    latents = base("a lighthouse", num_inference_steps=10, denoising_end=0.8, guidance_scale=5.0, height=32, width=32,
                   generator=g, output_type="latent").images
    theirs = refiner("a lighthouse", image=latents, num_inference_steps=10, denoising_start=0.8, guidance_scale=5.0,
                     generator=g, output_type="np").images

    ours_base = engines("sdxl")
    request = Request.of(prompt=("a lighthouse",), steps=10, guidance=5.0, seed=9, height=32, width=32, denoising_end=0.8)
    our_latents = list(ours_base.denoise(request))[-1]
    assert torch.allclose(our_latents, latents, rtol=1e-3, atol=1e-3)
    ours = engines("sdxl-refiner").generate(Request.of(prompt=("a lighthouse",), steps=10, guidance=5.0, seed=9,
                                                    init_latents=our_latents, denoising_start=0.8))
    assert_same_images("sdxl-base+refiner", ours, theirs)


def _test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _test_mask(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_sd15_img2img(engines, tiny_pipeline, sampler):
    ref = reference_pipeline(tiny_pipeline("sd15"), "StableDiffusionImg2ImgPipeline")
    ref.scheduler = diffusers_scheduler(ref, sampler)
    image = _test_image(32, 32)
    theirs = ref("a watercolor", image=image, strength=0.6, num_inference_steps=10, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(1), output_type="np").images
    ours = engines("sd15").generate(Request.of(prompt=("a watercolor",), init_image=image, strength=0.6, steps=10,
                                            guidance=7.5, sampler=sampler, seed=1))
    assert_same_images(f"sd15-img2img-{sampler}", ours, theirs)


def test_inpaint_with_a_9_channel_unet(engines, tiny_pipeline):
    ref = reference_pipeline(tiny_pipeline("sd15-inpaint"))
    ref.scheduler = diffusers_scheduler(ref, "euler")
    image, mask = _test_image(32, 32, 1), _test_mask(32, 32)
    theirs = ref("a red door", image=image, mask_image=mask, num_inference_steps=6, guidance_scale=7.5, height=32,
                 width=32, generator=torch.Generator().manual_seed(4), output_type="np").images
    ours = engines("sd15-inpaint").generate(Request.of(prompt=("a red door",), init_image=image, mask=mask, steps=6,
                                                    guidance=7.5, sampler="euler", seed=4, height=32, width=32))
    assert_same_images("sd15-inpaint-9ch", ours, theirs)


def test_inpaint_with_mask_blending_on_an_ordinary_unet(engines, tiny_pipeline):
    ref = reference_pipeline(tiny_pipeline("sd15"), "StableDiffusionInpaintPipeline")
    ref.scheduler = diffusers_scheduler(ref, "euler")
    image, mask = _test_image(32, 32, 2), _test_mask(32, 32)
    theirs = ref("a blue window", image=image, mask_image=mask, num_inference_steps=6, guidance_scale=7.5, height=32,
                 width=32, generator=torch.Generator().manual_seed(8), output_type="np").images
    ours = engines("sd15").generate(Request.of(prompt=("a blue window",), init_image=image, mask=mask, steps=6,
                                            guidance=7.5, sampler="euler", seed=8, height=32, width=32))
    assert_same_images("sd15-inpaint-blend", ours, theirs)
