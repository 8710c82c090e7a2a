"""Any latent size: the exported UNet resizes each up-sampler to its skip connection, as diffusers does.

diffusers' UNet down-samples n → ceil(n/2), so an up-sampler goes from m to S = 2m (a multiple of the
down-sampling factor) or S = 2m - 1 (not), per dimension. The sub-pixel rewrite handles both in one graph
(export/rewrites.py); here: the module against diffusers' Upsample2D in torch and in ONNX Runtime, whole
images against the diffusers pipelines at odd latent sizes, the manifest and the loader, TensorRT profiles.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.models.upsampling import Upsample2D

from conftest import run_sdrt
from sdrt.engines import trt_profiles as tp
from sdrt.export.onnx_export import torch_to_onnx
from sdrt.export.rewrites import SKIP_SIZE_PASS, SubpixelUpsample2D, subpixel_upsampling, upsamplers_sized
from sdrt.runtime.errors import UserError
from sdrt.runtime.loader import open_dir

MAX_PIXEL_DIFF = 1  # uint8 levels, as tests/test_parity.py


def _upsampler(channels: int = 8, out_channels: int = 6, seed: int = 0) -> Upsample2D:
    torch.manual_seed(seed)
    module = Upsample2D(channels, use_conv=True, out_channels=out_channels).eval()
    with torch.no_grad():  # a trained model's magnitude, not the tiny init's
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


def _rel_err(got, expected) -> float:
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def _sizes(h: int, w: int):
    """Every skip size a UNet gives an up-sampler of an h×w input: 2h - 1 or 2h, 2w - 1 or 2w."""
    return list(itertools.product((2 * h - 1, 2 * h), (2 * w - 1, 2 * w)))


# ---- the module ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (2, 8, 3, 4), (1, 8, 7, 5), (3, 8, 6, 9)])
def test_rewritten_upsampler_equals_diffusers_at_the_skip_size(shape):
    original = _upsampler()
    rewritten = SubpixelUpsample2D(original)
    x = torch.randn(shape)
    for size in _sizes(*shape[2:]):
        with torch.no_grad():
            expected, got = original(x, size), rewritten(x, size)
        assert got.shape == expected.shape == (shape[0], 6, *size)
        assert _rel_err(got, expected) < 1e-5, size
    assert rewritten.took_output_size


def test_other_output_sizes_fall_back_to_diffusers():
    original = _upsampler()
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        for size in [(6, 8), (8, 9), (3, 3)]:
            assert torch.equal(SubpixelUpsample2D(original)(x, size), original(x, size))


class _ToSkipSize(torch.nn.Module):
    """What a UNet up block does: resize to the skip connection's (traced) size."""

    def __init__(self, up):
        super().__init__()
        self.up = up

    def forward(self, x, skip):
        return self.up(x, skip.shape[2:])


def test_one_onnx_graph_with_dynamic_size_is_exact_at_both_parities(tmp_path):
    original = _upsampler(seed=1)
    path = tmp_path / "up.onnx"
    torch_to_onnx(_ToSkipSize(SubpixelUpsample2D(original)), (torch.randn(1, 8, 3, 4), torch.zeros(1, 1, 5, 8)), path,
                  ["x", "skip"], ["y"], {"x": {0: "b", 2: "h", 3: "w"}, "skip": {2: "sh", 3: "sw"},
                                         "y": {0: "b", 2: "sh", 3: "sw"}})
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Resize" not in ops and "Pad" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, h, w in [(1, 3, 4), (2, 1, 1), (1, 6, 5), (2, 8, 8)]:
        x = torch.randn(batch, 8, h, w)
        for size in _sizes(h, w):
            with torch.no_grad():
                expected = original(x, size).numpy()
            got = session.run(None, {"x": x.numpy(), "skip": np.zeros((1, 1, *size), np.float32)})[0]
            assert got.shape == expected.shape
            assert _rel_err(got, expected) < 1e-5, (h, w, size)


def test_upsamplers_sized_counts_what_took_the_skip_size():
    root = torch.nn.ModuleList([_upsampler(), _upsampler(), Upsample2D(8, use_conv_transpose=True)])
    with subpixel_upsampling(root) as count, torch.no_grad():
        assert count == 2 and upsamplers_sized(root) == (0, 3)
        root[0](torch.randn(1, 8, 3, 3), (5, 6))
        root[1](torch.randn(1, 8, 3, 3))
        assert upsamplers_sized(root) == (1, 3)


