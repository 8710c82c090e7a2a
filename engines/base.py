"""The Engine protocol (DESIGN.md §4): named tensors in, named tensors out, validated against the graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # numpy name: float32, float16, int64, int32
    shape: tuple  # ints for fixed dims, strings for symbolic ones (-1 or None: unnamed dynamic)

    def text(self) -> str:
        return f"{self.dtype} [{', '.join(str(d) for d in self.shape)}]"


class Engine(Protocol):
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class EngineInputError(ValueError):
    pass


def dtype_name(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def validate_feed(specs: dict[str, TensorSpec], feed: dict[str, torch.Tensor], engine: str = "engine") -> None:
    """Raise EngineInputError naming the tensor, what was expected and what was given."""
    missing = [n for n in specs if n not in feed]
    unexpected = [n for n in feed if n not in specs]
    if missing or unexpected:
        raise EngineInputError(f"{engine}: missing inputs {missing}, unexpected inputs {unexpected}; "
                               f"it takes {list(specs)}")
    symbols: dict[str, tuple[int, str]] = {}
    for name, spec in specs.items():
        x = feed[name]
        given = f"{dtype_name(x)} {list(x.shape)}"
        if dtype_name(x) != spec.dtype or len(x.shape) != len(spec.shape):
            raise EngineInputError(f"{engine} input '{name}': expected {spec.text()}, got {given}")
        for dim, size in zip(spec.shape, x.shape):
            if isinstance(dim, int) and dim >= 0 and dim != size:
                raise EngineInputError(f"{engine} input '{name}': expected {spec.text()}, got {given}")
            if isinstance(dim, str) and dim:
                seen = symbols.setdefault(dim, (size, name))
                if seen[0] != size:
                    raise EngineInputError(f"{engine} input '{name}': dimension '{dim}' is {size} but input "
                                           f"'{seen[1]}' has it {seen[0]}")
