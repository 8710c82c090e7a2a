"""More samplers over the discrete training schedule: LMS, DPM2 (KDPM2) and DPM2 ancestral, PLMS (PNDM); TCD and
DPM++ SDE (DPMSolverSDE) are in runtime/samplers/stochastic.py, on the helpers here. Each equals the diffusers scheduler named in its docstring (diffusers 0.42.1,
src/diffusers/schedulers/scheduling_*.py; ../shared/reference/customization.md §5).

Same interface as runtime/samplers/classic.py: `sampler(denoise, x, schedule, generator)` in sigma space
(x = x0 + sigma*eps), yielding the latent after every model evaluation, continuing from a latent the caller
send()s. The schedule builders here compute, in diffusers' dtypes and operation order, everything a step needs
(interleaved evaluation sigmas, per-evaluation coefficients) and hand it to the sampler in `Schedule.extra`, so
img2img windows (`schedules.from_index`) cut it like the other per-evaluation fields.

PNDM (and TCD) run in diffusers' alpha space (x_a = x / sqrt(1 + sigma^2)); they keep the alpha-space latent and
yield it re-expressed at the next evaluation's sigma (the closing sigma is 0, so the last yield is diffusers'
latent itself).

`SPECS` holds the registry entries (runtime/samplers/spec.py) of the samplers defined here.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

from sdrt.runtime.samplers.noise import randn_like
from sdrt.runtime.samplers.spec import SD_BETAS, SamplerSpec
from sdrt.runtime.samplers.schedules import (SIGMA_CONVERSIONS, Schedule, ScheduleError, SchedulerConfig,
    _alpha_space_init, _spaced, _train_sigmas, alphas_cumprod, convert_sigmas, input_scale, sigma_to_t)

K_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")  # KDPM2(A) / DPMSolverSDE defaults


# ---- shared helpers --------------------------------------------------------------------------------------

def abar_without_zero_snr(cfg: SchedulerConfig, name: str) -> torch.Tensor:
    # LMS, KDPM2(A), PNDM and DPMSolverSDE have no rescale_betas_zero_snr option: diffusers ignores the key
    return alphas_cumprod(replace(cfg, rescale_betas_zero_snr=False), name)


def init_sigma(cfg: SchedulerConfig, top: np.float32) -> float:
    # sigma-space schedulers' init_noise_sigma: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing
    return float(top) if cfg.timestep_spacing in ("linspace", "trailing") else input_scale(top)


def interpolated(cfg: SchedulerConfig, train: np.ndarray, n: int, float64: bool = False):
    """Timesteps (numpy) and the training sigmas interpolated at them (float64), before any conversion."""
    if float64 and cfg.timestep_spacing == "linspace":  # DPMSolverSDE spaces in float64
        t = np.linspace(0, cfg.num_train_timesteps - 1, n, dtype=float)[::-1].copy()
    else:
        t = _spaced(cfg, n, np.float64 if float64 else np.float32)
    return t, np.interp(t, np.arange(0, len(train)), train)


def _sigma_to_t_f32(sigma: torch.Tensor, log_train: torch.Tensor) -> float:
    """diffusers `_sigma_to_t` fed a float32 torch scalar (KDPM2's interpolated sigmas): numpy's float32 log, then
    torch float32 arithmetic, exactly as that code runs on tensors."""
    log_s = torch.from_numpy(np.asarray(np.log(np.maximum(sigma.numpy(), np.float32(1e-10)))))
    low = torch.cumsum(log_s - log_train[:, None] >= 0, dim=0).argmax(dim=0).clip(max=len(log_train) - 2)
    lo, hi = log_train[low], log_train[low + 1]
    w = ((lo - log_s) / (lo - hi)).clamp(0, 1)
    return float(((1 - w) * low + w * (low + 1)).reshape(()))


def yield_alpha(x_alpha: torch.Tensor, next_sigma: np.float32) -> torch.Tensor:
    """An alpha-space latent re-expressed at the next evaluation's sigma (the closing sigma 0 leaves it as is)."""
    return x_alpha if next_sigma == 0 else x_alpha * input_scale(next_sigma)


def _distinct(sigmas: np.ndarray, timesteps: np.ndarray, moved: np.ndarray) -> None:
    """Nudge sigmas[i] (i in `moved`) up by float32 ulps until no other evaluation pairs it with another timestep.

    make_denoiser looks timesteps up by sigma; KDPM2 ancestral's midpoint sigma often equals the next sigma
    bitwise while its timestep differs. One ulp (6e-8 relative) moves the input scaling and the x0 conversion
    by as much as float32 rounding does elsewhere (tests/test_samplers_discrete.py measures what it costs).
    """
    pairs: dict[float, float] = {}
    for i in np.setdiff1d(np.arange(len(timesteps)), moved):
        pairs.setdefault(float(sigmas[i]), float(timesteps[i]))
    for i in moved:
        while pairs.setdefault(float(sigmas[i]), float(timesteps[i])) != float(timesteps[i]):
            sigmas[i] = np.nextafter(sigmas[i], np.float32(np.inf))


def _output(x: torch.Tensor, x0: torch.Tensor, sigma: np.float32, prediction_type: str) -> torch.Tensor:
    """The UNet output diffusers' alpha-space PNDM step sees (epsilon, or v), rebuilt from x0 in sigma space."""
    eps = (x - x0) / float(sigma)
    if prediction_type == "v_prediction":  # v = alpha eps - sigma_a x0 = (eps - sigma x0) / sqrt(1 + sigma^2)
        return (eps - float(sigma) * x0) / input_scale(sigma)
    return eps


def refuse_sample(name: str):
    def check(cfg: SchedulerConfig) -> None:
        if cfg.prediction_type == "sample":
            raise ScheduleError(f"{name} does not support prediction_type 'sample' (diffusers neither); "
                                "choose euler, heun, lms, dpmpp_2m, ddim or tcd")
    return check


# ---- LMS -------------------------------------------------------------------------------------------------

LMS_ORDER = 4  # LMSDiscreteScheduler.step(order=4): the pipelines never pass another order

# Two-point Gauss-Legendre integrates polynomials of degree <= 3 exactly: the Lagrange basis of order <= 4
_GAUSS = (-1 / math.sqrt(3), 1 / math.sqrt(3))


def lms_coefficients(sigmas: np.ndarray, order: int = LMS_ORDER) -> np.ndarray:
    """c[i, j] = integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial j on sigmas[i-k], k < o_i.

    o_i = min(i + 1, order) as in LMSDiscreteScheduler.get_lms_coefficient. diffusers integrates with
    scipy.integrate.quad an integrand it evaluates on float32 sigma tensors, so its coefficients carry float32
    rounding (~1e-7 relative); these exact ones differ from them by that much. float64 [n, order], NaN past o_i.
    """
    s = sigmas.astype(np.float64)
    n = len(sigmas) - 1
    out = np.full((n, order), np.nan)
    for i in range(n):
        o = min(i + 1, order)
        a, b = s[i], s[i + 1]
        half, mid = (b - a) / 2, (a + b) / 2
        for j in range(o):
            total = 0.0
            for node in _GAUSS:
                tau = mid + half * node
                prod = 1.0
                for k in range(o):
                    if k != j:
                        prod *= (tau - s[i - k]) / (s[i - j] - s[i - k])
                total += prod
            out[i, j] = total * half
    return out


def build_lms(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    # diffusers LMSDiscreteScheduler.set_timesteps
    train = _train_sigmas(abar_without_zero_snr(cfg, "lms"))
    t, sig = interpolated(cfg, train, n)
    kind = cfg.sigma_conversion
    if kind is not None:  # LMS's karras conversion ignores config sigma_min/max; exponential and beta read them
        sig = convert_sigmas(kind, replace(cfg, sigma_min=None, sigma_max=None) if kind == "karras" else cfg, sig, n)
        t = sigma_to_t(sig, train)
    sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
    return Schedule(sigmas=sigmas, timesteps=t.astype(np.float32).astype(np.float64),
                    init_noise_sigma=init_sigma(cfg, sigmas.max()), targets=sigmas[1:].copy(),
                    num_train_timesteps=cfg.num_train_timesteps, extra={"lms_coeffs": lms_coefficients(sigmas)})


def lms(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers LMSDiscreteScheduler (order 4): x += sum_j c_j d_{i-j} over the last <= 4 derivatives.

    An img2img window starts with no history; like diffusers it then uses the first coefficients of the
    full-schedule order (its step index counts from the window's start in the whole schedule).
    """
    coeffs = schedule.extra.get("lms_coeffs")
    if coeffs is None:
        raise ScheduleError("this schedule was not made for lms; build it with make_schedule(..., 'lms', ...)")
    x = x.float()
    derivatives: list[torch.Tensor] = []
    for i in range(len(schedule.timesteps)):
        sigma = schedule.sigmas[i]
        x0 = denoise(x, float(sigma))
        derivatives.append((x - x0) / float(sigma))
        if len(derivatives) > LMS_ORDER:
            derivatives.pop(0)
        update = sum(float(c) * d for c, d in zip(coeffs[i], reversed(derivatives)))
        x = x + update
        sent = yield x
        if sent is not None:
            x = sent


# ---- KDPM2 and KDPM2 ancestral ----------------------------------------------------------------------------

def _kdpm2_base(cfg: SchedulerConfig, n: int, name: str):
    # KDPM2(Ancestral)DiscreteScheduler.set_timesteps up to the interleaving
    train = _train_sigmas(abar_without_zero_snr(cfg, name))
    t, sig = interpolated(cfg, train, n)
    kind = cfg.sigma_conversion
    if kind is not None:  # these classes read config sigma_min/max for every conversion
        sig = convert_sigmas(kind, cfg, sig, n)
        t = sigma_to_t(sig, train)
        if kind == "karras":
            t = t.round()
    # timesteps stay float32 without a conversion, float64 with one (and the interpolated ones follow)
    t_dtype = np.float32 if kind is None else np.float64
    s = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    return train, t.astype(t_dtype), s, t_dtype


def build_kdpm2(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    """KDPM2DiscreteScheduler: evaluations [s0, m1, s1, m2, s2, ..., m_{N-1}, s_{N-1}], m_k = sqrt(s_{k-1} s_k).

    extra: stage (0 first half, 1 second half), base (the sigma the step starts from), land (where it lands).
    """
    train, t, s, t_dtype = _kdpm2_base(cfg, n, "kdpm2")
    mid = s.log().lerp(s.roll(1).log(), 0.5).exp()  # mid[k]: between s[k-1] and s[k]; mid[N] = 0
    log_train = torch.from_numpy(np.log(train))
    t_mid = np.array([_sigma_to_t_f32(mid[k], log_train) for k in range(1, n)], dtype=np.float32).astype(t_dtype)
    sig, ts, stage, base, land = [s[0]], [t[0]], [0], [s[0]], [mid[1]]
    for k in range(n - 1):
        sig += [mid[k + 1], s[k + 1]]
        ts += [t_mid[k], t[k + 1]]
        stage += [1, 0]
        base += [s[k], s[k + 1]]
        land += [s[k + 1], mid[k + 2]]
    return _two_stage(cfg, sig, ts, stage, base, land, None)


def build_kdpm2_a(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    """KDPM2AncestralDiscreteScheduler: evaluations [s0, m0, s1, m1, ..., m_{N-2}, s_{N-1}], m_k = sqrt(s_k d_k).

    The second half lands on d_k (sigma_down) and adds noise of std u_k (sigma_up): extra "up".
    """
    train, t, s, t_dtype = _kdpm2_base(cfg, n, "kdpm2_a")
    nxt = s.roll(-1)
    nxt[-1] = 0.0
    up = (nxt ** 2 * (s ** 2 - nxt ** 2) / s ** 2) ** 0.5
    down = (nxt ** 2 - up ** 2) ** 0.5
    down[-1] = 0.0
    mid = s.log().lerp(down.log(), 0.5).exp()
    mid[-2:] = 0.0
    log_train = torch.from_numpy(np.log(train))
    t_mid = np.array([_sigma_to_t_f32(mid[k], log_train) for k in range(n - 1)], dtype=np.float32).astype(t_dtype)
    sig, ts, stage, base, land, ups = [s[0]], [t[0]], [0], [s[0]], [mid[0]], [0.0]
    for k in range(n - 1):
        sig += [mid[k], s[k + 1]]
        ts += [t_mid[k], t[k + 1]]
        stage += [1, 0]
        base += [s[k], s[k + 1]]
        land += [down[k], mid[k + 1]]
        ups += [up[k], 0.0]
    return _two_stage(cfg, sig, ts, stage, base, land, ups)


def _two_stage(cfg, sig, ts, stage, base, land, ups) -> Schedule:
    f32 = (lambda v: np.array([float(a) for a in v], dtype=np.float32))
    sigmas = np.concatenate([f32(sig), [0.0]]).astype(np.float32)
    timesteps = np.array(ts, dtype=np.float64)
    extra = {"stage": np.array(stage, dtype=np.int64), "base": f32(base), "land": f32(land)}
    if ups is not None:
        extra["up"] = f32(ups)
    _distinct(sigmas, timesteps, np.flatnonzero(extra["stage"] == 1))
    return Schedule(sigmas=sigmas, timesteps=timesteps, init_noise_sigma=init_sigma(cfg, sigmas[0]),
                    targets=sigmas[1:].copy(), order=2,
                    num_train_timesteps=cfg.num_train_timesteps, extra=extra)


def _kdpm2_run(denoise, x: torch.Tensor, schedule: Schedule, generator, ancestral: bool) -> Iterator[torch.Tensor]:
    ex = schedule.extra
    if "stage" not in ex or "base" not in ex or ("up" in ex) != ancestral:
        name = "kdpm2_a" if ancestral else "kdpm2"
        raise ScheduleError(f"this schedule was not made for {name}; build it with make_schedule(..., '{name}', ...)")
    x = x.float()
    stored = None
    for i in range(len(schedule.timesteps)):
        sigma = schedule.sigmas[i]
        x0 = denoise(x, float(sigma))
        d = (x - x0) / float(sigma)
        dt = float(ex["land"][i] - ex["base"][i])
        if ex["stage"][i] == 0:  # first half: Euler to the midpoint (the last step: to sigma 0)
            stored = x
            x = x + d * dt
        else:  # second half: from the step's start with the midpoint's derivative
            x = stored + d * dt
            stored = None
            if ancestral:
                x = x + randn(x, generator) * float(ex["up"][i])
        sent = yield x
        if sent is not None:
            x = sent


def randn(x: torch.Tensor, generator) -> torch.Tensor:
    # model_output.shape and dtype (float32: sdrt's denoiser works in float32), one draw per image
    return randn_like(x, generator)


def kdpm2(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers KDPM2DiscreteScheduler (DPM-Solver-2 in sigma space, two evaluations per interval but the last)."""
    return _kdpm2_run(denoise, x, schedule, generator, ancestral=False)


def kdpm2_a(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers KDPM2AncestralDiscreteScheduler: KDPM2 to sigma_down, then one noise draw (std sigma_up) per step."""
    return _kdpm2_run(denoise, x, schedule, generator, ancestral=True)


# ---- PNDM (PLMS, skip_prk_steps) ----------------------------------------------------------------------------

def _pndm_spaced(cfg: SchedulerConfig, n: int) -> np.ndarray:
    # PNDMScheduler.set_timesteps: `_timesteps`, ascending
    t_count = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, t_count - 1, n).round().astype(np.int64)
    if cfg.timestep_spacing == "leading":
        return ((np.arange(0, n) * (t_count // n)).round() + cfg.steps_offset).astype(np.int64)
    return np.round(np.arange(t_count, 0, -(t_count / n)))[::-1].astype(np.int64) - 1


def build_pndm(cfg: SchedulerConfig, abar: torch.Tensor, n: int, prk: bool = False) -> Schedule:
    """PNDMScheduler.set_timesteps. PLMS (skip_prk_steps true): [t_{N-1}, t_{N-2}, t_{N-2}, t_{N-3}, ..., t_0].

    With `prk` (skip_prk_steps false; SchedulerConfig has no such key yet, so only callers that pass it get it):
    12 Runge-Kutta evaluations on the 4 highest timesteps and their half steps, then PLMS from t_{N-4} down.
    """
    t_count = cfg.num_train_timesteps
    if n > t_count:
        raise ScheduleError(f"pndm runs at most num_train_timesteps ({t_count}) steps, not {n}")
    if prk and n < 4:
        raise ScheduleError(f"pndm's Runge-Kutta warm-up needs at least 4 steps (got {n})")
    abar = abar_without_zero_snr(cfg, "pndm")
    spaced = _pndm_spaced(cfg, n)
    half = t_count // n // 2
    if prk:
        warm = np.array(spaced[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
        prk_t = warm[:-1].repeat(2)[1:-1][::-1].copy()
        t = np.concatenate([prk_t, spaced[:-3][::-1]]).astype(np.int64)
    else:
        prk_t = np.array([], dtype=np.int64)
        t = np.concatenate([spaced[:-1], spaced[-2:-1], spaced[-1:]])[::-1].astype(np.int64)
    train = _train_sigmas(abar)
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else abar[0]
    sigmas = np.concatenate([train[t], [0.0]]).astype(np.float32)
    delta = t_count // n
    # where each evaluation's step lands in a full run (informative; the sampler follows diffusers' counter)
    landed = []
    for c, ti in enumerate(t):
        if c < len(prk_t):
            to = ti - (0 if c % 2 else half)
        else:
            to = ti if (c == 1 and not prk) else ti - delta
        a = abar[to] if to >= 0 else final
        landed.append(float(((1 - a) / a) ** 0.5))
    return Schedule(sigmas=sigmas, timesteps=t.astype(np.float64), init_noise_sigma=_alpha_space_init(sigmas[0]),
                    targets=np.array(landed, dtype=np.float32), num_train_timesteps=t_count,
                    extra={"pndm": {"abar": abar, "final_abar": final, "delta": delta,
                                    "prk": torch.from_numpy(prk_t), "half": half,
                                    "prediction_type": cfg.prediction_type}})


def _pndm_transfer(x: torch.Tensor, out: torch.Tensor, t: int, prev: int, p: dict) -> torch.Tensor:
    # PNDMScheduler._get_prev_sample (PNDM paper eq. 9), float32 0-dim tensors as in diffusers
    abar = p["abar"]
    a_t = abar[t]
    a_prev = abar[prev] if prev >= 0 else p["final_abar"]
    b_t, b_prev = 1 - a_t, 1 - a_prev
    if p["prediction_type"] == "v_prediction":
        out = (a_t ** 0.5) * out + (b_t ** 0.5) * x
    coeff = (a_prev / a_t) ** 0.5
    denom = a_t * b_prev ** 0.5 + (a_t * b_t * a_prev) ** 0.5
    return coeff * x - (a_prev - a_t) * out / denom


def pndm(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers PNDMScheduler: PLMS (Adams-Bashforth on epsilon, orders 1-4), after the PRK warm-up if any.

    The step counter starts at 0 at the window's first evaluation, as diffusers' does for img2img (PNDM has no
    begin index): the second evaluation re-integrates the first interval with the averaged output.
    """
    p = schedule.extra.get("pndm")
    if p is None:
        raise ScheduleError("this schedule was not made for pndm; build it with make_schedule(..., 'pndm', ...)")
    delta, prk_t = p["delta"], p["prk"]
    x = x.float()
    x_a = x / input_scale(schedule.sigmas[0])
    ets: list[torch.Tensor] = []
    cur_out, cur_sample = 0, None
    for c in range(len(schedule.timesteps)):
        sigma = schedule.sigmas[c]
        out = _output(x, denoise(x, float(sigma)), sigma, p["prediction_type"])
        t = int(schedule.timesteps[c])
        if c < len(prk_t):  # PNDMScheduler.step_prk
            prev = t - (0 if c % 2 else p["half"])
            t = int(prk_t[c // 4 * 4])
            if c % 4 == 0:
                cur_out = cur_out + 1 / 6 * out
                ets.append(out)
                cur_sample = x_a
            elif c % 4 in (1, 2):
                cur_out = cur_out + 1 / 3 * out
            else:
                out = cur_out + 1 / 6 * out
                cur_out = 0
            x_a = _pndm_transfer(cur_sample if cur_sample is not None else x_a, out, t, prev, p)
        else:  # PNDMScheduler.step_plms
            prev = t - delta
            if c != 1:
                ets = ets[-3:]
                ets.append(out)
            else:
                prev, t = t, t + delta
            sample = x_a
            if len(ets) == 1 and c == 0:
                cur_sample = x_a
            elif len(ets) == 1 and c == 1:
                out = (out + ets[-1]) / 2
                sample, cur_sample = cur_sample, None
            elif len(ets) == 2:
                out = (3 * ets[-1] - ets[-2]) / 2
            elif len(ets) == 3:
                out = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            else:
                out = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
            x_a = _pndm_transfer(sample, out, t, prev, p)
        nxt = schedule.sigmas[c + 1]
        x = yield_alpha(x_a, nxt)
        sent = yield x
        if sent is not None:
            x = sent
            x_a = sent / input_scale(nxt)


# ---- registry entries -----------------------------------------------------------------------------------------

_SIGMA_SPACE = dict(timestep_spacing="linspace")
SPECS = (
    SamplerSpec("lms", lms, build_lms, "LMSDiscreteScheduler", class_defaults={**SD_BETAS, **_SIGMA_SPACE},
                a1111=("LMS",), conversions=SIGMA_CONVERSIONS, aliases=("k_lms",),
                description="linear multistep (order 4), exact Lagrange-basis coefficients"),
    SamplerSpec("kdpm2", kdpm2, build_kdpm2, "KDPM2DiscreteScheduler",
                class_defaults={**K_BETAS, **_SIGMA_SPACE}, a1111=("DPM2",), conversions=SIGMA_CONVERSIONS, aliases=("k_dpm_2",),
                check=refuse_sample("kdpm2"), description="DPM-Solver-2 (2 evaluations per step)"),
    SamplerSpec("kdpm2_a", kdpm2_a, build_kdpm2_a, "KDPM2AncestralDiscreteScheduler",
                class_defaults={**K_BETAS, **_SIGMA_SPACE}, a1111=("DPM2 a",), stochastic=True, aliases=("k_dpm_2_a",),
                conversions=SIGMA_CONVERSIONS, check=refuse_sample("kdpm2_a"),
                description="DPM-Solver-2 ancestral (2 evaluations per step)"),
    SamplerSpec("pndm", pndm, build_pndm, "PNDMScheduler", {"skip_prk_steps": True},
                class_defaults={**SD_BETAS, "timestep_spacing": "leading", "set_alpha_to_one": False},
                a1111=("PLMS",), check=refuse_sample("pndm"), aliases=("plms",),
                description="PLMS (PNDM with skip_prk_steps), SD 1.5's own scheduler"),
)
