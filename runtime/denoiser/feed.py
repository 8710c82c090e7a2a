"""Calling an engine from the runtime: inputs cast to the dtypes the graph declares, outputs back to fp32.

The sampler math stays fp32 whatever the engine's precision (reference/fewstep_perf.md §1.6).
"""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def run(engine, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs move to the engine's device (attribute `device`, default CPU) in the dtype its graph declares."""
    device = getattr(engine, "device", "cpu")
    cast = {name: x.to(device=device, dtype=TORCH_DTYPES[engine.inputs[name].dtype]) for name, x in feed.items()}
    return {k: (v.float() if v.is_floating_point() else v) for k, v in engine(cast).items()}
