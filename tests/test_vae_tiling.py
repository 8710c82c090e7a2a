"""Tiled VAE decoding and encoding (runtime/vae_tiling.py) against diffusers with `pipe.vae.enable_tiling()`.

The tiny VAE's own config gives tiles of 32 pixels / 16 latents with 0.25 overlap (AutoencoderKL.__init__), so
a 64x48 image decodes as 2 × 3 = 6 overlapping tiles and encodes as 2 × 3 as well: tiling really happens, and
its seams make the tiled image differ from the untiled one, which the tests check too.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from test_parity import assert_same_images, diffusers_scheduler, generators, reference_pipeline, to_uint8

from sdrt.runtime.limits import Limits, estimate_bytes
from sdrt.runtime.loader import open_dir
from sdrt.runtime.request import Request
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.validate import validate
from sdrt.runtime.vae_tiling import Tiles

WIDTH, HEIGHT = 64, 48


@pytest.fixture(scope="module")
def pipe(ort_pipelines):
    return ort_pipelines("sd15")


def _reference(tiny_pipeline, cls=None):
    ref = reference_pipeline(tiny_pipeline("sd15"), cls)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    ref.vae.enable_tiling()
    return ref


def _max_diff(a, b) -> int:
    return int(np.abs(to_uint8(a).astype(int) - to_uint8(b).astype(int)).max())


def test_tiles_of_the_tiny_vae_follow_diffusers(tiny_pipeline):
    ref = _reference(tiny_pipeline)
    tiles = Tiles.of_vae(dict(ref.vae.config))
    assert (tiles.sample_size, tiles.latent_size, tiles.overlap) == \
        (ref.vae.tile_sample_min_size, ref.vae.tile_latent_min_size, ref.vae.tile_overlap_factor) == (32, 16, 0.25)
    assert tiles.count(HEIGHT // 2, WIDTH // 2) == 6 and tiles.count(HEIGHT, WIDTH, latent=False) == 6


def test_tiled_decode_equals_diffusers_enable_tiling(pipe, tiny_pipeline):
    ref = _reference(tiny_pipeline)
    theirs = ref(["a cat", "a dog"], num_inference_steps=2, guidance_scale=7.5, height=HEIGHT, width=WIDTH,
                 generator=generators(3, 2), output_type="np").images
    request = dict(prompt=("a cat", "a dog"), steps=2, guidance=7.5, height=HEIGHT, width=WIDTH, seed=3,
                   sampler="euler")
    ours = pipe.generate(Request.of(**request, vae_tiling="on"))
    assert_same_images("sd15-tiled-vae-decode", ours, theirs)
    whole = pipe.generate(Request.of(**request, vae_tiling="off"))
    assert _max_diff(ours, whole) > 1  # the seams: tiling ran


def test_tiled_encode_equals_diffusers_enable_tiling(pipe, tiny_pipeline):
    ref = _reference(tiny_pipeline, "StableDiffusionImg2ImgPipeline")
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    theirs = ref("a watercolor", image=image, strength=0.5, num_inference_steps=4, guidance_scale=7.5,
                 generator=generators(2, 1), output_type="np").images
    request = dict(prompt="a watercolor", init_image=image, strength=0.5, steps=4, guidance=7.5, sampler="euler",
                   seed=2)
    ours = pipe.generate(Request.of(**request, vae_tiling="on"))
    assert_same_images("sd15-img2img-tiled-vae", ours, theirs)
    assert _max_diff(ours, pipe.generate(Request.of(**request, vae_tiling="off"))) > 1


def test_tiling_is_chosen_when_the_whole_decode_would_not_fit(exported):
    d = open_dir(exported("sd15", "fp32"))
    args = (d.unet_config, d.vae_config, 1, 2, HEIGHT, WIDTH, d.vae_scale_factor)
    whole, tiled = estimate_bytes(*args), estimate_bytes(*args, vae_tile=Tiles.of_vae(d.vae_config).latent_size)
    assert tiled < whole
    limits = Limits(max_memory_bytes=(whole + tiled) // 2)
    request = dict(prompt="a cat", width=WIDTH, height=HEIGHT)
    auto = validate(Request.of(**request), d, limits)
    assert auto.tile_vae and auto.estimated_bytes == tiled
    assert not validate(Request.of(**request), d).tile_vae  # fits whole: no tiling
    with pytest.raises(InvalidRequest) as e:
        validate(Request.of(**request, vae_tiling="off"), d, limits)
    assert e.value.field == "width" and "GiB" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        validate(Request.of(**request), d, Limits(max_memory_bytes=tiled - 1))
    assert "even with the VAE tiled" in e.value.message
    with pytest.raises(InvalidRequest, match="vae_tiling: must be one of auto, on, off"):
        validate(Request.of(**request, vae_tiling="sometimes"), d)


def test_cli_names_the_flag(exported):
    from sdrt.cli.generate import as_cli_error

    with pytest.raises(InvalidRequest) as e:
        validate(Request.of(prompt="a cat", vae_tiling="sometimes"), open_dir(exported("sd15", "fp32")))
    assert str(as_cli_error(e.value)) == "--vae-tiling must be one of auto, on, off (got 'sometimes')"
