"""Random draws as diffusers' `randn_tensor` makes them with CPU generators (DESIGN.md §4a: per-image seeds).

`Generators` is one CPU torch.Generator per image of the batch (image i of a request seeded s uses s + i,
AUTOMATIC1111's convention). diffusers, given a list of generators, draws each batch item separately with its
own generator (shape (1, ...)) and concatenates (diffusers/utils/torch_utils.py `randn_tensor`); so an image's
noise does not depend on which other images share its batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

Generators = Sequence[torch.Generator]


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with that image's seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def randn(shape: tuple, gens: Generators | torch.Generator | None, device="cpu",
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, ...] standard normal: item i from gens[i] (a list of N), or all from one generator; then moved to device."""
    if gens is None or isinstance(gens, torch.Generator):
        return torch.randn(tuple(shape), generator=gens, dtype=dtype).to(device)
    if len(gens) != shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {shape[0]}; give one generator per image")
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=g, dtype=dtype) for g in gens]).to(device)


def randn_like(x: torch.Tensor, gens: Generators | torch.Generator | None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise shaped like x (the batch of images the scheduler steps, B not 2B), on x's device."""
    return randn(tuple(x.shape), gens, x.device, dtype)