def test_a_deeper_unet_traced_off_its_multiple_runs_every_size_in_onnx_runtime(tmp_path):
    """Three levels (factor 4, two up-samplers, attention between them), traced as the exporter does: one graph
    for sizes odd at both up-samplers, at one of them, per dimension, and exact multiples."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from sdrt.export.components import Shape, _unet_spec, gate_shapes

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
        attention_head_dim=4, norm_num_groups=8).eval()
    pipe = SimpleNamespace(unet=unet)
    spec = _unet_spec(with_added_cond=False)
    wrapper = spec.make_module(pipe).eval()
    traced = gate_shapes(pipe, "unet")[0]
    assert traced.latent_height % 4 and traced.latent_width % 4  # off the multiple: the skip-size path
    path = tmp_path / "unet.onnx"
    with subpixel_upsampling(wrapper) as count:
        torch_to_onnx(wrapper, spec.make_inputs(pipe, traced, torch.float32), path, spec.input_names,
                      spec.output_names, spec.dynamic_axes)
        assert count == 2 and upsamplers_sized(wrapper) == (2, 2)
    assert "Resize" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Sides down 13 → 7 → 4, up 4 → 7 → 13 (2m - 1 at both); 17 → 9 → 5 (both); 14 → 7 → 4 (2m - 1, then 2m);
    # 10 → 5 → 3 (both); 12 and 20 (2m at both); 1 → 1 → 1 (both); 6 → 3 → 2 (2m - 1, then 2m).
    for batch, h, w in [(1, 13, 17), (2, 14, 10), (1, 12, 20), (1, 1, 6)]:
        inputs = spec.make_inputs(pipe, Shape(batch, h, w), torch.float32)
        with torch.no_grad():
            expected = wrapper(*inputs).numpy()
        got = session.run(None, dict(zip(spec.input_names, (x.numpy() for x in inputs))))[0]
        assert got.shape == expected.shape == (batch, 4, h, w)
        assert _rel_err(got, expected) < 1e-5, (h, w)


# ---- whole images against diffusers -----------------------------------------------------------------------

def _reference(folder):
    """The diffusers pipeline. Its check_inputs insists on multiples of 8 pixels, the real VAE's factor; the
    tiny VAE's factor is 2, so odd latent sizes need pixels that are not multiples of 8: the check is given a
    size it accepts, and the pipeline itself runs at the requested one (its UNet then forwards skip sizes)."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    check = pipe.check_inputs
    signature = inspect.signature(check)

    def check_inputs(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments.update(height=8, width=8)
        return check(*bound.args, **bound.kwargs)

    pipe.check_inputs = check_inputs
    return pipe


def _request(**flat):
    from sdrt.runtime.request import Request

    return Request.of(**flat)


def _uint8(images) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return (images * 255).round().astype(np.uint8)
    return np.stack([np.asarray(im) for im in images])


@pytest.fixture(scope="module")
def engines():
    from sdrt.runtime.pipeline import Pipeline

    cache = {}

    def get(engine_dir):
        if engine_dir not in cache:
            cache[engine_dir] = Pipeline.load(engine_dir, backend="ort-cpu")
        return cache[engine_dir]

    return get


# (family, latent height, latent width): the tiny UNet down-samples once (factor 2), so 13 and 17 are odd at
# its up-sampler (7 → 13, 9 → 17); 14×17 is exact in height only; 16×12 doubles everywhere.
# By default SD 1.5 only: the SDXL UNet at odd sizes runs by default in test_odd_latent_sizes_with_an_init_image
# (the refiner); sd21v is the SD 1.5 UNet with another width and prediction type.
CASES = [("sd15", 13, 17), pytest.param("sd15", 14, 17, marks=pytest.mark.slow), ("sd15", 16, 12),
         pytest.param("sd21v", 13, 17, marks=pytest.mark.slow), pytest.param("sdxl", 13, 17, marks=pytest.mark.slow),
         pytest.param("sdxl", 16, 12, marks=pytest.mark.slow),
         pytest.param("sdxl-lightning", 13, 17, marks=pytest.mark.slow)]  # the SDXL UNet again, another scheduler


@pytest.mark.parametrize("family,latent_h,latent_w", CASES)
def test_odd_latent_sizes_equal_diffusers(exported, tiny_pipeline, engines, family, latent_h, latent_w):
    engine_dir = exported(family, "fp32")
    pipe = engines(engine_dir)
    f = pipe.dir.vae_scale_factor
    height, width = latent_h * f, latent_w * f
    guidance = 5.0
    ref = _reference(tiny_pipeline(family))
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)  # one sampler, named on both sides
    theirs = ref("a cat", num_inference_steps=3, guidance_scale=guidance, height=height, width=width,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    ours = pipe.generate(_request(prompt=("a cat",), steps=3, guidance=guidance, sampler="euler", width=width,
                                  height=height, seed=0))
    a, b = _uint8(ours).astype(int), _uint8(theirs).astype(int)
    assert a.shape == b.shape == (1, height, width, 3)
    diff = int(np.abs(a - b).max())
    print(f"any-size {family} latents {latent_h}x{latent_w} ({width}x{height} px): max pixel difference {diff}/255")
    assert diff <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("family", ["sd15-inpaint", "sdxl-refiner"])
def test_odd_latent_sizes_with_an_init_image(exported, tiny_pipeline, engines, family):
    """The families that start from an image: 9-channel inpainting and the SDXL refiner, latents 13x17."""
    from PIL import Image

    pipe = engines(exported(family, "fp32"))
    f = pipe.dir.vae_scale_factor
    height, width = 13 * f, 17 * f
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    ref = _reference(tiny_pipeline(family))
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(2),
                  output_type="np")
    extra = {}
    if family == "sd15-inpaint":
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[4:20, 6:24] = 255
        extra = dict(mask=Image.fromarray(mask))
        theirs = ref("a door", image=image, mask_image=extra["mask"], height=height, width=width, **kwargs).images
    else:
        theirs = ref("a door", image=image, strength=0.5, **kwargs).images
        extra = dict(strength=0.5)
    ours = pipe.generate(_request(prompt="a door", init_image=image, steps=4, guidance=5.0, sampler="euler", seed=2,
                                  width=width, height=height, **extra))
    a, b = _uint8(ours).astype(int), _uint8(theirs).astype(int)
    assert a.shape == b.shape == (1, height, width, 3)
    diff = int(np.abs(a - b).max())
    print(f"any-size {family} latents 13x17 ({width}x{height} px): max pixel difference {diff}/255")
    assert diff <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("family", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])  # the same manifest code
