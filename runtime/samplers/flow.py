"""Flow-matching samplers (SD3/3.5, FLUX.1): diffusers' FlowMatchEulerDiscreteScheduler (0.42, schedulers/
scheduling_flow_match_euler_discrete.py; reference/flow_models.md §3).

Flow matching: x = (1 - s)·x0 + s·noise, the model predicts the velocity v = noise - x0, Euler steps
x ← x + (s' - s)·v. The latent stays in flow space: the Schedule's `flow` flag makes the denoiser
(runtime/denoiser/x0.py) feed the model the latent itself at timestep s·T and return x0 = x - s·v, so sdrt's Euler
(d = (x - x0)/s = v, x + d·(s' - s)) is diffusers' step up to float32 rounding of x0. The start is the noise itself
(s = 1, init_noise_sigma 1).

The sigmas, as diffusers builds them (dtypes included):
- static shift (SD3: the pipeline passes no sigmas): linspace(s_max·T, s_min·T, N) / T with s_max, s_min the
  training table's ends after one shift, then shifted again — so the last sigma is shifted twice (shift 3, 5 steps:
  0.00893 where one shift gives 0.00299), as diffusers does;
- dynamic shift (Flux: the pipeline passes linspace(1, 1/N, N) and mu from the packed sequence length, a line through
  (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)): s' = e^mu / (e^mu + (1/s - 1));
  `pipeline_sigmas` without dynamic shifting (FLUX.1-schnell) shifts those linspace sigmas by the static shift.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sdrt.runtime.samplers import classic
from sdrt.runtime.samplers.schedules import Schedule, ScheduleError, SchedulerConfig
from sdrt.runtime.samplers.spec import SamplerSpec, choice

FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler",)
# a sampler named for a flow model runs as its flow form (Forge and ComfyUI call flow-match Euler "Euler")
FLOW_FORM = {"euler": "flow_euler"}


def image_seq_mu(cfg: SchedulerConfig, seq_len: int) -> float:
    """diffusers' calculate_shift (pipeline_flux.py): mu at the packed image sequence length (h/2)·(w/2)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)


def _shifted(cfg: SchedulerConfig, s):
    return cfg.shift * s / (1 + (cfg.shift - 1) * s)


def flow_sigmas(cfg: SchedulerConfig, n: int) -> torch.Tensor:
    """The n evaluation sigmas (float32), from 1 (or near it) down, before the closing 0."""
    t_count = cfg.num_train_timesteps
    if cfg.pipeline_sigmas or cfg.use_dynamic_shifting:
        s = np.linspace(1.0, 1 / n, n).astype(np.float32)  # what the Flux pipeline passes
    else:  # set_timesteps without sigmas: between the (once-shifted) training ends
        train = torch.from_numpy(np.linspace(1, t_count, t_count, dtype=np.float32)[::-1].copy()) / t_count
        train = _shifted(cfg, train)
        s = np.linspace(train[0].item() * t_count, train[-1].item() * t_count, n) / t_count
    if cfg.use_dynamic_shifting:
        if cfg.mu is None:
            raise ScheduleError("dynamic shifting needs mu (the image's packed sequence length decides it)")
        s = math.exp(cfg.mu) / (math.exp(cfg.mu) + (1 / s - 1) ** 1.0) if cfg.time_shift_type == "exponential" \
            else cfg.mu / (cfg.mu + (1 / s - 1) ** 1.0)
    else:
        s = _shifted(cfg, s)
    if cfg.shift_terminal:  # stretch_shift_to_terminal
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    return torch.from_numpy(np.asarray(s)).to(torch.float32)


def euler_schedule(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    sigmas = flow_sigmas(cfg, n)
    evals = sigmas.numpy()
    return Schedule(sigmas=np.concatenate([evals, [0.0]]).astype(np.float32),
                    timesteps=(sigmas * cfg.num_train_timesteps).numpy().astype(np.float64), init_noise_sigma=1.0,
                    targets=np.concatenate([evals[1:], [0.0]]).astype(np.float32),
                    num_train_timesteps=cfg.num_train_timesteps, flow=True)


def _check(cfg: SchedulerConfig) -> None:
    choice("time_shift_type", cfg.time_shift_type, ("exponential", "linear"))
    for key in ("invert_sigmas", "stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas"):
        if getattr(cfg, key):
            raise ScheduleError(f"{key} is not supported for flow matching; set it to false")


SPECS = (
    SamplerSpec("flow_euler", classic.euler, euler_schedule, "FlowMatchEulerDiscreteScheduler",
                class_defaults={"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"},
                check=_check,
                description="flow-match Euler (SD3/3.5, FLUX.1): static or dynamic (mu) shift"),
)
