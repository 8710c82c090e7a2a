"""ONNX Runtime backend: the CPU execution provider, and the CUDA one with IO binding.

CPU: torch tensors go in as numpy views (no copy when contiguous) and come back as torch views of the
arrays ONNX Runtime returns. CUDA: inputs are bound from torch CUDA tensors by pointer, outputs are left in
device memory that ONNX Runtime allocates and are handed to torch through DLPack, so latents never visit
the host inside the sampler loop. The CUDA path needs onnxruntime-gpu 1.21+ (DLPack on OrtValue) and
a GPU; tests/test_engines.py and tests/test_gpu.py run it where those exist.

Threads: `InferenceSession.run` is safe to call concurrently (ONNX Runtime's documented guarantee), and the
CUDA path makes a fresh IO binding per call, so neither path keeps per-call state on the engine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from sdrt.runtime.errors import UserError

from sdrt.engines import ort_cache
from sdrt.engines.base import TensorSpec, validate_feed

# ONNX Runtime's NodeArg.type → numpy dtype name
ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}
_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
           "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class EngineLoadError(UserError):
    """An ONNX file that is missing or cannot be loaded, or a provider that cannot start; names the file."""


class OrtConfigError(UserError, ValueError):
    """An OrtConfig field out of its choices."""


@dataclass(frozen=True)
class OrtConfig:
    provider: str = "cpu"  # cpu | cuda
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    inter_op_threads: int = 0  # 0: default; only used by the parallel executor
    # all | extended | basic | disabled. "extended", not "all": on this project's CPU (AVX-512) what "all" adds (layout
    # optimizations) made the full-size SD 1.5 UNet 2x slower per call at 512² (13.7 vs 6.8 s, batch 2, 2 threads) and
    # 5x slower to load (6.3-8.0 vs 1.4-1.7 s), and 8 % slower at 256² (measured 2026-12-01,
    # `python -m sdrt.bench.experiments.ort_levels build/bench/sd15/engine-fp32/unet/model.onnx LEVEL 2 64`).
    graph_optimization_level: str = "extended"
    device_id: int = 0  # CUDA device
    cache_optimized: bool = False  # CPU: keep ONNX Runtime's optimized graph beside the model (engines/ort_cache.py)

    def __post_init__(self):
        if self.provider not in _PROVIDERS:
            raise OrtConfigError(f"ONNX Runtime provider {self.provider!r}: choose one of {', '.join(_PROVIDERS)}")
        if self.graph_optimization_level not in _LEVELS:
            raise OrtConfigError(f"graph optimization level {self.graph_optimization_level!r}: choose one of "
                                 f"{', '.join(_LEVELS)}")
        for field in ("intra_op_threads", "inter_op_threads", "device_id"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 0:
                raise OrtConfigError(f"{field} must be an integer ≥ 0 (got {getattr(self, field)!r})")


def numpy_dtype(ort_type: str) -> str:
    """"tensor(float16)" → "float16"; types outside ORT_DTYPES (sequences, maps) keep ORT's name."""
    return ORT_DTYPES.get(ort_type, ort_type)


def available_backends() -> list[str]:
    """Which of tensorrt, ort-cuda, ort-cpu, torch can run here, in that order of preference."""
    cuda = torch.cuda.is_available()
    out = []
    if cuda and importlib.util.find_spec("tensorrt") is not None:
        out.append("tensorrt")
    if cuda and _PROVIDERS["cuda"] in ort.get_available_providers():
        out.append("ort-cuda")
    out.append("ort-cpu")
    if importlib.util.find_spec("diffusers") is not None:  # found, not imported: `sdrt run` stays lean
        out.append("torch")
    return out


def session_options(config: OrtConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.graph_optimization_level = _LEVELS[config.graph_optimization_level]
    options.log_severity_level = 3  # errors only: the runtime does not print
    return options


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, (int, str)) else -1 for d in arg.shape)  # ORT gives None for unnamed dims
    return TensorSpec(numpy_dtype(arg.type), shape)


def _dlpack_ready() -> bool:
    """OrtValue → DLPack: in the C binding since onnxruntime 1.21 (PR #23110), on the public wrapper later."""
    from onnxruntime.capi import _pybind_state

    return hasattr(ort.OrtValue, "__dlpack__") or hasattr(_pybind_state.OrtValue, "__dlpack__")


def _to_torch(value: ort.OrtValue) -> torch.Tensor:
    """Zero-copy OrtValue → torch tensor; the tensor keeps ONNX Runtime's buffer alive."""
    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    return torch.from_dlpack(value._ortvalue)  # wrappers that do not expose the C binding's __dlpack__ yet


