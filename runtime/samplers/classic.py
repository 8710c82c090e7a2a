"""Samplers: pure generator functions with one signature, in sigma space (x = x0 + sigma*eps).

    sampler(denoise, x, schedule, generator) -> Iterator[Tensor]

`denoise(x, sigma) -> x0` (runtime/denoiser/x0.py); `x` is the float32 starting latent in sigma space
(`initial_latents` for txt2img, x0 + sigma0*noise for img2img); `generator` is a list of CPU torch.Generators,
one per image (or one generator for the batch), from which per-step noise is drawn in diffusers' order, shape and
dtype (runtime/samplers/noise.py, diffusers' randn_tensor). Each sampler
yields the latent after every model evaluation (what diffusers' pipeline holds after each `scheduler.step`);
the last one is what diffusers decodes. A caller may `send()` a replacement for the latent just yielded
(inpainting re-imposes the known region) and the sampler continues from it. Multistep history is a local.

Each equals the diffusers scheduler named in its docstring (schedules: runtime/samplers/schedules.py; the registry of
names, schedule builders and diffusers classes: runtime/samplers/registry.py); formulas are
restated in sigma space from ../shared/reference/fewstep_perf.md §1.3-1.4.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch

from sdrt.runtime.samplers import schedules
from sdrt.runtime.samplers.noise import Generators, randn_like
from sdrt.runtime.samplers.schedules import Schedule, ScheduleError, SchedulerConfig, input_scale
from sdrt.runtime.samplers.spec import (SD_BETAS, SamplerSpec, check_dpm, check_finite_first_sigma,
                                       check_no_thresholding, choice, original_steps_limit)

Denoise = Callable[[torch.Tensor, float], torch.Tensor]
Sampler = Callable[[Denoise, torch.Tensor, Schedule, "Generators | torch.Generator | None"], Iterator[torch.Tensor]]


def initial_latents(noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Sigma-space start from diffusers' draw `randn(shape, generator, float32)`: noise * init_noise_sigma.

    For DDIM/LCM/DPM-Solver (init_noise_sigma 1 in diffusers' alpha space) this is noise * sqrt(1 + sigma0^2).
    """
    return noise.float() * schedule.init_noise_sigma


def _randn(like: torch.Tensor, generator) -> torch.Tensor:
    # diffusers randn_tensor: drawn on the CPU (one generator per image, or one for all), then moved
    return randn_like(like, generator)


def _sqrt(v) -> np.float32:
    # float32 square root as torch computes it in diffusers' step() (numpy can differ by 1 ulp)
    return np.float32(torch.tensor(float(v), dtype=torch.float32) ** 0.5)


