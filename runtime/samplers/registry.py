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
from dataclasses import replace
from types import MappingProxyType
from typing import Mapping

from sdrt.runtime.samplers import classic, discrete, edm, flow, multistep, stochastic
from sdrt.runtime.samplers.spec import SamplerSpec
from sdrt.runtime.samplers.schedules import (PREDICTION_TYPES, SIGMA_CONVERSIONS, SIGMA_SCHEDULES, Schedule,
    ScheduleError, SchedulerConfig, alphas_cumprod)


def _collect() -> dict[str, SamplerSpec]:
    registry: dict[str, SamplerSpec] = {}
    # the order `sdrt samplers` lists
    for spec in (*classic.SPECS, *multistep.SPECS, *discrete.SPECS, *stochastic.SPECS, *edm.SPECS,
                 *flow.SPECS):
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
    for spec in REGISTRY.values():
        for alias in spec.aliases:
            table.setdefault(_key(alias), (spec.name, None))
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


def make_schedule(cfg: SchedulerConfig, sampler: str, steps: int, schedule: str | bool = "default") -> Schedule:
    """`build_schedule`, also taking the older True/False form of `schedule` (karras/default)."""
    if isinstance(schedule, bool):
        schedule = "karras" if schedule else "default"
    return build_schedule(cfg, sampler, steps, schedule)


def max_steps(cfg: SchedulerConfig, sampler: str) -> int:
    """The most steps the sampler's schedule can take for this config (its training timesteps or fewer)."""
    spec = get(sampler)
    c = cfg.resolved(spec.class_defaults)
    return spec.step_limit(c) if spec.step_limit is not None else c.num_train_timesteps


# The default sampler for a model's scheduler class (its scheduler_config.json `_class_name`). Entries that share
# a class are told apart by their `from_config` overrides: an entry is out when the json sets one of its keys to
# another value; of the rest, the one with most of its keys present in the json wins, then registry order. A class
# (or setting) no entry reproduces is refused, never replaced by another sampler.
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
    if not candidates:
        same_class = [f"{k}={scheduler_config[k]!r}" for s in REGISTRY.values() if s.diffusers_class == class_name
                      for k in s.diffusers_config if k in scheduler_config]
        what = f"{class_name or 'an unnamed scheduler'}" + (f" with {', '.join(sorted(set(same_class)))}"
                                                             if same_class else "")
        raise ScheduleError(f"this model's scheduler ({what}) is not one sdrt reproduces, and sdrt does not silently "
                            f"run another; name a sampler (--sampler / \"sampler\") to choose one knowingly: "
                            f"{', '.join(NAMES)}")
    return min(candidates)[2]


def model_default(scheduler_config: Mapping) -> str | None:
    """The sampler a request without one runs on this model, or None where the model's scheduler is refused
    (for listings: /v1/models, sdrt info)."""
    try:
        return for_model(None, scheduler_config)
    except ScheduleError:
        return None


# Settings of diffusers' scheduler classes that change the result and that no sdrt sampler models, with the value
# that means "off" (diffusers 0.42's __init__ defaults). A model whose config sets one otherwise is refused for a
# sampler whose class would read it.
_UNMODELLED = {
    "UniPCMultistepScheduler": {"predict_x0": True, "disable_corrector": [], "solver_p": None, "shift_terminal": None},
    "DPMSolverSDEScheduler": {"noise_sampler_seed": None},
}


def for_model(requested: str | None, scheduler_config: Mapping) -> str:
    """The sampler a request runs on this model: the model's own when none is named (default_for); a named one in
    the model's formulation (an EDM model runs EDM samplers: `dpmpp_2m` becomes `edm_dpmpp_2m`). Raises
    ScheduleError for a sampler the model cannot run or a model setting the sampler would ignore."""
    name = default_for(scheduler_config) if requested is None else requested
    flow_names = [s.name for s in flow.SPECS]
    if scheduler_config.get("_class_name") in flow.FLOW_CLASSES:  # a flow-matching model runs flow samplers only
        name = flow.FLOW_FORM.get(name, name)
        if name not in flow_names:
            raise ScheduleError(f"this is a flow-matching model ({scheduler_config.get('_class_name')}); {name} "
                                f"samples a diffusion schedule. Choose one of {', '.join(flow_names)}")
    elif name in flow_names:
        raise ScheduleError(f"{name} is for flow-matching models (SD3, FLUX.1); this model's scheduler is "
                            f"{scheduler_config.get('_class_name') or 'not a flow-matching one'}")
    model_edm = scheduler_config.get("_class_name") in edm.EDM_CLASSES
    if model_edm and name not in (s.name for s in edm.SPECS):
        if name not in edm.EDM_FORM:
            raise ScheduleError(f"this model is EDM-trained ({scheduler_config.get('_class_name')}); {name} samples "
                                f"the discrete-time formulation. Choose one of {', '.join(s.name for s in edm.SPECS)} "
                                f"(or {', '.join(edm.EDM_FORM)}, which run as their EDM forms)")
        name = edm.EDM_FORM[name]
    if not model_edm and name in (s.name for s in edm.SPECS):
        raise ScheduleError(f"{name} is for EDM-trained models (EDMEulerScheduler / EDMDPMSolverMultistepScheduler); "
                            f"this model's scheduler is {scheduler_config.get('_class_name') or 'not EDM'}")
    spec = get(name)
    defaulted = set(scheduler_config.get("_use_default_values", ()))
    for key, off in _UNMODELLED.get(spec.diffusers_class, {}).items():
        if key not in defaulted and scheduler_config.get(key, off) != off:
            raise ScheduleError(f"this model's scheduler config sets {key}={scheduler_config[key]!r}, which "
                                f"{spec.diffusers_class} would apply and sdrt's {name} does not; choose another "
                                "sampler")
    return name