class OrtEngine:
    """Engine over one ONNX file (external data beside it is found by ONNX Runtime).

    Output buffers: each call returns new tensors that the caller owns; the engine keeps no reference to them
    and none to the inputs after the call. On CPU they wrap the numpy arrays ONNX Runtime returned; on CUDA
    they are device memory from ONNX Runtime's CUDA allocator, freed when the last torch reference goes.
    Inputs are only read. On CUDA, inputs on another device (or the CPU) are copied to this engine's device.
    """

    def __init__(self, path: str | Path, config: OrtConfig = OrtConfig(), initializers: dict | None = None):
        """`initializers` ({name: numpy array}) replace the graph's external initializers of those names
        (ONNX Runtime's add_external_initializers: before graph optimizations; same dims and dtype): how
        runtime/lora/adapters.py builds a session with merged LoRA weights without re-exporting."""
        path = Path(path)
        if not path.is_file():
            state = "is not a file" if path.exists() else "is missing"
            raise EngineLoadError(f"{path} {state}; re-export this component")
        if config.provider == "cuda":
            if _PROVIDERS["cuda"] not in ort.get_available_providers():
                raise EngineLoadError(f"{path}: the cuda provider needs onnxruntime-gpu; this onnxruntime has "
                                      f"{', '.join(ort.get_available_providers())}")
            if not _dlpack_ready():
                raise EngineLoadError(f"{path}: onnxruntime {ort.__version__} cannot hand device outputs to torch "
                                      "(DLPack needs onnxruntime-gpu 1.21 or newer)")
            if not torch.cuda.is_available():
                raise EngineLoadError(f"{path}: the cuda provider binds torch CUDA tensors, but torch sees no GPU")
            providers = [(_PROVIDERS["cuda"], {"device_id": config.device_id}), _PROVIDERS["cpu"]]
        else:
            providers = [_PROVIDERS["cpu"]]
        options = session_options(config)
        if initializers:  # the OrtValues only need to live until the session has copied them
            values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in initializers.values()]
            options.add_external_initializers(list(initializers), values)
        cached = self._open_cached(path, config, providers) \
            if config.cache_optimized and config.provider == "cpu" and not initializers else None
        target = temporary = None
        if cached is None and config.cache_optimized and config.provider == "cpu" and not initializers:
            target = ort_cache.cached_model(path, ort.__version__, config.graph_optimization_level)
            temporary = ort_cache.prepare_save(options, target)
        try:
            self.session = cached or self._create(path, options, providers, temporary, config)
            if target is not None:
                ort_cache.commit(temporary, target)
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/NoSuchFile/... types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if initializers:
                raise EngineLoadError(f"{path}: ONNX Runtime did not take the merged LoRA weights ({first[:300]}); "
                                      "the weights map does not fit this graph: re-export this component") from None
            raise EngineLoadError(f"{path} cannot be loaded by ONNX Runtime ({first[:300]}); it is damaged or "
                                  "incomplete (with external data, model.onnx_data must sit beside it): "
                                  "re-export this component") from None
        if self.session.get_providers()[0] != _PROVIDERS[config.provider]:
            raise EngineLoadError(f"{path}: ONNX Runtime could not start {config.provider} (running on "
                                  f"{self.session.get_providers()}); check the CUDA and cuDNN libraries")
        self.name = path.parent.name or path.stem  # the component: unet, text_encoder, ...
        self.config = config
        self.device = f"cuda:{config.device_id}" if config.provider == "cuda" else "cpu"
        self.inputs = {i.name: _spec(i) for i in self.session.get_inputs()}
        self.outputs = {o.name: _spec(o) for o in self.session.get_outputs()}

    def adapted(self, weights) -> "OrtEngine":
        """A new session over the same file whose LoRA-touched initializers are base + deltas (engines/base.py)."""
        return OrtEngine(weights.onnx_path, self.config, initializers=weights.merged())

    @staticmethod
    def _create(path: Path, options, providers, temporary: Path | None, config: OrtConfig):
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception:
            if temporary is None:
                raise
            ort_cache.discard(temporary)  # writing the optimized graph failed (disk full, …): load without it
            return ort.InferenceSession(str(path), session_options(config), providers=providers)

    @staticmethod
    def _open_cached(path: Path, config: OrtConfig, providers):
        """A session over the optimized graph an earlier load saved, optimizations off; None if there is none."""
        target = ort_cache.cached_model(path, ort.__version__, config.graph_optimization_level)
        if not target.is_file():
            return None
        options = session_options(replace(config, graph_optimization_level="disabled"))
        try:
            return ort.InferenceSession(str(target), options, providers=providers)
        except Exception:  # damaged or from elsewhere: rebuilt from the model
            ort_cache.discard(target)
            return None

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        validate_feed(self.inputs, feed, self.name)
        if self.device == "cpu":
            arrays = {n: x.detach().cpu().contiguous().numpy() for n, x in feed.items()}  # views; rank 0 stays
            outs = self.session.run(list(self.outputs), arrays)
            return {n: torch.from_numpy(o) for n, o in zip(self.outputs, outs)}
        return self._run_bound(feed)

    def _run_bound(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IO binding: inputs by pointer, outputs allocated by ONNX Runtime on the engine's device."""
        device = torch.device(self.device)
        ort_device = device.type  # "cuda" | "cpu" (ONNX Runtime's device names)
        binding = self.session.io_binding()
        kept = []  # the bound tensors must outlive the run
        for name, x in feed.items():
            x = x.detach().to(device).contiguous()
            kept.append(x)
            binding.bind_input(name, ort_device, self.config.device_id, np.dtype(self.inputs[name].dtype).type,
                               tuple(x.shape), x.data_ptr())
        for name in self.outputs:
            binding.bind_output(name, ort_device, self.config.device_id)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # torch's writes to the inputs are done
        self.session.run_with_iobinding(binding)  # returns after ORT's stream is synchronized
        return {name: _to_torch(value) for name, value in zip(self.outputs, binding.get_outputs())}
