"""GPU tests: ONNX Runtime CUDA and TensorRT against ONNX Runtime CPU on the tiny fp16 exports.

They run wherever a CUDA GPU (and onnxruntime-gpu / TensorRT) is present and skip with the reason elsewhere.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sdrt.bench.measure.stats import psnr
from sdrt.runtime.errors import UserError
from sdrt.runtime.pipeline import Pipeline, Request

pytestmark = pytest.mark.gpu

HAS_CUDA = torch.cuda.is_available()
requires_ort_cuda = pytest.mark.skipif(
    not HAS_CUDA or "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
    reason="needs a CUDA GPU and onnxruntime-gpu")
requires_tensorrt = pytest.mark.skipif(
    not HAS_CUDA or importlib.util.find_spec("tensorrt") is None,
    reason="needs a CUDA GPU and TensorRT (TensorRT cannot be installed where sdrt is developed)")


REQUEST = Request.of(prompt=("a photo of a cat",), steps=4, guidance=0.0, sampler="euler", timestep_spacing="trailing",
                  seed=3, width=32, height=32)


@requires_ort_cuda
def test_ort_cuda_matches_ort_cpu(exported):
    engine_dir = exported("sdxl-lightning", "fp16")
    cpu = Pipeline.load(engine_dir, backend="ort-cpu").generate(REQUEST)[0]
    cuda = Pipeline.load(engine_dir, backend="ort-cuda").generate(REQUEST)[0]
    assert psnr(cuda, cpu) >= 35


@requires_tensorrt
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_builds_and_matches_ort_cpu(exported, tmp_path, cuda_graph):
    import shutil

    from sdrt.engines import trt_dir, trt_profiles
    from sdrt.engines.select import open_engine
    from sdrt.engines.tensorrt import device_info
    from sdrt.engines.trt_build import BuildOptions

    engine_dir = tmp_path / "engine"
    shutil.copytree(exported("sdxl-lightning", "fp16"), engine_dir)
    cc, version = device_info()
    profiles = trt_profiles.profiles(["32x32"], None, "1", False, 4)
    trt_dir.build(engine_dir, trt_dir.plan(engine_dir, profiles, None, cc, version), BuildOptions(), cc, version)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert {p["component"] for p in manifest["trt"]} >= {"unet", "vae_decoder", "text_encoder", "text_encoder_2"}
    cpu = Pipeline.load(engine_dir, backend="ort-cpu").generate(REQUEST)[0]
    pipe = Pipeline.load(engine_dir, backend="ort-cpu")
    for name in pipe.engines:
        pipe.engines[name] = open_engine(engine_dir / name / "model.onnx", "tensorrt", cuda_graph=cuda_graph)
    pipe.device = "cuda"
    assert psnr(pipe.generate(REQUEST)[0], cpu) >= 35
    with pytest.raises(UserError, match="no unet plan covers"):
        pipe.generate(Request.of(prompt=("a cat",), steps=1, guidance=0.0, seed=1, width=48, height=48))


@requires_tensorrt
def test_corrupt_plan_is_refused_with_its_name(tmp_path):
    from sdrt.engines.tensorrt import SharedScratch, TensorRTEngine

    plan = tmp_path / "unet.plan"
    plan.write_bytes(b"not a plan")
    with pytest.raises(UserError, match="unet.plan is not a TensorRT plan"):
        TensorRTEngine(plan, SharedScratch())