def _clip(x0: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    return x0 if schedule.clip_sample is None else x0.clamp(-schedule.clip_sample, schedule.clip_sample)


def _rescale(x: torch.Tensor, landed: np.float32, next_sigma: np.float32) -> torch.Tensor:
    """Alpha-space samplers: re-express a latent that landed at sigma `landed` at the next evaluation's scale."""
    if landed == next_sigma:
        return x
    return x * float(_sqrt((np.float32(1) + next_sigma * next_sigma) / (np.float32(1) + landed * landed)))


def euler(denoise: Denoise, x: torch.Tensor, schedule: Schedule,
          generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """diffusers EulerDiscreteScheduler (s_churn = 0)."""
    x = x.float()
    for i in range(len(schedule.timesteps)):
        sigma = schedule.sigmas[i]
        x0 = denoise(x, float(sigma))
        d = (x - x0) / float(sigma)
        x = x + d * float(schedule.targets[i] - sigma)
        sent = yield x
        if sent is not None:
            x = sent


def euler_ancestral(denoise: Denoise, x: torch.Tensor, schedule: Schedule,
                    generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """diffusers EulerAncestralDiscreteScheduler: Euler to sigma_down, then noise of std sigma_up (drawn every step)."""
    x = x.float()
    for i in range(len(schedule.timesteps)):
        s, s_to = schedule.sigmas[i], schedule.targets[i]
        x0 = denoise(x, float(s))
        s_up = _sqrt(s_to * s_to * (s * s - s_to * s_to) / (s * s))
        s_down = _sqrt(s_to * s_to - s_up * s_up)
        d = (x - x0) / float(s)
        x = x + d * float(s_down - s)
        x = x + _randn(x, generator) * float(s_up)
        sent = yield x
        if sent is not None:
            x = sent


def heun(denoise: Denoise, x: torch.Tensor, schedule: Schedule,
         generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """diffusers HeunDiscreteScheduler: Euler predictor, trapezoidal corrector; the step to sigma 0 is plain Euler.

    The schedule interleaves sigmas as diffusers does ([s0, s1, s1, s2, s2, ..., 0]); evaluations at even indices
    are predictors, odd ones correctors, and each yields (the predictor's latent is diffusers' intermediate).
    """
    x = x.float()
    n = len(schedule.timesteps)
    j = 0
    while j < n:
        s, s_next = schedule.sigmas[j], schedule.sigmas[j + 1]
        x0 = _clip(denoise(x, float(s)), schedule)
        d = (x - x0) / float(s)
        dt = float(s_next - s)
        predicted = x + d * dt
        sent = yield predicted
        predicted = predicted if sent is None else sent
        if j + 1 >= n:
            break
        x0_next = _clip(denoise(predicted, float(s_next)), schedule)
        d_next = (predicted - x0_next) / float(s_next)
        x = x + (d + d_next) / 2 * dt
        sent = yield x
        if sent is not None:
            x = sent
        j += 2


def _dpm_solver(denoise: Denoise, x: torch.Tensor, schedule: Schedule, generator: torch.Generator | None,
                sde: bool) -> Iterator[torch.Tensor]:
    """diffusers DPMSolverMultistepScheduler, algorithm_type dpmsolver++ (sde=False) or sde-dpmsolver++ (True).

    In sigma space with r = sigma_t / sigma_s = exp(-h) (h = lambda_t - lambda_s, lambda = -log sigma):
      ODE 1st: x = r x + (1 - r) D0             2nd adds (1 - r) D1 / 2 (midpoint) or ((r - 1)/h + 1) D1 (heun)
      SDE 1st: x = r^2 x + (1 - r^2) D0 + sigma_t sqrt(1 - r^2) z
               2nd adds (1 - r^2) D1 / 2 (midpoint) or ((1 - r^2)/(-2h) + 1) D1 (heun)
    with D0 = x0_i, D1 = (x0_i - x0_{i-1}) / r0, r0 = h_{i-1} / h. The first step is first order (no history).
    """
    if not schedule.solver_orders:
        raise ScheduleError("this schedule was not made for a DPM-Solver sampler; build it with make_schedule(..., "
                            "'dpmpp_2m' or 'dpmpp_2m_sde', ...)")
    x = x.float()
    prev_x0 = None
    for i in range(len(schedule.timesteps)):
        s, t = schedule.sigmas[i], schedule.targets[i]
        x0 = denoise(x, float(s))
        z = _randn(x, generator) if sde else None  # drawn every step, before the update
        order = min(schedule.solver_orders[i], 1 if prev_x0 is None else 2)
        r = float(t / s)
        h = math.log(float(s)) - math.log(float(t)) if t > 0 else math.inf
        if order == 2 and h == 0:  # karras end on sigma_min twice: the step is the identity (diffusers: D1 = 0)
            order = 1
        if order == 2:
            r0 = (math.log(float(schedule.sigmas[i - 1])) - math.log(float(s))) / h
            d1 = (x0 - prev_x0) / r0
        if not sde:
            x_next = r * x + (1 - r) * x0
            if order == 2:
                coef = (1 - r) / 2 if schedule.solver_type == "midpoint" else (r - 1) / h + 1
                x_next = x_next + coef * d1
        else:
            x_next = r * r * x + (1 - r * r) * x0 + float(t) * math.sqrt(1 - r * r) * z
            if order == 2:
                coef = (1 - r * r) / 2 if schedule.solver_type == "midpoint" else (1 - r * r) / (-2 * h) + 1
                x_next = x_next + coef * d1
        x = _rescale(x_next, t, schedule.sigmas[i + 1])
        prev_x0 = x0
        sent = yield x
        if sent is not None:
            x = sent


def dpmpp_2m(denoise: Denoise, x: torch.Tensor, schedule: Schedule,
             generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """diffusers DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")."""
    return _dpm_solver(denoise, x, schedule, generator, sde=False)


def dpmpp_2m_sde(denoise: Denoise, x: torch.Tensor, schedule: Schedule,
                 generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """diffusers DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")."""
    return _dpm_solver(denoise, x, schedule, generator, sde=True)


def ddim(denoise: Denoise, x: torch.Tensor, schedule: Schedule,
         generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """diffusers DDIMScheduler, eta = 0: x0 (clipped if clip_sample) + eps (from the unclipped x0) to sigma t - T//N."""
    x = x.float()
    for i in range(len(schedule.timesteps)):
        s, t = schedule.sigmas[i], schedule.targets[i]
        x0 = denoise(x, float(s))
        eps = (x - x0) / float(s)
        x = _clip(x0, schedule) + eps * float(t)
        x = _rescale(x, t, schedule.sigmas[i + 1])
        sent = yield x
        if sent is not None:
            x = sent


def lcm(denoise: Denoise, x: torch.Tensor, schedule: Schedule,
        generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """diffusers LCMScheduler: denoised = c_out x0 + c_skip x_alpha, then fresh noise to the next sigma.

    The last step yields `denoised` (what the LCM and SD/SDXL pipelines decode); noise is drawn on every other step.
    """
    if schedule.c_skip is None or schedule.c_out is None:
        raise ScheduleError("this schedule was not made for lcm; build it with make_schedule(..., 'lcm', ...)")
    x = x.float()
    n = len(schedule.timesteps)
    for i in range(n):
        s = schedule.sigmas[i]
        x0 = _clip(denoise(x, float(s)), schedule)
        x_alpha = x / input_scale(s)
        denoised = float(schedule.c_out[i]) * x0 + float(schedule.c_skip[i]) * x_alpha
        x = denoised if i == n - 1 else denoised + _randn(x, generator) * float(schedule.sigmas[i + 1])
        sent = yield x
        if sent is not None:
            x = sent


# ---- registry entries (runtime/samplers/spec.py) -------------------------------------------------------

def _check_euler(cfg: SchedulerConfig) -> None:
    choice("interpolation_type", cfg.interpolation_type, ("linear",))
    choice("timestep_type", cfg.timestep_type, ("discrete", "continuous"))
    choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))


def _check_euler_a(cfg: SchedulerConfig) -> None:
    if cfg.prediction_type == "sample":
        raise ScheduleError("euler_a does not support prediction_type 'sample' (diffusers neither); "
                            "choose euler, heun, dpmpp_2m, dpmpp_2m_sde, ddim or lcm")


SPECS = (
    SamplerSpec("euler", euler, lambda c, a, n: schedules.euler_family(c, a, n, "euler"), "EulerDiscreteScheduler",
                class_defaults={**SD_BETAS, "timestep_spacing": "linspace"}, a1111=("Euler",),
                conversions=schedules.SIGMA_CONVERSIONS, check=_check_euler, aliases=("k_euler",),
                description="Euler (Karras et al. 2022, Alg. 2)"),
    SamplerSpec("euler_a", euler_ancestral, lambda c, a, n: schedules.euler_family(c, a, n, "euler_a"),
                "EulerAncestralDiscreteScheduler", class_defaults={**SD_BETAS, "timestep_spacing": "linspace"},
                a1111=("Euler a", "Euler Ancestral"), stochastic=True, check=_check_euler_a,
                aliases=("k_euler_a",), description="Euler ancestral"),
    SamplerSpec("heun", heun, lambda c, a, n: schedules.euler_family(c, a, n, "heun"), "HeunDiscreteScheduler",
                class_defaults=dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                    timestep_spacing="linspace", clip_sample=False),
                a1111=("Heun",), conversions=schedules.SIGMA_CONVERSIONS,
                description="Heun (2 evaluations per step)"),
    SamplerSpec("dpmpp_2m", dpmpp_2m, schedules.dpm_multistep, "DPMSolverMultistepScheduler",
                {"algorithm_type": "dpmsolver++"}, {**SD_BETAS, "timestep_spacing": "linspace"},
                a1111=("DPM++ 2M",), conversions=schedules.SIGMA_CONVERSIONS, check=check_dpm,
                description="DPM-Solver++(2M)"),
    SamplerSpec("dpmpp_2m_sde", dpmpp_2m_sde, schedules.dpm_multistep, "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++"}, {**SD_BETAS, "timestep_spacing": "linspace"},
                a1111=("DPM++ 2M SDE",), stochastic=True, conversions=schedules.SIGMA_CONVERSIONS, check=check_dpm,
                description="SDE DPM-Solver++(2M), noise from the request's generators"),
    SamplerSpec("ddim", ddim, schedules.ddim, "DDIMScheduler",
                class_defaults={**SD_BETAS, "timestep_spacing": "leading", "set_alpha_to_one": True,
                                "clip_sample": True},
                a1111=("DDIM",), check=check_no_thresholding, eta=(0.0,), description="DDIM, eta 0"),
    SamplerSpec("lcm", lcm, schedules.lcm, "LCMScheduler",
                class_defaults=dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False),
                a1111=("LCM",), stochastic=True, check=check_finite_first_sigma("lcm"),
                step_limit=original_steps_limit, eta=(), description="latent consistency models"),
)
