"""torch's CPU generator in numpy: `TorchCpuGenerator(seed).randn(shape)` equals
`torch.randn(shape, generator=torch.Generator().manual_seed(seed))` bit for bit (float32), without importing torch.

What it reproduces (torch 2.x, ATen headers shipped in the wheel):
- the engine: mt19937 (`at::mt19937`, Matsumoto–Nishimura's init_genrand with the seed's low 32 bits; the
  tempered outputs are the standard ones, so numpy's MT19937 bit generator, given that key, yields them);
  manual_seed also drops the cached normal sample (CPUGeneratorImpl::set_current_seed).
- uniforms (ATen/core/TransformationHelper.h `uniform_real`): float = (u32 & (2²⁴−1)) · 2⁻²⁴; double =
  (((u32₁ << 32) | u32₂) & (2⁵³−1)) · 2⁻⁵³ (CPUGeneratorImpl::random64).
- `normal_kernel` (ATen/native/cpu/DistributionTemplates.h): for ≥ 16 contiguous elements `normal_fill`: all
  uniforms first, Box–Muller on each block of 16 (u1 = 1 − data[j], u2 = data[j + 8], j < 8), and when the size is
  not a multiple of 16 the last 16 values are recomputed from 16 fresh uniforms. The block transform is
  `NormalFill16`: on x86 CPUs with AVX2 and FMA (torch's AVX2 and AVX512 kernels alike, as measured against torch
  2.13) avx_mathfun's Cephes polynomials `log256_ps` / `sincos256_ps` in float32, with each multiply-add the
  compiler fused into an FMA fused here too (found by matching torch: 6.3 M values, 0 differences); elsewhere
  (ATEN_CPU_CAPABILITY=default) the scalar template, whose logf/cosf/sinf are the C library's, called here through
  ctypes so the same functions give the same bits.
  Fewer than 16 elements: `normal_distribution<double>` per element (log1p/sin/cos in double, the second value of
  each pair cached in the generator for the next draw), cast to float.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from functools import lru_cache

import numpy as np

_TWO_PI = 2.0 * math.pi  # c10::pi<double> · 2, exact in double
_F24 = np.float32(2.0 ** -24)


def _init_genrand(seed: int) -> np.ndarray:
    """at::mt19937's state for a seed: init_genrand on its low 32 bits."""
    key = [seed & 0xFFFFFFFF]
    for j in range(1, 624):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF)
    return np.array(key, dtype=np.uint32)


@lru_cache(maxsize=1)
def _libm():
    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    for name in ("logf", "cosf", "sinf"):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return lib


def capability() -> str:
    """The CPU kernel family torch dispatches to here: ATEN_CPU_CAPABILITY if set, else the CPU's flags
    (avx512: avx512f/bw/vl/dq; avx2: avx2 and fma; default otherwise). avx2 and avx512 draw alike."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if forced in ("default", "avx2", "avx512"):
        return forced
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
        return "avx512"
    if {"avx2", "fma"} <= set(flags):
        return "avx2"
    return "default"


def _fill16_scalar(blocks: np.ndarray) -> np.ndarray:
    """NormalFill16<float> (the scalar template, mean 0, std 1) on blocks [K, 16] of uniforms."""
    libm = _libm()
    u1 = (np.float32(1.0) - blocks[:, :8]).ravel()  # [0, 1) → (0, 1]
    u2 = blocks[:, 8:].ravel()
    log_u1 = np.fromiter((libm.logf(float(v)) for v in u1), dtype=np.float32, count=u1.size)
    radius = np.sqrt(np.float32(-2.0) * log_u1)  # float: −2 · logf(u1), sqrtf
    theta = (_TWO_PI * u2.astype(np.float64)).astype(np.float32)  # 2.0f · pi<double> · u2 in double, to float
    cos = np.fromiter((libm.cosf(float(v)) for v in theta), dtype=np.float32, count=theta.size)
    sin = np.fromiter((libm.sinf(float(v)) for v in theta), dtype=np.float32, count=theta.size)
    out = np.empty_like(blocks)
    out[:, :8] = (radius * cos).reshape(-1, 8) + np.float32(0.0)  # std::fma(x, 1, 0)
    out[:, 8:] = (radius * sin).reshape(-1, 8) + np.float32(0.0)
    return out


# ---- avx_mathfun (ATen/native/cpu/avx_mathfun.h), float32 lanes, with the compiler's FMA contractions --------

def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add, correctly rounded: a·b is exact in double; the double sum's rounding error
    (TwoSum) decides the rare sums that land exactly halfway between two floats."""
    p = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
    c = np.broadcast_to(np.asarray(c, np.float32).astype(np.float64), p.shape)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    out = s.astype(np.float32)
    up, down = np.nextafter(s, np.inf).astype(np.float32), np.nextafter(s, -np.inf).astype(np.float32)
    tie = (up != down) & (err != 0)
    if tie.any():
        out[tie] = np.where(err[tie] > 0, up[tie], down[tie])
    return out


