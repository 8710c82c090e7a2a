"""Flow-matching samplers (SD3/3.5, FLUX.1): diffusers' FlowMatchEulerDiscreteScheduler (0.42, schedulers/
scheduling_flow_match_euler_discrete.py; reference/flow_models.md §3), FlowMatchHeunDiscreteScheduler, and
DPMSolverMultistep / UniPCMultistep on flow sigmas (runtime/samplers/flow_multistep.py). SPECS holds every flow entry.

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
from dataclasses import replace
from typing import Mapping

import numpy as np
import torch

from sdrt.runtime.samplers import classic, flow_multistep
from sdrt.runtime.samplers.schedules import Schedule, ScheduleError, SchedulerConfig
from sdrt.runtime.samplers.spec import SD_BETAS, SamplerSpec, choice

FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
# a sampler named for a flow model runs as its flow form (Forge and ComfyUI call flow-match Euler "Euler"; an
# AUTOMATIC1111/Forge "Heun", "DPM++ 2M" or "UniPC" resolves to heun/dpmpp_2m/unipc, run here on flow sigmas)
FLOW_FORM = {"euler": "flow_euler", "heun": "flow_heun", "dpmpp_2m": "flow_dpmpp_2m", "unipc": "flow_unipc"}
# diffusers classes that take the shift as `flow_shift` (with use_flow_sigmas) rather than `shift`
_FLOW_SHIFT_CLASSES = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


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


def heun_schedule(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    """FlowMatchHeunDiscreteScheduler.set_timesteps(n): Euler's static sigmas (the last one shifted twice; the class
    has no shift_terminal), every one after the first evaluated twice (predictor, corrector) like HeunDiscrete."""
    evals = flow_sigmas(replace(cfg, shift_terminal=None), n).numpy()
    t = evals * np.float32(cfg.num_train_timesteps)
    sigmas = np.concatenate([evals[:1], np.repeat(evals[1:], 2), [0.0]]).astype(np.float32)
    return Schedule(sigmas=sigmas, timesteps=np.concatenate([t[:1], np.repeat(t[1:], 2)]).astype(np.float64),
                    init_noise_sigma=1.0, targets=sigmas[1:].copy(), order=2,
                    num_train_timesteps=cfg.num_train_timesteps, flow=True)


def reference_config(spec: SamplerSpec, scheduler_config: Mapping) -> dict:
    """The from_config overrides that build the diffusers scheduler a flow entry equals from the model's config:
    the entry's own, plus `flow_shift` = the model's `shift` for the multistep classes (their key for it; diffusers'
    from_config would otherwise leave it at 1.0). sdrt's schedule builders read that shift from SchedulerConfig.shift."""
    out = dict(spec.diffusers_config)
    if spec.diffusers_class in _FLOW_SHIFT_CLASSES:
        out["flow_shift"] = float(scheduler_config.get("shift", 1.0))
    return out


def _check(cfg: SchedulerConfig) -> None:
    choice("time_shift_type", cfg.time_shift_type, ("exponential", "linear"))
    for key in ("invert_sigmas", "stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas"):
        if getattr(cfg, key):
            raise ScheduleError(f"{key} is not supported for flow matching; set it to false")


def _flow_sigmas_scheduler(name: str, cls: str):
    """FlowMatchHeun's set_timesteps takes no sigmas, so FLUX.1's pipeline cannot run it; sdrt runs it as
    StableDiffusion3Pipeline does: set_timesteps(N), static shift. DPMSolverMultistep and UniPCMultistep with
    use_flow_sigmas get no sigmas from FluxPipeline (it drops them for such schedulers) and take its mu: they run on
    FLUX.1 too (flow_multistep.py); DPM-Solver asserts dynamic shifting when given mu, so it runs on FLUX.1-dev-like
    configs only, and its dynamic shift needs the exponential time shift."""
    def check(cfg: SchedulerConfig) -> None:
        _check(cfg)
        if name == "flow_heun":
            if cfg.pipeline_sigmas or cfg.use_dynamic_shifting:
                raise ScheduleError(f"{name} ({cls}) runs the static shift of SD3/3.5; this model's pipeline passes "
                                    "its own sigmas or a dynamic shift (FLUX.1), which that scheduler does not take; "
                                    "use flow_euler, flow_dpmpp_2m or flow_unipc")
            return
        if cfg.thresholding:
            raise ScheduleError("dynamic thresholding is not supported; set thresholding to false")
        choice("solver_order", cfg.solver_order, (1, 2) if name == "flow_dpmpp_2m" else (1, 2, 3))
        choice("final_sigmas_type", cfg.final_sigmas_type, ("zero",))
        if name == "flow_dpmpp_2m":
            choice("solver_type", cfg.solver_type, ("midpoint", "heun"))
            if cfg.pipeline_sigmas and not cfg.use_dynamic_shifting:  # FluxPipeline passes mu, which DPM asserts on
                raise ScheduleError("flow_dpmpp_2m (DPMSolverMultistepScheduler) cannot run on this FLUX.1 model: its "
                                    "pipeline passes mu, which that scheduler takes only with dynamic shifting (the "
                                    "model's config has it off), so diffusers stops; use flow_euler or flow_unipc")
            if cfg.use_dynamic_shifting and cfg.time_shift_type != "exponential":
                raise ScheduleError("DPM-Solver's dynamic shift is exponential only; set time_shift_type to "
                                    "exponential")
        elif not cfg.lower_order_final and cfg.solver_order > 1:
            raise ScheduleError("UniPC with lower_order_final false steps to sigma 0 with a multistep update, which "
                                "diverges; set lower_order_final true")
    return check


_FLOW_PREDICTION = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}


SPECS = (
    SamplerSpec("flow_euler", classic.euler, euler_schedule, "FlowMatchEulerDiscreteScheduler",
                class_defaults=SD_BETAS,
                check=_check,
                description="flow-match Euler (SD3/3.5, FLUX.1): static or dynamic (mu) shift"),
    SamplerSpec("flow_heun", classic.heun, heun_schedule, "FlowMatchHeunDiscreteScheduler", class_defaults=SD_BETAS,
                check=_flow_sigmas_scheduler("flow_heun", "FlowMatchHeunDiscreteScheduler"),
                description="flow-match Heun (SD3/3.5; 2 evaluations per step)"),
    SamplerSpec("flow_dpmpp_2m", flow_multistep.dpmpp_2m, flow_multistep.dpm_schedule, "DPMSolverMultistepScheduler",
                {"algorithm_type": "dpmsolver++", **_FLOW_PREDICTION}, SD_BETAS,
                check=_flow_sigmas_scheduler("flow_dpmpp_2m", "DPMSolverMultistepScheduler"),
                description="DPM-Solver++(2M) on flow sigmas (SD3/3.5, FLUX.1), flow_shift = the model's shift "
                            "(FLUX.1-dev: e^mu)"),
    SamplerSpec("flow_unipc", flow_multistep.unipc, flow_multistep.unipc_schedule, "UniPCMultistepScheduler",
                {"solver_type": "bh2", **_FLOW_PREDICTION}, SD_BETAS,
                check=_flow_sigmas_scheduler("flow_unipc", "UniPCMultistepScheduler"),
                description="UniPC (bh2) on flow sigmas (SD3/3.5, FLUX.1), flow_shift = the model's shift "
                            "(FLUX.1-dev: the time shift at mu)"),
)
