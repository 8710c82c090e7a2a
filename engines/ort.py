"""ONNX Runtime backend: the CPU execution provider, and the CUDA one with IO binding.

On CUDA, inputs are bound from torch CUDA tensors and outputs are left in device memory (handed back as
torch tensors through DLPack), so latents never visit the host inside the sampler loop. The CUDA path
needs onnxruntime-gpu and a GPU; it is exercised by tests/test_gpu.py where those exist.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from sdrt.runtime.errors import UserError

from .base import TensorSpec, validate_feed

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(double)": "float64", "tensor(bool)": "bool"}
_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
           "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


class EngineLoadError(UserError):
    pass


@dataclass(frozen=True)
class OrtConfig:
    provider: str = "cpu"  # cpu | cuda
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"
    device_id: int = 0


def available_backends() -> list[str]:
    """Backends this machine can run, fastest first among the ONNX ones."""
    cuda = torch.cuda.is_available()
    out = []
    if cuda and importlib.util.find_spec("tensorrt") is not None:
        out.append("tensorrt")
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        out.append("ort-cuda")
    out.append("ort-cpu")
    if importlib.util.find_spec("diffusers") is not None:
        out.append("torch")
    return out


def session_options(config: OrtConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.graph_optimization_level = _LEVELS[config.graph_optimization_level]
    options.log_severity_level = 3
    return options


def _spec(value) -> TensorSpec:
    shape = tuple(d if isinstance(d, (int, str)) else "" for d in value.shape)
    return TensorSpec(_ORT_TYPES.get(value.type, value.type), shape)


class OrtEngine:
    """Engine over one ONNX file. Outputs are new tensors owned by the caller (CPU: numpy-backed)."""

    def __init__(self, path: str | Path, config: OrtConfig = OrtConfig()):
        path = Path(path)
        if config.provider == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": config.device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        if not path.is_file():
            raise EngineLoadError(f"{path} is missing; re-export this component")
        try:
            self.session = ort.InferenceSession(str(path), session_options(config), providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/NoSuchFile types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineLoadError(f"{path} cannot be loaded by ONNX Runtime ({first[:200]}); it is damaged or "
                                  "incomplete: re-export this component") from None
        self.name = f"{path.parent.name}"
        self.config = config
        self.device = "cuda" if config.provider == "cuda" else "cpu"
        self.inputs = {i.name: _spec(i) for i in self.session.get_inputs()}
        self.outputs = {o.name: _spec(o) for o in self.session.get_outputs()}

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        validate_feed(self.inputs, feed, self.name)
        if self.device == "cpu":
            arrays = {n: x.detach().cpu().contiguous().numpy() for n, x in feed.items()}  # keeps rank 0
            outs = self.session.run(list(self.outputs), arrays)
            return {n: torch.from_numpy(o) for n, o in zip(self.outputs, outs)}
        return self._run_bound(feed)

    def _run_bound(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        torch.cuda.current_stream().synchronize()  # inputs written by torch are complete before ORT reads them
        binding = self.session.io_binding()
        kept = []
        for name, x in feed.items():
            x = x.contiguous()
            kept.append(x)  # keep alive until the run ends
            binding.bind_input(name, "cuda", self.config.device_id, np.dtype(self.inputs[name].dtype),
                               tuple(x.shape), x.data_ptr())
        for name in self.outputs:
            binding.bind_output(name, "cuda", self.config.device_id)
        self.session.run_with_iobinding(binding)
        return {name: torch.from_dlpack(value._ortvalue.to_dlpack())  # device memory handed over, no copy
                for name, value in zip(self.outputs, binding.get_outputs())}
