"""runtime/samplers/torch_rng.py: numpy's re-implementation of torch's CPU generator, bit for bit against torch.randn.

Shapes below 16 elements (torch's per-element double path, with its cached second sample carried across calls),
exactly 16, multiples of 16 and sizes that are not (the last 16 recomputed), the latent shapes the runtime draws,
several draws in a row from one generator, and seeds beyond 32 bits. The kernel family torch dispatches to
(capability()) decides the math; the slow test runs the other families in subprocesses (ATEN_CPU_CAPABILITY).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdrt.runtime.samplers.torch_rng import TorchCpuGenerator, capability

SEEDS = (0, 1, 7, 1234, 2 ** 31 + 11, 2 ** 32 + 3, 2 ** 64 - 1)
SHAPES = [(1,), (2,), (3,), (15,), (16,), (17,), (31,), (32,), (33,), (1, 4, 3, 3), (1, 4, 8, 8), (2, 4, 13, 7),
          (1, 4, 64, 64), (1, 4, 96, 40), (4,), (1, 4, 1, 1)]


def check(seeds=SEEDS, shapes=SHAPES) -> list:
    """Mismatches (seed, shape, draw) over three draws of every shape from one generator per seed."""
    bad = []
    for seed in seeds:
        theirs, ours = torch.Generator().manual_seed(seed), TorchCpuGenerator(seed)
        for draw in range(3):
            for shape in shapes:
                a = torch.randn(shape, generator=theirs, dtype=torch.float32).numpy()
                b = ours.randn(shape)
                if b.shape != a.shape or b.dtype != np.float32 or not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
                    bad.append((seed, shape, draw))
    return bad


def test_randn_is_bit_exact_with_torch():
    assert check() == []


def test_manual_seed_restarts_the_stream_and_drops_the_cached_sample():
    g = TorchCpuGenerator(5)
    first = g.randn(3)  # two pairs of doubles drawn: the fourth value is cached
    g.manual_seed(5)
    assert np.array_equal(g.randn(3), first)
    theirs = torch.Generator().manual_seed(5)
    torch.randn(3, generator=theirs)
    torch.randn(3, generator=theirs.manual_seed(5))
    assert np.array_equal(g.randn(1), torch.randn(1, generator=theirs).numpy())  # the cached value, then fresh
    assert np.array_equal(g.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8, generator=theirs).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["default", "avx2"])
def test_other_cpu_kernel_families(family):
    """torch with ATEN_CPU_CAPABILITY forced: the scalar template (libm) and the AVX2 one (avx_mathfun)."""
    if family == "avx2" and capability() == "default":
        pytest.skip("this CPU has no AVX2")
    code = ("import torch, test_torch_rng as t; assert torch.backends.cpu.get_cpu_capability().lower() == "
            f"'{family}'; print(t.check())")
    path = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)  # this process's sdrt, wherever it is
    env = {**os.environ, "ATEN_CPU_CAPABILITY": family, "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(__file__), timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
