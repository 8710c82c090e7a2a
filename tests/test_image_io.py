"""Image output: the NaN/overflow check and the AUTOMATIC1111 parameters text."""

from __future__ import annotations

import pytest
import torch

from sdrt.runtime.image_io import GenerationParameters, VaeOverflow, to_pil


def test_non_finite_vae_output_is_refused_with_the_likely_cause():
    decoded = torch.zeros(1, 3, 8, 8)
    decoded[0, 0, 0, 0] = float("inf")
    with pytest.raises(VaeOverflow, match="ran in fp16 and overflowed"):
        to_pil(decoded, fp16_vae=True)
    decoded[0, 0, 0, 0] = float("nan")
    with pytest.raises(VaeOverflow, match="latents were already non-finite"):
        to_pil(decoded, fp16_vae=False)


def test_vae_output_maps_like_diffusers_postprocess():
    decoded = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)
    [image] = to_pil(decoded, fp16_vae=False)
    assert list(image.getdata(0)) == [0, 128, 255, 255]  # (x/2+0.5).clamp(0,1)*255, rounded


def test_a1111_parameters_text():
    params = GenerationParameters(prompt="a cat", negative_prompt="", steps=4, sampler="euler", cfg_scale=0.0,
                                  seed=42, width=1024, height=768, model="lightning")
    assert params.a1111_text() == ("a cat\nSteps: 4, Sampler: euler, CFG scale: 0, Seed: 42, Size: 1024x768, "
                                   "Model: lightning")
