"""Every registered sampler, image for image against the diffusers pipeline with that sampler's scheduler.

Tiny SD 1.5 (guidance 7.5, two prompts, negative prompts) and tiny SDXL (guidance off, the Lightning/Turbo way,
two images per prompt), ORT CPU fp32 engines, diffusers given one generator per image (seed + i), bound 1/255
per pixel as tests/test_parity.py. The classic samplers' own cases are in tests/test_parity.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sdrt.runtime.samplers import edm, flow, registry as sampler_registry
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.loader import open_dir
from sdrt.runtime.request import Request
from sdrt.runtime.validate import validate
from test_parity import assert_same_images, generators, reference_pipeline

CLASSIC = ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "lcm")
# the samplers of the discrete-time (VP) formulation; EDM's and flow matching's run on their own models
# (tests/test_unet_variants.py, tests/test_sd3.py, tests/test_flux.py) and are refused on these
OTHER_FORMULATIONS = tuple(s.name for s in (*edm.SPECS, *flow.SPECS))
NEW = tuple(n for n in sampler_registry.NAMES if n not in CLASSIC and n not in OTHER_FORMULATIONS)
STEPS = 5


def _reference_scheduler(pipe, name: str, seed: int, schedule: str | None = None):
    """The scheduler the registry says `name` equals, built from the model's own (PNDM) config."""
    import diffusers

    spec = sampler_registry.get(name)
    extra = dict(spec.diffusers_config)
    if name == "dpmpp_sde":  # its Brownian tree is seeded from the config, not the pipeline's generator
        extra["noise_sampler_seed"] = seed
    if schedule:
        extra[f"use_{schedule}_sigmas"] = True
    return getattr(diffusers, spec.diffusers_class).from_config(pipe.original_scheduler_config, **extra)


def _needs(name: str):
    if name == "dpmpp_sde" and importlib.util.find_spec("torchsde") is None:
        pytest.skip("dpmpp_sde needs torchsde (pip install torchsde)")


@pytest.fixture(scope="module")
def pipelines(exported, tiny_pipeline):
    cache = {}

    def get(family: str):
        if family not in cache:
            ref = reference_pipeline(tiny_pipeline(family))
            ref.original_scheduler_config = ref.scheduler.config
            cache[family] = (Pipeline.load(exported(family, "fp32"), backend="ort-cpu"), ref)
        return cache[family]

    return get


def _diffusers_fails(name: str, theirs, mine) -> bool:
    """UniPC bh1 with final sigma 0: diffusers' last step computes 0 * -inf (NaN, a black image); sdrt returns the
    limit, the model's x0 (tests/test_samplers_multistep.py checks every earlier step against diffusers)."""
    import numpy as np

    if name != "unipc_bh1":
        return False
    assert np.isnan(theirs).any(), "diffusers' UniPC bh1 no longer fails: compare the images"
    assert all(np.asarray(image).std() > 0 for image in mine)
    return True


@pytest.mark.parametrize("name", NEW)
def test_sd15_with_guidance_two_prompts(pipelines, name):
    _needs(name)
    ours, ref = pipelines("sd15")
    prompts = ["a photo of a cat", "an oil painting of a castle"]
    batch = 1 if name == "dpmpp_sde" else 2  # diffusers seeds dpmpp_sde's one Brownian tree per batch
    prompts = prompts[:batch]
    ref.scheduler = _reference_scheduler(ref, name, 7)
    theirs = ref(prompts, negative_prompt=["blurry"] * batch, num_inference_steps=STEPS, guidance_scale=7.5,
                 height=32, width=48, generator=generators(7, batch), output_type="np").images
    mine = ours.generate(Request.of(prompt=prompts, negative_prompt="blurry", steps=STEPS, guidance=7.5, sampler=name,
                                    seed=7, width=48, height=32))
    if not _diffusers_fails(name, theirs, mine):
        assert_same_images(f"sd15-{name}", mine, theirs)


# on SDXL a few representatives run by default (every sampler runs on SD 1.5 above and in layer 1); the rest: slow
SDXL_DEFAULT = ("unipc", "dpmpp_sde", "pndm", "tcd")


@pytest.mark.parametrize("name", [n if n in SDXL_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in NEW])
def test_sdxl_without_guidance_two_images_per_prompt(pipelines, name):
    _needs(name)
    ours, ref = pipelines("sdxl")
    batch = 1 if name == "dpmpp_sde" else 2
    ref.scheduler = _reference_scheduler(ref, name, 3)
    theirs = ref("a cozy library", num_inference_steps=STEPS, guidance_scale=0.0, num_images_per_prompt=batch,
                 height=32, width=32, generator=generators(3, batch), output_type="np").images
    mine = ours.generate(Request.of(prompt="a cozy library", steps=STEPS, guidance=0.0, sampler=name, seed=3,
                                    batch=batch, width=32, height=32))
    if not _diffusers_fails(name, theirs, mine):
        assert_same_images(f"sdxl-{name}", mine, theirs)


@pytest.mark.parametrize("display", ["DPM++ 2M Karras", "LMS Karras", "UniPC", "DPM++ 3M SDE Exponential"])
def test_a1111_names_equal_diffusers_with_that_schedule(pipelines, display):
    name, schedule = sampler_registry.resolve(display)
    ours, ref = pipelines("sd15")
    ref.scheduler = _reference_scheduler(ref, name, 5, schedule)
    theirs = ref("a lighthouse", num_inference_steps=STEPS, guidance_scale=5.0, height=32, width=32,
                 generator=generators(5, 1), output_type="np").images
    mine = ours.generate(Request.of(prompt="a lighthouse", steps=STEPS, guidance=5.0, sampler=display, seed=5,
                                    width=32, height=32))
    assert_same_images(f"sd15-{display}", mine, theirs)


def test_model_default_sampler_follows_its_scheduler_class(exported, tmp_path):
    """PNDM (SD 1.5's own scheduler class) and LMS configs run their own sampler, not a fallback to euler."""
    import json
    import shutil

    for cls, expected in (("PNDMScheduler", "pndm"), ("LMSDiscreteScheduler", "lms"),
                          ("UniPCMultistepScheduler", "unipc"), ("KDPM2AncestralDiscreteScheduler", "kdpm2_a")):
        folder = tmp_path / cls
        shutil.copytree(exported("sd15", "fp32"), folder)
        config_path = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(config_path.read_text())
        config["_class_name"] = cls
        config_path.write_text(json.dumps(config))
        assert validate(Request(prompt="a"), open_dir(folder)).sampler == expected