def test_manifest_records_the_capability_and_the_loader_reads_it(exported, family):
    engine_dir = exported(family, "fp32")
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    assert any(p.startswith(SKIP_SIZE_PASS) for p in unet["passes"]), unet["passes"]
    assert manifest["latent_multiple"] == 1
    shapes = [c["shape"] for c in unet["gate"]["cases"]]  # the gate ran the graph off and on the multiple
    assert any(s["latent_height"] % 2 for s in shapes) and any(s["latent_height"] % 2 == 0 for s in shapes)
    d = open_dir(engine_dir)
    assert d.latent_multiple == 1
    factor = 2 ** (len(d.unet_config["block_out_channels"]) - 1)
    # Exported before this change (the manifest recorded the factor) or by optimum (no manifest): the factor.
    assert dataclasses.replace(d, manifest={**manifest, "latent_multiple": factor}).latent_multiple == factor
    assert dataclasses.replace(d, manifest=None).latent_multiple == factor


# ---- TensorRT profiles ----------------------------------------------------------------------------------------

def test_trt_profiles_take_multiples_of_the_vae_factor():
    vae_factor = 8  # SD 1.5 / 2.x / XL; latent multiple 1
    (profile,) = tp.profiles(["520x520"], None, "1", True, vae_factor)
    assert profile.name() == "b1_h520_w520_cfg"
    assert tp.profiles(["1024x680"], None, "1", True, vae_factor)[0].height == tp.Range(680, 680, 680)
    shapes = tp.input_shapes("unet", {"sample": ["batch_size", 4, "height", "width"]}, profile, vae_factor)
    assert shapes["sample"][1] == (2, 4, 65, 65)
    with pytest.raises(UserError, match="multiples of 8"):
        tp.parse_resolution("516x520", vae_factor)


def test_build_plan_accepts_an_odd_latent_size(exported):
    engine_dir = exported("sd15", "fp32")  # the SD 1.5 export other tests here already made
    result = run_sdrt("build", str(engine_dir), "--plan", "--resolution", "34x26", "--dynamic", "18-42",
                      "--compute-capability", "8.9", "--trt-version", "10.13.0")
    assert result.returncode == 0, result.stderr
    out = result.stdout.replace("\n", "")
    assert "unet__b1_h26_w34_cfg__" in out and "unet__b1_h18-42_w18-42_cfg__" in out
    bad = run_sdrt("build", str(engine_dir), "--plan", "--resolution", "33x26")
    assert bad.returncode == 2 and "multiples of 2" in bad.stderr

