"""The diffusers modules themselves behind the Engine protocol: the parity reference and the bench baseline.

The modules come from the pipeline the engine directory was exported from (manifest `source.location`),
wrapped exactly as the exporter traced them (sdrt.export.components), so inputs and outputs carry the
ONNX names. Needs diffusers/transformers (the export extras); `sdrt run --backend torch` is the only
run-time path that imports them.

Threads: the modules run under torch.no_grad() and keep no state between calls; the service still calls
them from its one worker thread.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from sdrt.runtime.errors import UserError
from sdrt.runtime.loader import read_manifest

from sdrt.engines.base import TensorSpec, validate_feed


class TorchEngine:
    """Engine over a torch module. Outputs are fresh tensors owned by the caller."""

    def __init__(self, module: torch.nn.Module, inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec],
                 device: str = "cpu"):
        self.module = module.eval().to(device)
        self.inputs = inputs
        self.outputs = outputs
        self.device = device
        self._base: TorchEngine | None = None  # the engine holding the stored weights, for adapted copies

    def adapted(self, weights) -> "TorchEngine":
        """A copy whose module is the base module plus the LoRA deltas (engines/base.py); the base stays untouched
        and every copy starts from it, never from another adapted copy."""
        import copy

        base = self._base or self
        engine = copy.copy(base)
        engine.module = copy.deepcopy(base.module)
        engine._base = base
        inner = next(iter(engine.module.children()))  # the diffusers/transformers model inside the export wrapper
        with torch.no_grad():
            for path, delta in weights.module_deltas().items():
                try:
                    target = inner.get_submodule(path)
                except AttributeError:
                    target = inner.get_submodule("text_model." + path)
                target.weight += torch.from_numpy(delta).to(target.weight.dtype).reshape(target.weight.shape)
        return engine

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        validate_feed(self.inputs, feed)
        with torch.inference_mode():
            out = self.module(*[feed[name].to(self.device) for name in self.inputs])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return dict(zip(self.outputs, out))


@lru_cache(maxsize=2)
def _source_pipeline(location: str):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    if not Path(location).is_dir():
        raise UserError(f"the torch backend loads the source pipeline {location}, which is not a local folder "
                        "here; use an ONNX backend")
    return diffusers.DiffusionPipeline.from_pretrained(location)


def open_torch_engine(engine_dir: Path, component: str, device: str = "cpu") -> TorchEngine:
    from sdrt.export.components import component_specs

    manifest = read_manifest(engine_dir)
    if manifest is None:
        raise UserError(f"{engine_dir} has no manifest.json, so its source pipeline is unknown; the torch backend "
                        "needs an engine directory written by `sdrt export`")
    pipe = _source_pipeline(manifest["source"]["location"])
    entry = manifest["components"][component]
    dtype = "float32"

    def specs(items):
        return {i["name"]: TensorSpec(i["dtype"] if i["dtype"].startswith("int") else dtype, tuple(i["shape"]))
                for i in items}

    specs_of = component_specs(pipe)
    if component not in specs_of:  # ControlNets and the residual UNet: ONNX Runtime or TensorRT only
        raise UserError(f"the torch backend does not run {component}; choose --backend ort-cpu or ort-cuda")
    module = specs_of[component].make_module(pipe)
    return TorchEngine(module, specs(entry["inputs"]), specs(entry["outputs"]), device)
