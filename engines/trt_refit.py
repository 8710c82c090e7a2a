"""TensorRT refit for LoRA at load (reference/customization.md §1.5), kept thin around the documented API.

Plans must be built refittable (`sdrt build --refittable`: BuilderFlag.REFIT). TensorRT's ONNX parser names
weights after the ONNX initializers, so the weights map's initializer names are the refit names.

The ghosting pitfall (NVIDIA/TensorRT#3628): pushing only the weights the *new* set changes leaves the old
set's values in every layer the new one does not touch. The rule here: on every switch, push base + new delta
for each initializer the new set touches and the stored base value for each one only the old set touched
(`refit_arrays`), then whatever TensorRT reports missing (weights fused with those, as their base values).

What ran where: `refit_arrays` and `Refitter`'s bookkeeping are tested on the CPU (tests/test_lora.py, with a
recording stand-in for the plan, which tests sdrt's logic and nothing of TensorRT); `refit_engine` is written
against TensorRT 10's Python API (trt.Refitter, set_named_weights, get_missing_weights, refit_cuda_engine) and
has not run where sdrt is developed, which has no TensorRT.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from sdrt.runtime.errors import UserError


def refit_arrays(previous: Iterable[str], merged: dict[str, np.ndarray],
                 base: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Every initializer the old or the new set touches: the new set's merged value, else the base value."""
    names = sorted(set(previous) | set(merged))
    return {n: merged[n] if n in merged else base(n) for n in names}


class Refitter:
    """The LoRA state of one refittable component: which initializers hold something other than the base."""

    def __init__(self, component, base: Callable[[str], np.ndarray]):
        self.component = component  # has refit(arrays, base) (engines/tensorrt.py TensorRTComponent)
        self.base = base
        self.touched: set[str] = set()

    def switch(self, merged: dict[str, np.ndarray]) -> None:
        """Make the component hold base + `merged` (the new set's merged initializers) and nothing of the old."""
        arrays = refit_arrays(self.touched, merged, self.base)
        if arrays:
            self.component.refit(arrays, self.base)
        self.touched = set(merged)


class RefitInPlace:
    """The Engine method `adapted` (engines/base.py) for components refitted in place: each LoRA set is pushed into
    the one engine by a Refitter (base + the new set's deltas, the old set's weights restored), which returns it."""

    _refitter: Refitter | None = None

    def adapted(self, weights):
        if self._refitter is None:
            self._refitter = Refitter(self, weights.base)
        self._refitter.switch(weights.merged())
        return self


def refit_engine(trt, engine, arrays: dict[str, np.ndarray], base: Callable[[str], np.ndarray], label: str) -> None:
    """Refit one deserialized ICudaEngine with `arrays` (+ base values for what TensorRT reports missing)."""
    if not getattr(engine, "refittable", False):
        raise UserError(f"{label} was built without refit, so LoRAs cannot be applied to it at load; rebuild its "
                        "TensorRT plans refittable")
    logger = trt.Logger(trt.Logger.WARNING)
    refitter = trt.Refitter(engine, logger)
    kept = []  # trt.Weights point into these arrays until refit_cuda_engine returns

    def put(name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        kept.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise UserError(f"{label}: TensorRT refused new values for weight {name!r} (shape {list(array.shape)}, "
                            f"{array.dtype}); the plan does not match the engine directory: rebuild it")

    for name, array in arrays.items():
        put(name, array)
    for name in refitter.get_missing_weights():
        try:
            put(name, base(name))
        except KeyError:
            raise UserError(f"{label}: TensorRT also needs weight {name!r} for this refit, and the weights map does "
                            "not record it; re-export the engine directory with this sdrt") from None
    if not refitter.refit_cuda_engine():
        raise UserError(f"{label}: TensorRT could not refit the engine with the LoRA weights")
