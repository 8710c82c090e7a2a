"""The sub-pixel rewrite of diffusers' Upsample2D: same result as diffusers' module, in torch and in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from sdrt.export.onnx_export import torch_to_onnx
from sdrt.export.rewrites import (SUBPIXEL_PASS, SubpixelUpsample2D, is_subpixel_eligible, phase_kernels,
    subpixel_upsampling)


def _upsampler(channels: int, out_channels: int | None = None, seed: int = 0, **kwargs) -> Upsample2D:
    torch.manual_seed(seed)
    module = Upsample2D(channels, use_conv=True, out_channels=out_channels, **kwargs).eval()
    with torch.no_grad():  # weights of a trained model's magnitude, not the tiny init's
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("shape", [(1, 8, 4, 4), (2, 8, 5, 7), (1, 8, 1, 1), (3, 8, 16, 9)])
def test_subpixel_module_equals_diffusers_upsample2d_in_torch(shape):
    original = _upsampler(8, out_channels=6)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = original(x)
        got = SubpixelUpsample2D(original)(x)
    assert got.shape == expected.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    assert _rel_err(got, expected) < 1e-6


def test_explicit_output_size_falls_back_to_the_original_module():
    original = _upsampler(4)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert torch.equal(SubpixelUpsample2D(original)(x, (9, 11)), original(x, (9, 11)))


def test_phase_kernels_sum_the_taps_each_output_phase_reads():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    k = phase_kernels(w)
    # phase (0, 0): rows {i-1: tap 0, i: taps 1+2}, columns likewise
    assert k[0, 0][0, 0].tolist() == [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # phase (1, 1): rows {i: taps 0+1, i+1: tap 2}
    assert k[1, 1][0, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


def test_fp16_kernels_are_summed_in_fp32_then_rounded_once():
    w = torch.randn(4, 4, 3, 3)
    for key, kernel in phase_kernels(w.half()).items():
        assert kernel.dtype == torch.float16
        assert torch.equal(kernel, phase_kernels(w.half().float())[key].half())


def test_onnx_graph_is_four_padded_2x2_convs_interleaved_and_matches_in_onnx_runtime(tmp_path):
    original = _upsampler(8, out_channels=4, seed=1)
    path = tmp_path / "up.onnx"
    torch_to_onnx(SubpixelUpsample2D(original), (torch.randn(1, 8, 6, 6),), path, ["x"], ["y"],
                  {"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b", 2: "2h", 3: "2w"}})
    nodes = onnx.load(str(path)).graph.node
    ops = [n.op_type for n in nodes]
    assert "Resize" not in ops and "Pad" not in ops and ops.count("Concat") >= 3
    convs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes if n.op_type == "Conv"]
    assert [c["kernel_shape"] for c in convs] == [[2, 2]] * 4
    assert sorted(c["pads"] for c in convs) == [[0, 0, 1, 1], [0, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 8, 6, 6), (2, 8, 3, 10)]:  # dynamic batch and size
        x = torch.randn(shape)
        with torch.no_grad():
            expected = original(x).numpy()
        got = session.run(None, {"x": x.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-6


def test_context_swaps_only_eligible_upsamplers_and_restores_them():
    root = torch.nn.ModuleDict({
        "plain": _upsampler(4),
        "nested": torch.nn.ModuleList([torch.nn.Sequential(_upsampler(4))]),
        "transpose": Upsample2D(4, use_conv_transpose=True),
        "normed": Upsample2D(4, use_conv=True, norm_type="ln_norm", eps=1e-5, elementwise_affine=True),
        "no_conv": Upsample2D(4),
        "wide_kernel": Upsample2D(4, use_conv=True, kernel_size=5, padding=2),
    })
    before = {name: module for name, module in root.named_modules()}
    with subpixel_upsampling(root) as count:
        assert count == 2
        assert isinstance(root["plain"], SubpixelUpsample2D) and isinstance(root["nested"][0][0], SubpixelUpsample2D)
        for name in ("transpose", "normed", "no_conv", "wide_kernel"):
            assert type(root[name]) is Upsample2D and not is_subpixel_eligible(root[name])
    assert {name: module for name, module in root.named_modules()} == before


def test_context_restores_the_modules_when_the_export_fails():
    root = torch.nn.Sequential(_upsampler(4))
    original = root[0]
    with pytest.raises(RuntimeError), subpixel_upsampling(root):
        raise RuntimeError("trace failed")
    assert root[0] is original


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_exported_unet_and_vae_decoder_carry_the_rewrite_and_no_resize(exported, family):
    out = exported(family, "fp32")
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("unet", "vae_decoder"):
        passes = manifest["components"][name]["passes"]
        assert passes[0].startswith(SUBPIXEL_PASS), passes
        ops = {n.op_type for n in onnx.load(str(out / name / "model.onnx"), load_external_data=False).graph.node}
        assert "Resize" not in ops and {"Conv", "Concat"} <= ops
    for name in ("text_encoder", "vae_encoder"):  # nothing to rewrite; the VAE encoder's wrapper holds no decoder
        assert not manifest["components"][name]["passes"][0].startswith(SUBPIXEL_PASS)
