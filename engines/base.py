"""The Engine protocol (DESIGN.md §4): named tensors in, named tensors out, validated against the graph."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

Dim = int | str  # int ≥ 0: fixed size; str: symbolic (one name ⇒ one size across inputs); -1 or "": free


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # numpy name: float32, float16, int64, int32, bool, ...
    shape: tuple[Dim, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))  # a list from JSON compares equal to a tuple

    def text(self) -> str:
        """`float32 [batch, 4, height, width]`; free dims print as `?`."""
        return f"{self.dtype} [{', '.join(str(d) if _named(d) or _fixed(d) else '?' for d in self.shape)}]"


class Engine(Protocol):
    """inputs/outputs describe the graph; __call__ validates the feed and runs it.

    Implementations say in their docstring who owns the output tensors and whether calls from several
    threads at once are safe. The runtime never relies on it: the batching service (runtime/service.py)
    calls all engines of a pipeline from its one worker thread.
    """

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    # Optional, for LoRA (runtime/lora/adapters.py; DESIGN.md §4a, weights rebuilt never accumulated):
    # def adapted(self, weights: AdaptedWeights) -> Engine
    # an engine holding the stored base weights plus a LoRA set's deltas: ONNX Runtime opens a new session with the
    # merged initializers, the torch reference copies its base module, TensorRT refits itself in place and returns
    # itself. The runtime calls only this, so it never branches on the backend.


class EngineInputError(ValueError):
    """A feed that does not fit the engine: the message names the tensor, the expected and the given."""


def _fixed(dim) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0


def _named(dim) -> bool:
    return isinstance(dim, str) and dim != ""


def dtype_name(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def describe(x) -> str:
    """`float16 [1, 4, 64, 64]` for a tensor, the type name otherwise."""
    if isinstance(x, torch.Tensor):
        return f"{dtype_name(x)} [{', '.join(str(d) for d in x.shape)}]"
    return f"a {type(x).__module__}.{type(x).__qualname__}, not a torch.Tensor"


def validate_feed(specs: Mapping[str, TensorSpec], feed: Mapping[str, torch.Tensor], engine: str = "engine") -> None:
    """Raise EngineInputError unless feed has exactly the names of specs, each with its dtype, rank, fixed
    sizes, and one size per symbolic dim name across all inputs."""
    takes = ", ".join(specs)
    for name, spec in specs.items():
        if name not in feed:
            raise EngineInputError(f"{engine} input '{name}': expected {spec.text()}, got nothing "
                                   f"(the engine takes {takes})")
    for name, x in feed.items():
        if name not in specs:
            raise EngineInputError(f"{engine} has no input '{name}' (given {describe(x)}); it takes {takes}")
    symbols: dict[str, tuple[int, str]] = {}  # dim name → (size, first input that has it)
    for name, spec in specs.items():
        x = feed[name]
        mismatch = f"{engine} input '{name}': expected {spec.text()}, got {describe(x)}"
        if not isinstance(x, torch.Tensor) or dtype_name(x) != spec.dtype or x.dim() != len(spec.shape):
            raise EngineInputError(mismatch)
        for dim, size in zip(spec.shape, x.shape):
            if _fixed(dim) and dim != size:
                raise EngineInputError(mismatch)
            if _named(dim):
                seen_size, seen_in = symbols.setdefault(dim, (size, name))
                if seen_size != size:
                    raise EngineInputError(f"{mismatch}: '{dim}' is {size} here but {seen_size} in input "
                                           f"'{seen_in}'")
