"""Multistep solvers on flow-matching sigmas (SD3/3.5, FLUX.1): diffusers 0.42's DPMSolverMultistepScheduler and
UniPCMultistepScheduler with use_flow_sigmas=True, prediction_type="flow_prediction" (schedulers/
scheduling_dpmsolver_multistep.py, scheduling_unipc_multistep.py; reference/flow_models.md §3).

With flow sigmas those classes take alpha_t = 1 - s and sigma_t = s (their `_sigma_to_alpha_sigma_t`), not the
variance-preserving pair, and convert the velocity to x0 = x - s·v, which is what the denoiser returns for a
`flow` Schedule (runtime/denoiser/x0.py). The latent is diffusers' own (flow space, fed unscaled), so the updates
below are diffusers' formulas on it, with its float32 0-d tensor scalars. The entries are in flow.py's SPECS.

Their sigmas (set_timesteps(N), as StableDiffusion3Pipeline calls it; `flow_shift` is the model config's `shift`):
- DPM-Solver: a = linspace(1, 1/T, N + 1), s = shift(1 - a) flipped, the closing 0 dropped — it starts at
  shift(1 - 1/T) (0.99967 for shift 3), not 1;
- UniPC: linspace(1, 1/T, N + 1)[:-1] shifted, the first (1) lowered by 1e-6;
both then float32 with a closing 0, and timesteps int64(s·T) from the float64 sigmas (truncated).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from sdrt.runtime.samplers.multistep import _unipc_rho_terms
from sdrt.runtime.samplers.schedules import Schedule, ScheduleError, SchedulerConfig


def _shift(cfg: SchedulerConfig, s: np.ndarray, shift: float | None = None) -> np.ndarray:
    shift = cfg.shift if shift is None else shift
    return shift * s / (1 + (shift - 1) * s)  # float64, as set_timesteps computes it


def _mu(cfg: SchedulerConfig) -> float:
    if cfg.mu is None:
        raise ScheduleError("dynamic shifting needs mu (the image's packed sequence length decides it)")
    return cfg.mu


def _schedule(sig: np.ndarray, cfg: SchedulerConfig, orders, solver: str, solver_type: str) -> Schedule:
    t = (sig * cfg.num_train_timesteps).astype(np.int64)  # torch .to(int64) truncates like numpy
    full = np.concatenate([sig, [0.0]]).astype(np.float32)
    return Schedule(sigmas=full, timesteps=t.astype(np.float64), init_noise_sigma=1.0, targets=full[1:].copy(),
                    solver_orders=tuple(orders), solver_type=solver_type, num_train_timesteps=cfg.num_train_timesteps,
                    flow=True, extra={"solver": solver})


def dpm_schedule(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    """DPMSolverMultistepScheduler.set_timesteps with use_flow_sigmas; step orders as its step() picks them
    (first order on the first step and on the step to 0 (final_sigmas_type "zero"), else solver_order). With
    dynamic shifting (FLUX.1-dev: FluxPipeline passes mu, no sigmas, to a use_flow_sigmas scheduler) flow_shift is
    e^mu."""
    shift = float(np.exp(_mu(cfg))) if cfg.use_dynamic_shifting else None
    alphas = np.linspace(1, 1 / cfg.num_train_timesteps, n + 1)
    sig = np.flip(_shift(cfg, 1.0 - alphas, shift))[:-1].copy()
    orders = [1 if i in (0, n - 1) else cfg.solver_order for i in range(n)]
    return _schedule(sig, cfg, orders, "flow_dpm", cfg.solver_type)


def unipc_schedule(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    """UniPCMultistepScheduler.set_timesteps with use_flow_sigmas (no sigmas passed: FluxPipeline drops its own
    for such a scheduler); with dynamic shifting its time_shift at mu (FLUX.1-dev), else the static flow_shift."""
    base = np.linspace(1, 1 / cfg.num_train_timesteps, n + 1)[:-1]
    if cfg.use_dynamic_shifting:
        mu = _mu(cfg)
        sig = np.exp(mu) / (np.exp(mu) + (1 / base - 1)) if cfg.time_shift_type == "exponential" \
            else mu / (mu + (1 / base - 1))
    else:
        sig = _shift(cfg, base)
    if np.fabs(sig[0] - 1) < 1e-6:  # diffusers: keeps log(alpha) finite on the first steps
        sig[0] -= 1e-6
    orders = [min(cfg.solver_order, n - i) if cfg.lower_order_final else cfg.solver_order for i in range(n)]
    return _schedule(sig, cfg, orders, "flow_unipc", "bh2")


class _Scalars:
    """sigma, alpha = 1 - sigma, sigma_t = sigma and lambda = log(alpha) - log(sigma_t) of every sigma the scheduler
    steps through (the evaluation sigmas, then the last target), float32 0-d tensors as diffusers computes them."""

    def __init__(self, schedule: Schedule):
        n = len(schedule.timesteps)
        sigmas = np.concatenate([schedule.sigmas[:n], schedule.targets[-1:]]).astype(np.float32)
        self.sigma_t = [torch.tensor(float(v), dtype=torch.float32) for v in sigmas]
        self.alpha = [1 - s for s in self.sigma_t]
        self.lam = [torch.log(a) - torch.log(s) for a, s in zip(self.alpha, self.sigma_t)]


def _needs(schedule: Schedule, solver: str) -> None:
    if not schedule.flow or schedule.extra.get("solver") != solver or not schedule.solver_orders:
        raise ScheduleError(f"this schedule was not made for the {solver} sampler; build it with make_schedule(...) "
                            "for that sampler")


def dpmpp_2m(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", use_flow_sigmas=True) (dpm_solver_first_order_update,
    multistep_dpm_solver_second_order_update, midpoint or heun)."""
    _needs(schedule, "flow_dpm")
    sc = _Scalars(schedule)
    x = x.float()
    prev_x0 = None
    for i in range(len(schedule.timesteps)):
        x0 = denoise(x, float(schedule.sigmas[i]))
        alpha_t, sigma_t, sigma_s = sc.alpha[i + 1], sc.sigma_t[i + 1], sc.sigma_t[i]
        h = sc.lam[i + 1] - sc.lam[i]
        if schedule.solver_orders[i] == 1 or prev_x0 is None:
            x = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            r0 = (sc.lam[i] - sc.lam[i - 1]) / h
            d1 = (1.0 / r0) * (x0 - prev_x0)
            x = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
            if schedule.solver_type == "midpoint":
                x = x - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            else:
                x = x + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        prev_x0 = x0
        sent = yield x
        if sent is not None:
            x = sent.float()


