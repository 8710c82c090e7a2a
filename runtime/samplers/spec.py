"""A sampler's registry entry (DESIGN.md §4a): every fact about one sampler, and the config checks entries share.

The entries themselves live beside their functions (runtime/samplers/classic.py, multistep.py, discrete.py, each
a `SPECS` tuple); runtime/samplers/registry.py collects them and answers every look-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

import torch

from sdrt.runtime.samplers.schedules import Schedule, ScheduleError, SchedulerConfig

# (denoise(x, sigma) -> x0, initial latents, schedule, per-image generators) -> the latent after each step
Sampler = Callable[..., Iterator[torch.Tensor]]
ScheduleBuilder = Callable[[SchedulerConfig, torch.Tensor, int], Schedule]  # (resolved cfg, abar [T], steps)
ConfigCheck = Callable[[SchedulerConfig], None]  # raises ScheduleError for a setting the sampler cannot run

SD_BETAS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")  # most diffusers classes' defaults


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # sdrt's name (--sampler, JSON "sampler")
    run: Sampler
    build: ScheduleBuilder
    diffusers_class: str
    diffusers_config: Mapping = field(default_factory=dict)  # from_config overrides that select this sampler
    class_defaults: Mapping = field(default_factory=dict)  # the class's __init__ defaults for absent config keys
    a1111: tuple[str, ...] = ()  # AUTOMATIC1111 display names without a schedule suffix
    stochastic: bool = False  # draws noise while sampling (per-image generators matter)
    conversions: tuple[str, ...] = ()  # sigma conversions its diffusers class offers (karras/exponential/beta)
    check: ConfigCheck | None = None
    description: str = ""
    aliases: tuple[str, ...] = ()  # older names that still select it (k-diffusion's k_*, PLMS)
    step_limit: Callable[[SchedulerConfig], int] | None = None  # most steps on a resolved config; None: its T
    # eta values an AUTOMATIC1111 client may send: None = any (eta changes nothing here); derived when not given:
    # (1.0,) for samplers that draw noise or that AUTOMATIC1111 names ancestral ("… a"), as sdrt runs them at eta 1
    eta: tuple[float, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "diffusers_config", _frozen(self.diffusers_config))
        object.__setattr__(self, "class_defaults", _frozen(self.class_defaults))
        if self.eta is None and (self.stochastic or any(n.endswith(" a") for n in self.a1111)):
            object.__setattr__(self, "eta", (1.0,))

    def accepts_eta(self, value: float) -> bool:
        return self.eta is None or value in self.eta


def original_steps_limit(cfg: SchedulerConfig) -> int:
    """lcm and tcd sample from `original_inference_steps` distilled timesteps (diffusers' LCMScheduler/TCDScheduler)."""
    return min(cfg.original_inference_steps, cfg.num_train_timesteps)


# ---- the classic samplers' checks ----------------------------------------------------------------------

def choice(what: str, value, valid) -> None:
    if value not in valid:
        raise ScheduleError(f"{what} {value!r} is not supported; choose one of {', '.join(map(str, valid))}")


def check_dpm(cfg: SchedulerConfig, orders=(1, 2)) -> None:
    choice("solver_order", cfg.solver_order, orders)
    choice("solver_type", cfg.solver_type, ("midpoint", "heun"))
    choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
    if cfg.variance_type in ("learned", "learned_range"):
        raise ScheduleError("learned-variance UNets (6 output channels) are not supported; "
                            "sdrt runs UNets that predict epsilon, v or the sample")
    if cfg.use_lu_lambdas or cfg.use_flow_sigmas or cfg.use_dynamic_shifting:
        raise ScheduleError("DPM-Solver lu-lambdas, flow sigmas and dynamic shifting are not supported; "
                            "use karras sigmas or the default sigmas")
    check_no_thresholding(cfg)


def check_no_thresholding(cfg: SchedulerConfig) -> None:
    if cfg.thresholding:
        raise ScheduleError("dynamic thresholding is not supported; set thresholding to false (clip_sample works)")


def check_finite_first_sigma(name: str) -> ConfigCheck:
    def check(cfg: SchedulerConfig) -> None:
        check_no_thresholding(cfg)
        if cfg.rescale_betas_zero_snr:
            raise ScheduleError(f"rescale_betas_zero_snr puts the first {name} sigma at infinity; "
                                "use euler, euler_a or dpmpp_2m with it")
    return check


