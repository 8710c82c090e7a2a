"""The sampler registry (DESIGN.md §4a): one entry per sampler, and everything that looks samplers up.

An entry holds the sampler function (runtime/samplers*.py), its schedule builder, the diffusers scheduler class
and `from_config` overrides it equals (the parity tests build exactly that), the defaults of that class's
__init__ that differ from SchedulerConfig's, its AUTOMATIC1111 display names, whether it draws noise, and which
sigma schedules its diffusers class offers. Adding a sampler adds an entry (and its tests), nothing else.

AUTOMATIC1111 names (reference/customization.md §5, diffusers' scheduler overview): a display name such as
"DPM++ 2M Karras" is a sampler ("DPM++ 2M") plus a sigma schedule suffix (" Karras", " Exponential").
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from . import samplers as classic
from .schedules import (PREDICTION_TYPES, SIGMA_CONVERSIONS, SIGMA_SCHEDULES, Schedule, ScheduleError,
                        SchedulerConfig, alphas_cumprod, ddim, dpm_multistep, euler_family, lcm)

ScheduleBuilder = Callable[[SchedulerConfig, torch.Tensor, int], Schedule]  # (resolved cfg, abar [T], steps)
ConfigCheck = Callable[[SchedulerConfig], None]  # raises ScheduleError for a setting the sampler cannot run

_SD_BETAS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")  # most diffusers classes' defaults


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # sdrt's name (--sampler, JSON "sampler")
    run: classic.Sampler
    build: ScheduleBuilder
    diffusers_class: str
    diffusers_config: Mapping = field(default_factory=dict)  # from_config overrides that select this sampler
    class_defaults: Mapping = field(default_factory=dict)  # the class's __init__ defaults for absent config keys
    a1111: tuple[str, ...] = ()  # AUTOMATIC1111 display names without a schedule suffix
    stochastic: bool = False  # draws noise while sampling (per-image generators matter)
    conversions: tuple[str, ...] = ()  # sigma conversions its diffusers class offers (karras/exponential/beta)
    check: ConfigCheck | None = None
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "diffusers_config", _frozen(self.diffusers_config))
        object.__setattr__(self, "class_defaults", _frozen(self.class_defaults))


# ---- the classic samplers' checks ----------------------------------------------------------------------

def _choice(what: str, value, valid) -> None:
    if value not in valid:
        raise ScheduleError(f"{what} {value!r} is not supported; choose one of {', '.join(map(str, valid))}")


def _check_euler(cfg: SchedulerConfig) -> None:
    _choice("interpolation_type", cfg.interpolation_type, ("linear",))
    _choice("timestep_type", cfg.timestep_type, ("discrete", "continuous"))
    _choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))


def _check_euler_a(cfg: SchedulerConfig) -> None:
    if cfg.prediction_type == "sample":
        raise ScheduleError("euler_a does not support prediction_type 'sample' (diffusers neither); "
                            "choose euler, heun, dpmpp_2m, dpmpp_2m_sde, ddim or lcm")


def check_dpm(cfg: SchedulerConfig, orders=(1, 2)) -> None:
    _choice("solver_order", cfg.solver_order, orders)
    _choice("solver_type", cfg.solver_type, ("midpoint", "heun"))
    _choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
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


# ---- the registry ----------------------------------------------------------------------------------------

_CLASSIC = (
    SamplerSpec("euler", classic.euler, lambda c, a, n: euler_family(c, a, n, "euler"), "EulerDiscreteScheduler",
                class_defaults={**_SD_BETAS, "timestep_spacing": "linspace"}, a1111=("Euler",),
                conversions=SIGMA_CONVERSIONS, check=_check_euler, description="Euler (Karras et al. 2022, Alg. 2)"),
    SamplerSpec("euler_a", classic.euler_ancestral, lambda c, a, n: euler_family(c, a, n, "euler_a"),
                "EulerAncestralDiscreteScheduler", class_defaults={**_SD_BETAS, "timestep_spacing": "linspace"},
                a1111=("Euler a", "Euler Ancestral"), stochastic=True, check=_check_euler_a,
                description="Euler ancestral"),
    SamplerSpec("heun", classic.heun, lambda c, a, n: euler_family(c, a, n, "heun"), "HeunDiscreteScheduler",
                class_defaults=dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                    timestep_spacing="linspace", clip_sample=False),
                a1111=("Heun",), conversions=SIGMA_CONVERSIONS, description="Heun (2 evaluations per step)"),
    SamplerSpec("dpmpp_2m", classic.dpmpp_2m, dpm_multistep, "DPMSolverMultistepScheduler",
                {"algorithm_type": "dpmsolver++"}, {**_SD_BETAS, "timestep_spacing": "linspace"},
                a1111=("DPM++ 2M",), conversions=SIGMA_CONVERSIONS, check=check_dpm,
                description="DPM-Solver++(2M)"),
    SamplerSpec("dpmpp_2m_sde", classic.dpmpp_2m_sde, dpm_multistep, "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++"}, {**_SD_BETAS, "timestep_spacing": "linspace"},
                a1111=("DPM++ 2M SDE",), stochastic=True, conversions=SIGMA_CONVERSIONS, check=check_dpm,
                description="SDE DPM-Solver++(2M), noise from the request's generators"),
    SamplerSpec("ddim", classic.ddim, ddim, "DDIMScheduler",
                class_defaults={**_SD_BETAS, "timestep_spacing": "leading", "set_alpha_to_one": True,
                                "clip_sample": True},
                a1111=("DDIM",), check=check_finite_first_sigma("ddim"), description="DDIM, eta 0"),
    SamplerSpec("lcm", classic.lcm, lcm, "LCMScheduler",
                class_defaults=dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False),
                a1111=("LCM",), stochastic=True, check=check_finite_first_sigma("lcm"),
                description="latent consistency models"),
)

# Modules that add samplers: each defines SPECS, a tuple of SamplerSpec. Order here is the order listed.
_MODULES: tuple[str, ...] = ("samplers_multistep", "samplers_discrete")


def _collect() -> dict[str, SamplerSpec]:
    import importlib

    specs = list(_CLASSIC)
    for module in _MODULES:
        specs.extend(importlib.import_module(f"{__package__}.{module}").SPECS)
    registry: dict[str, SamplerSpec] = {}
    for spec in specs:
        if spec.name in registry:
            raise RuntimeError(f"two samplers are registered as {spec.name!r}")
        registry[spec.name] = spec
    return registry


REGISTRY: Mapping[str, SamplerSpec] = MappingProxyType(_collect())
NAMES: tuple[str, ...] = tuple(REGISTRY)


def get(name: str) -> SamplerSpec:
    """The entry registered under sdrt's `name` (use `resolve` for user input)."""
    if name not in REGISTRY:
        raise ScheduleError(f"unknown sampler {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def get_sampler(name: str) -> classic.Sampler:
    return get(name).run


# ---- names users type ------------------------------------------------------------------------------------

_SUFFIXES = {"karras": "karras", "exponential": "exponential"}


def _key(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


def display_names(spec: SamplerSpec) -> tuple[str, ...]:
    """Every AUTOMATIC1111 name that selects this sampler: its names, and each with a schedule suffix."""
    out = list(spec.a1111)
    for base in spec.a1111:
        out += [f"{base} {suffix.capitalize()}" for suffix in _SUFFIXES if suffix in spec.conversions]
    return tuple(out)


def _lookup() -> dict[str, tuple[str, str | None]]:
    table: dict[str, tuple[str, str | None]] = {}
    for spec in REGISTRY.values():
        table[_key(spec.name)] = (spec.name, None)
        for base in spec.a1111:
            table.setdefault(_key(base), (spec.name, None))
            for suffix, schedule in _SUFFIXES.items():
                if schedule in spec.conversions:
                    table.setdefault(_key(f"{base} {suffix}"), (spec.name, schedule))
    for alias, target in (("plms", "pndm"), ("unipc", "unipc"), ("k_euler", "euler"), ("k_euler_a", "euler_a"),
                          ("k_lms", "lms"), ("k_dpm_2", "kdpm2"), ("k_dpm_2_a", "kdpm2_a")):
        if target in REGISTRY:
            table.setdefault(_key(alias), (target, None))
    return table


_NAMES_TYPED = _lookup()


def resolve(text: str) -> tuple[str, str | None]:
    """A name a user typed (sdrt's or AUTOMATIC1111's, any case) → (sampler, schedule it implies or None).

    Unknown names raise a ScheduleError that lists the choices and suggests the closest one.
    """
    key = _key(text)
    if key in _NAMES_TYPED:
        return _NAMES_TYPED[key]
    close = difflib.get_close_matches(key, list(_NAMES_TYPED), n=1, cutoff=0.5)
    hint = f"; did you mean {_canonical_text(close[0])!r}?" if close else ""
    raise ScheduleError(f"unknown sampler {text!r}{hint} Choose one of {', '.join(REGISTRY)} or an AUTOMATIC1111 "
                        "name such as 'Euler a' or 'DPM++ 2M Karras' (`sdrt samplers` lists them)")


def _canonical_text(key: str) -> str:
    name, schedule = _NAMES_TYPED[key]
    for display in display_names(REGISTRY[name]) + (name,):
        if _key(display) == key:
            return display
    return name if schedule is None else f"{name} ({schedule})"


# ---- schedules -------------------------------------------------------------------------------------------

def build_schedule(cfg: SchedulerConfig, sampler: str, steps: int, schedule: str = "default") -> Schedule:
    """The schedule `sampler`'s diffusers class builds with set_timesteps(steps), under a request's `schedule`."""
    spec = get(sampler)
    if schedule not in SIGMA_SCHEDULES:
        raise ScheduleError(f"schedule {schedule!r} is not supported; choose one of {', '.join(SIGMA_SCHEDULES)}")
    if steps < 1:
        raise ScheduleError(f"steps must be at least 1 (got {steps})")
    if schedule in SIGMA_CONVERSIONS and schedule not in spec.conversions:
        offered = f"it offers {', '.join(spec.conversions)}" if spec.conversions else "it offers none"
        with_it = [s.name for s in REGISTRY.values() if schedule in s.conversions]
        raise ScheduleError(f"{schedule} sigmas are not available for {sampler} ({offered}); "
                            f"they are for {', '.join(with_it)}")
    c = cfg.resolved(spec.class_defaults)
    if not spec.conversions:  # the class has no use_*_sigmas: diffusers ignores those keys in its config
        c = replace(c, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
    c = c.with_sigma_schedule(schedule)
    kind = c.sigma_conversion
    if kind is not None and kind not in spec.conversions:
        raise ScheduleError(f"{kind} sigmas are not available for {sampler}")
    if c.prediction_type not in PREDICTION_TYPES:
        raise ScheduleError(f"prediction_type {c.prediction_type!r} is not supported")
    if spec.check is not None:
        spec.check(c)
    return spec.build(c, alphas_cumprod(c, sampler), steps)


def max_steps(cfg: SchedulerConfig, sampler: str) -> int:
    """The most steps the sampler's schedule can take for this config (its training timesteps or fewer)."""
    spec = get(sampler)
    c = cfg.resolved(spec.class_defaults)
    if sampler in ("lcm", "tcd"):
        return min(c.original_inference_steps, c.num_train_timesteps)
    return c.num_train_timesteps


# The default sampler for a model's scheduler class (its scheduler_config.json `_class_name`). Entries that share
# a class are told apart by their `from_config` overrides: an entry is out when the json sets one of its keys to
# another value; of the rest, the one with most of its keys present in the json wins, then registry order.
def default_for(scheduler_config: Mapping) -> str:
    class_name = scheduler_config.get("_class_name", "")
    candidates = []
    for order, spec in enumerate(REGISTRY.values()):
        if spec.diffusers_class != class_name:
            continue
        items = spec.diffusers_config.items()
        if any(k in scheduler_config and scheduler_config[k] != v for k, v in items):
            continue
        candidates.append((-sum(k in scheduler_config for k, _ in items), order, spec.name))
    return min(candidates)[2] if candidates else "euler"