def unipc(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """UniPCMultistepScheduler(solver_type="bh2", use_flow_sigmas=True), predict_x0: the UniC corrector re-integrates
    the previous step with the new model output (the model is not re-run), then the UniP predictor steps on."""
    _needs(schedule, "flow_unipc")
    sc = _Scalars(schedule)
    variant = schedule.solver_type
    outs: list[torch.Tensor] = []
    last, last_order = None, 0
    x = x.float()
    for i in range(len(schedule.timesteps)):
        x0 = denoise(x, float(schedule.sigmas[i]))
        sample = x
        if i > 0 and last is not None:  # multistep_uni_c_bh_update
            m0 = outs[-1]
            h_phi_1, b_h, rhos, d1s = _unipc_rho_terms(sc, i, i - 1, [i - (k + 1) for k in range(1, last_order)],
                                                       outs, m0, last_order, variant, corrector=True)
            x_t_ = sc.sigma_t[i] / sc.sigma_t[i - 1] * last - sc.alpha[i] * h_phi_1 * m0
            corr = rhos[-1] * (x0 - m0)
            if d1s is not None:
                corr = torch.einsum("k,bkc...->bc...", rhos[:-1], d1s) + corr
            sample = x_t_ - sc.alpha[i] * b_h * corr
        outs.append(x0)
        del outs[:-3]
        last_order = min(schedule.solver_orders[i], i + 1)  # lower_order_final cap, then the warm-up
        last = sample
        m0 = outs[-1]  # multistep_uni_p_bh_update
        h_phi_1, b_h, rhos, d1s = _unipc_rho_terms(sc, i + 1, i, [i - k for k in range(1, last_order)], outs, m0,
                                                   last_order, variant, corrector=False)
        x = sc.sigma_t[i + 1] / sc.sigma_t[i] * sample - sc.alpha[i + 1] * h_phi_1 * m0
        if d1s is not None:
            x = x - sc.alpha[i + 1] * b_h * torch.einsum("k,bkc...->bc...", rhos, d1s)
        sent = yield x
        if sent is not None:
            x = sent.float()
