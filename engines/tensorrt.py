"""TensorRT backend: deserialize plans, run them on one CUDA stream with device-resident torch buffers.

Written against the TensorRT 10/11 Python API (name-based tensor API: set_input_shape, set_tensor_address,
execute_async_v3). TensorRT cannot be installed where sdrt is developed, so this file has not run there;
everything it decides (profiles, keys, selection, buffer shapes) lives in trt_profiles.py and is tested.
All engines of a pipeline share one scratch allocation sized to the largest (`SharedScratch`), as
NVIDIA's demo does (reference/tensorrt_demo.md §2.6).

Threads: not safe to call from two threads at once. The execution contexts, the per-shape output buffers,
the CUDA stream and the shared scratch are state of the engine, reused by every call; one thread owns them
(the batching service's worker, runtime/service.py), as TensorRT requires of an execution context.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdrt.runtime.errors import UserError

from sdrt.engines.base import TensorSpec
from sdrt.engines.trt_refit import RefitInPlace

INSTALL_HINT = ("TensorRT is not installed: on a machine with an NVIDIA GPU run "
                "`pip install tensorrt` (it downloads NVIDIA's libraries from NVIDIA's package index)")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return trt


def device_info() -> tuple[tuple[int, int], str]:
    """(compute capability, TensorRT version) of this machine; raises UserError without GPU or TensorRT."""
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise UserError("TensorRT needs an NVIDIA GPU, and torch sees none on this machine")
    return torch.cuda.get_device_capability(), trt.__version__


_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32,
          "BOOL": torch.bool, "BF16": torch.bfloat16}


class SharedScratch:
    """One device allocation reused as every context's scratch memory (engines run one at a time).

    Every engine reserves its size when it is loaded, so the buffer has its final address before the
    first run, and CUDA graphs captured later stay valid.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def ensure(self, size: int) -> int:
        if self.buffer is None or self.buffer.numel() < size:
            self.buffer = torch.empty(size, dtype=torch.uint8, device="cuda")
        return self.buffer.data_ptr()


class TensorRTEngine:
    """Engine protocol over one plan.

    Output buffers belong to the engine: they are allocated once per shape and overwritten by the next
    call, so callers that keep an output across calls must clone it. Inputs are torch CUDA tensors.
    """

    def __init__(self, plan: Path, scratch: SharedScratch, stream: torch.cuda.Stream | None = None,
                 cuda_graph: bool = False):
        trt = import_tensorrt()
        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        try:
            data = Path(plan).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read the TensorRT plan {plan}: {e.strerror}") from None
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise UserError(f"{plan} is not a TensorRT plan this TensorRT ({trt.__version__}) can load "
                            "(corrupt, or built by another version); rebuild it with `sdrt build`")
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self._scratch = scratch
        self._scratch_size = self.engine.device_memory_size_v2
        scratch.ensure(self._scratch_size)
        self.stream = stream or torch.cuda.Stream()
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple] = {}
        self._outputs: dict[tuple, dict[str, torch.Tensor]] = {}
        self.inputs, self.outputs = {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = _TORCH[self.engine.get_tensor_dtype(name).name]
            spec = TensorSpec(str(dtype).removeprefix("torch."), tuple(self.engine.get_tensor_shape(name)))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[name] = spec

    def _bind(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.context.set_device_memory(self._scratch.ensure(self._scratch_size), self._scratch_size)
        for name, x in feed.items():
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        key = tuple((n, tuple(x.shape)) for n, x in feed.items())
        if key not in self._outputs:
            self._outputs[key] = {
                name: torch.empty(tuple(self.context.get_tensor_shape(name)),
                                  dtype=_TORCH[self.engine.get_tensor_dtype(name).name], device="cuda")
                for name in self.outputs}
        for name, out in self._outputs[key].items():
            self.context.set_tensor_address(name, out.data_ptr())
        return self._outputs[key]

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from sdrt.engines.base import validate_feed

        validate_feed(self.inputs, feed)
        feed = {n: x.contiguous() for n, x in feed.items()}
        if not self.cuda_graph:
            outputs = self._bind(feed)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            self.stream.synchronize()
            return outputs
        return self._replay(feed)

    def _replay(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CUDA graph per input shape: static input buffers are captured once, then refilled and replayed."""
        key = tuple((n, tuple(x.shape)) for n, x in feed.items())
        if key not in self._graphs:
            static = {n: x.clone() for n, x in feed.items()}
            outputs = self._bind(static)
            self.context.execute_async_v3(self.stream.cuda_stream)  # warm-up before capture
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.context.execute_async_v3(self.stream.cuda_stream)
            self._graphs[key] = (graph, static, outputs)
        graph, static, outputs = self._graphs[key]
        for n, x in feed.items():
            static[n].copy_(x)
        graph.replay()
        torch.cuda.current_stream().wait_stream(self.stream)
        self.stream.synchronize()
        return outputs


class TensorRTComponent(RefitInPlace):
    """Engine protocol over all plans of one component: each call runs the plan whose profile covers it
    (trt_profiles.select), loading plans on first use. Output ownership as in TensorRTEngine."""

    def __init__(self, engine_dir: Path, component: str, manifest: dict, scratch: SharedScratch,
                 stream: torch.cuda.Stream, cuda_graph: bool = False):
        from sdrt.engines import trt_profiles

        self._select = trt_profiles.select
        self.engine_dir = Path(engine_dir)
        self.component = component
        self.plans = manifest.get("trt", [])
        entry = manifest["components"][component]
        self._onnx_dims = {i["name"]: i["shape"] for i in entry["inputs"]}
        self.inputs = {i["name"]: TensorSpec(i["dtype"], tuple(i["shape"])) for i in entry["inputs"]}
        self.outputs = {o["name"]: TensorSpec(o["dtype"], tuple(o["shape"])) for o in entry["outputs"]}
        self._vae_scale_factor = manifest["vae_scale_factor"]
        self._family = manifest["family"]
        self._cc, self._version = device_info()
        self._scratch, self._stream, self._cuda_graph = scratch, stream, cuda_graph
        self._loaded: dict[str, TensorRTEngine] = {}
        self.device = "cuda"
        self._refitted: dict = {}  # initializer → value pushed by a LoRA refit (engines/trt_refit.py)
        self._refit_base = None

    def refit(self, arrays: dict, base) -> None:
        """Push new values of these initializers into every loaded plan, and into plans loaded later."""
        from sdrt.engines.trt_refit import refit_engine

        for file, engine in self._loaded.items():
            refit_engine(engine._trt, engine.engine, arrays, base, f"{self.component} plan {file}")
            engine._graphs.clear()  # CUDA graphs captured before the refit are captured again
        self._refitted.update(arrays)
        self._refit_base = base

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {n: tuple(x.shape) for n, x in feed.items()}
        plan = self._select(self.plans, self.component, self._onnx_dims, shapes, self._vae_scale_factor,
                            self._cc, self._version, self._family)
        if plan["file"] not in self._loaded:
            static = plan["batch"][0] == plan["batch"][2] and plan["height"][0] == plan["height"][2] \
                and plan["width"][0] == plan["width"][2]
            engine = TensorRTEngine(self.engine_dir / plan["file"], self._scratch, self._stream,
                                    cuda_graph=self._cuda_graph and static)
            if self._refitted:  # a plan loaded after a LoRA switch gets the current weights first
                from sdrt.engines.trt_refit import refit_engine

                refit_engine(engine._trt, engine.engine, self._refitted, self._refit_base,
                             f"{self.component} plan {plan['file']}")
            self._loaded[plan["file"]] = engine
        return self._loaded[plan["file"]](feed)