_F = np.float32
_LOG_P = tuple(_F(v) for v in (7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1, 1.4249322787E-1,
                               -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1, 3.3333331174E-1))


def _log256(x: np.ndarray) -> np.ndarray:
    """log256_ps for x in (0, 1]: exponent and mantissa in [0.5, 1), then Cephes' logf polynomial."""
    x = np.maximum(x, np.array([0x00800000], np.int32).view(np.float32)[0])  # min_norm_pos
    bits = x.view(np.int32)
    e = ((bits.view(np.uint32) >> 23).astype(np.int32) - 127).astype(np.float32) + _F(1)
    x = ((bits & np.int32(~0x7F800000)) | np.int32(0x3F000000)).view(np.float32)  # | 0.5
    mask = x < _F(0.707106781186547524)  # cephes_SQRTHF
    tmp = np.where(mask, x, _F(0))
    x = x - _F(1)
    e = e - np.where(mask, _F(1), _F(0))
    x = x + tmp
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma(y, x, p)  # y·x + p
    y = y * x
    y = _fma(y, z, e * _F(-2.12194440e-4))  # y·z + e·q1
    y = _fma(z, _F(-0.5), y)  # y − z·0.5
    x = x + y
    return _fma(e, _F(0.693359375), x)  # x + e·q2


def _sincos256(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sincos256_ps for x ≥ 0: octant j by 4/π, Cody–Waite reduction (DP1..3), the two Cephes polynomials."""
    j = (x * _F(1.27323954473516)).astype(np.int32)  # cvttps: truncation
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    sin_negative = (j & 4) != 0
    poly = (j & 2) == 0
    x = _fma(y, _F(-0.78515625), x)
    x = _fma(y, _F(-2.4187564849853515625e-4), x)
    x = _fma(y, _F(-3.77489497744594108e-8), x)
    cos_negative = (~(j - 2) & 4) != 0
    z = x * x
    yc = _fma(np.full_like(z, _F(2.443315711809948E-005)), z, _F(-1.388731625493765E-003))
    yc = _fma(yc, z, _F(4.166664568298827E-002))
    yc = yc * z
    yc = _fma(yc, z, -(z * _F(0.5)))  # yc·z − z·0.5
    yc = yc + _F(1)
    ys = _fma(np.full_like(z, _F(-1.9515295891E-4)), z, _F(8.3321608736E-3))
    ys = _fma(ys, z, _F(-1.6666654611E-1))
    ys = _fma(ys * z, x, x)
    sin, cos = np.where(poly, ys, yc), np.where(poly, yc, ys)
    return np.where(sin_negative, -sin, sin), np.where(cos_negative, -cos, cos)


def _fill16_avx(blocks: np.ndarray) -> np.ndarray:
    """NormalFill16<float> under CPU_CAPABILITY_AVX2 (mean 0, std 1) on blocks [K, 16] of uniforms."""
    u1 = _F(1) - blocks[:, :8]
    radius = np.sqrt(_F(-2) * _log256(u1))
    sin, cos = _sincos256(_F(2.0 * math.pi) * blocks[:, 8:])  # two_pi_ = float(2π)
    out = np.empty_like(blocks)
    out[:, :8] = radius * cos + _F(0)  # _mm256_fmadd_ps(n, std 1, mean 0)
    out[:, 8:] = radius * sin + _F(0)
    return out


class TorchCpuGenerator:
    """A stand-in for a CPU `torch.Generator` seeded with `manual_seed(seed)`, for float32 `randn`."""

    def __init__(self, seed: int = 67280421310721):  # torch's default_rng_seed_val
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "TorchCpuGenerator":
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": _init_genrand(int(seed)), "pos": 624}}
        self._cached_normal: float | None = None  # normal_distribution<double>'s second value
        return self

    def _u32(self, n: int) -> np.ndarray:
        return self._bits.random_raw(n).astype(np.uint32)

    def _uniform_float(self, n: int) -> np.ndarray:
        return (self._u32(n) & np.uint32(0xFFFFFF)).astype(np.float32) * _F24

    def _uniform_double(self) -> float:
        hi, lo = (int(v) for v in self._u32(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0 ** -53

    def _normal_double(self) -> float:
        """at::normal_distribution<double>(0, 1) with the generator's cached second sample."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1 = self._uniform_double()
        u2 = self._uniform_double()
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = r * math.sin(theta)
        return r * math.cos(theta)

    def randn(self, *shape) -> np.ndarray:
        """torch.randn(shape, generator=this, dtype=float32) on the CPU, as a numpy array."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if n < 16:
            return np.array([self._normal_double() for _ in range(n)], dtype=np.float32).reshape(shape)
        fill = _fill16_scalar if capability() == "default" else _fill16_avx
        data = self._uniform_float(n)
        whole = n // 16 * 16
        data[:whole] = fill(data[:whole].reshape(-1, 16)).ravel()
        if n % 16:  # normal_fill: recompute the last 16 values from 16 fresh uniforms
            data[n - 16:] = fill(self._uniform_float(16).reshape(1, 16)).ravel()
        return data.reshape(shape)
