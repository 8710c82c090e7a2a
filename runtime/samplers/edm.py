"""EDM samplers: diffusers' EDMEulerScheduler and EDMDPMSolverMultistepScheduler (Playground v2.5, EDM fine-tunes).

EDM models (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models") are trained
with their own preconditioning rather than a discrete beta schedule: the sigmas run from sigma_max to sigma_min in
karras (rho) or exponential spacing, the UNet sees timestep c_noise = 0.25 ln(sigma) and input
x / sqrt(sigma^2 + sigma_data^2), and x0 = c_skip x + c_out F(x) (the Schedule's `sigma_data` switches the denoiser,
runtime/denoiser/x0.py). The latent is the sigma-space latent itself (no alpha space), so the sdrt Euler and
DPM-Solver++ steps run unchanged on it. Arithmetic and dtypes follow diffusers 0.42 (schedulers/
scheduling_edm_euler.py: the ramp in float64; scheduling_edm_dpmsolver_multistep.py: in float32).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sdrt.runtime.samplers import classic
from sdrt.runtime.samplers.schedules import Schedule, ScheduleError, SchedulerConfig
from sdrt.runtime.samplers.spec import SD_BETAS, SamplerSpec, check_no_thresholding, choice

EDM_CLASSES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
# a sampler named for an EDM model runs as its EDM form (AUTOMATIC1111's names select the solver; the model's
# formulation decides the rest); samplers without one are refused there
EDM_FORM = {"dpmpp_2m": "edm_dpmpp_2m", "dpmpp_2m_sde": "edm_dpmpp_2m_sde", "euler": "edm_euler"}
_DEFAULTS = {**SD_BETAS, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "sigma_schedule": "karras"}


def edm_sigmas(cfg: SchedulerConfig, n: int, ramp_dtype: torch.dtype) -> torch.Tensor:
    """The n evaluation sigmas, float32, from sigma_max down to sigma_min (both included)."""
    lo, hi = cfg.sigma_min, cfg.sigma_max
    if cfg.sigma_schedule == "exponential":  # diffusers: k-diffusion's get_sigmas_exponential, float32
        return torch.linspace(math.log(lo), math.log(hi), n).exp().flip(0).to(torch.float32)
    ramp = torch.linspace(0, 1, n, dtype=ramp_dtype)
    inv_lo, inv_hi = lo ** (1 / cfg.rho), hi ** (1 / cfg.rho)
    return ((inv_hi + ramp * (inv_lo - inv_hi)) ** cfg.rho).to(torch.float32)


def _schedule(cfg: SchedulerConfig, n: int, ramp_dtype: torch.dtype, last: float, orders: tuple[int, ...] = ()):
    sigmas = edm_sigmas(cfg, n, ramp_dtype)
    timesteps = 0.25 * torch.log(sigmas)  # precondition_noise, float32
    evals = sigmas.numpy().astype(np.float32)
    targets = np.concatenate([evals[1:], [last]]).astype(np.float32)
    return Schedule(sigmas=np.concatenate([evals, [0.0]]).astype(np.float32),
                    timesteps=timesteps.numpy().astype(np.float64), init_noise_sigma=(cfg.sigma_max ** 2 + 1) ** 0.5,
                    targets=targets, solver_orders=orders, solver_type=cfg.solver_type,
                    num_train_timesteps=cfg.num_train_timesteps, sigma_data=float(cfg.sigma_data))


def euler_schedule(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    # EDMEulerScheduler.set_timesteps: final_sigmas_type sigma_min ends on the last computed sigma
    last = float(edm_sigmas(cfg, n, torch.float64)[-1]) if cfg.final_sigmas_type == "sigma_min" else 0.0
    return _schedule(cfg, n, torch.float64, last)


def dpm_schedule(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    # EDMDPMSolverMultistepScheduler.step: the last step is first order (final_sigmas_type "zero" forces it); the one
    # before it too when lower_order_final and fewer than 15 steps (which caps it at 2 anyway)
    orders = tuple(1 if i == n - 1 else min(cfg.solver_order, 2) for i in range(n))
    return _schedule(cfg, n, torch.float32, 0.0, orders)


def _check(cfg: SchedulerConfig) -> None:
    check_no_thresholding(cfg)
    choice("sigma_schedule", cfg.sigma_schedule, ("karras", "exponential"))
    choice("prediction_type (EDM)", cfg.prediction_type, ("epsilon", "v_prediction"))
    if cfg.sigma_data is None or not cfg.sigma_data > 0:
        raise ScheduleError(f"sigma_data must be a positive number for EDM, not {cfg.sigma_data!r}")


def _check_dpm(cfg: SchedulerConfig) -> None:
    _check(cfg)
    choice("solver_order (EDM DPM-Solver)", cfg.solver_order, (1, 2))
    choice("solver_type", cfg.solver_type, ("midpoint", "heun"))
    choice("final_sigmas_type (EDM DPM-Solver)", cfg.final_sigmas_type, ("zero",))


def _check_euler(cfg: SchedulerConfig) -> None:
    _check(cfg)
    choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))


SPECS = (
    SamplerSpec("edm_dpmpp_2m", classic.dpmpp_2m, dpm_schedule, "EDMDPMSolverMultistepScheduler",
                {"algorithm_type": "dpmsolver++"}, _DEFAULTS, check=_check_dpm,
                description="DPM-Solver++(2M) for EDM models (Playground v2.5)"),
    SamplerSpec("edm_dpmpp_2m_sde", classic.dpmpp_2m_sde, dpm_schedule, "EDMDPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++"}, _DEFAULTS, stochastic=True,
                check=_check_dpm, description="SDE DPM-Solver++(2M) for EDM models, noise from the request's generators"),
    SamplerSpec("edm_euler", classic.euler, euler_schedule, "EDMEulerScheduler", class_defaults=_DEFAULTS, check=_check_euler, description="Euler for EDM models"),
)
