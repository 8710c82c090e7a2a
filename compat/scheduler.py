"""`pipe.scheduler` of sdrt.compat: the model's scheduler config, and a diffusers scheduler → the equal sdrt sampler.

`pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)` is read
here by class name and config alone (diffusers is never imported): the registry entry whose `diffusers_class` is that
name and whose `diffusers_config` the config satisfies (the most specific when several do), its sigma conversion
(`use_*_sigmas`) as the request's schedule, `timestep_spacing` and `prediction_type` as the request's overrides.
Any other key the caller changed from the model's own config has no request field and is refused, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from sdrt.runtime.samplers import registry
from sdrt.runtime.samplers.schedules import input_scale

# diffusers' classes that step in alpha space (init_noise_sigma 1: x_a = x / sqrt(1 + sigma^2)); the others keep
# sigma-space latents as sdrt does (scheduling_*.py in diffusers 0.42)
ALPHA_SPACE = frozenset({"DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                         "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                         "LCMScheduler", "TCDScheduler"})
_CONVERSIONS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}
_OVERRIDES = ("timestep_spacing", "prediction_type")


class FrozenConfig(dict):
    """A scheduler config as diffusers' FrozenDict reads: a dict with attribute access, not to be changed."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _refuse(self, *args, **kwargs):
        raise TypeError("a scheduler config is frozen; make a new one with SchedulerClass.from_config(config, key=...)")

    __setitem__ = __delitem__ = update = pop = setdefault = clear = _refuse


@dataclass(frozen=True)
class SchedulerView:
    """What `pipe.scheduler` holds: the diffusers class name and config, and the sdrt sampler they select."""

    class_name: str
    config: Mapping = field(default_factory=dict)
    sampler: str | None = None  # a registry name; None: the model's default (registry.for_model)
    schedule: str | None = None  # karras | exponential | beta; None: as the config says
    timestep_spacing: str | None = None
    prediction_type: str | None = None

    @property
    def alpha_space(self) -> bool:
        return self.class_name in ALPHA_SPACE

    def to_diffusers_latents(self, x, next_sigma: float):
        """sdrt's sigma-space latent after a step → the latent diffusers' loop holds there (what callbacks see)."""
        return x / input_scale(next_sigma) if self.alpha_space else x

    def from_diffusers_latents(self, latents, next_sigma: float):
        return latents * input_scale(next_sigma) if self.alpha_space else latents

    def __repr__(self) -> str:
        return f"{self.class_name} (sdrt sampler {self.sampler or registry.model_default(self.config) or 'none: it is refused'})"


def model_view(model_config: Mapping) -> SchedulerView:
    """The scheduler the engine directory was exported with (its scheduler_config.json)."""
    return SchedulerView(model_config.get("_class_name", ""), FrozenConfig(model_config))


def _equal(a, b) -> bool:
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    return norm(a) == norm(b)


def select(scheduler, model_config: Mapping) -> SchedulerView:
    """A diffusers scheduler object (or a SchedulerView) → the view selecting its equal sdrt sampler; ValueError
    naming the scheduler when sdrt has no equal."""
    if isinstance(scheduler, SchedulerView):
        return scheduler
    class_name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(f"scheduler: expected a diffusers scheduler (an object with a .config), not {class_name}")
    matches = [s for s in registry.REGISTRY.values() if s.diffusers_class == class_name
               and all(_equal(config.get(k), v) for k, v in s.diffusers_config.items())]
    if not matches:
        same_class = [f"{s.name} ({dict(s.diffusers_config)})" for s in registry.REGISTRY.values()
                      if s.diffusers_class == class_name]
        classes = sorted({s.diffusers_class for s in registry.REGISTRY.values()})
        offered = (f"sdrt runs {class_name} only as {', '.join(same_class)}" if same_class else
                   f"sdrt's samplers equal {', '.join(classes)}")
        raise ValueError(f"scheduler: {class_name} with this config has no equal sdrt sampler; {offered}")
    spec = max(matches, key=lambda s: len(s.diffusers_config))  # the most specific entry
    defaulted = set(config.get("_use_default_values", ()))
    changed = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted
               and (k not in model_config or not _equal(model_config[k], v))}
    schedule = None
    for key, name in _CONVERSIONS.items():  # turned on where the model's config has it off (True → False stays)
        if key in changed and not model_config.get(key):
            schedule = name if changed.pop(key) else schedule
    overrides = {k: changed.pop(k) for k in _OVERRIDES if k in changed}
    for k in spec.diffusers_config:
        changed.pop(k, None)
    if changed:
        listing = ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items()))
        raise ValueError(f"scheduler: {class_name} sets {listing}, which sdrt's {spec.name} sampler cannot follow "
                         "(it runs the model's scheduler config, with only use_karras/exponential/beta_sigmas, "
                         "timestep_spacing and prediction_type changed); drop those keys from from_config")
    return SchedulerView(class_name, FrozenConfig(config), spec.name, schedule, **overrides)


__all__ = ["SchedulerView", "FrozenConfig", "select", "model_view", "ALPHA_SPACE"]
