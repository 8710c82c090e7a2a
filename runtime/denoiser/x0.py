"""The one adapter between a UNet and the samplers (DESIGN.md §4): `denoise(x, sigma) -> x0`.

It owns sigma -> timestep (looked up in the schedule, never inverted), the input scaling x / sqrt(sigma^2 + 1)
(diffusers' scale_model_input; for the alpha-space schedulers it turns the sigma-space latent back into
exactly the latent diffusers feeds the UNet), and the conversion of the UNet's epsilon / v / sample output to x0.
Arithmetic is float32 with the sigma first rounded to float32, as in diffusers' schedulers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from sdrt.runtime.samplers.schedules import PREDICTION_TYPES, Schedule, ScheduleError, input_scale, num_steps

Model = Callable[[torch.Tensor, float], torch.Tensor]  # (scaled latent [B, C, h, w], timestep) -> UNet output
Denoise = Callable[[torch.Tensor, float], torch.Tensor]


def timestep_lookup(schedule: Schedule) -> dict[float, float]:
    """{evaluation sigma: the timestep diffusers pairs with it} for every evaluation in the schedule."""
    pairs: dict[float, float] = {}
    for sigma, t in zip(schedule.sigmas[:num_steps(schedule)], schedule.timesteps):
        key, value = float(sigma), float(t)
        if pairs.setdefault(key, value) != value:
            raise ScheduleError(f"sigma {key} is paired with two timesteps ({pairs[key]} and {value}) in this schedule")
    return pairs


def to_x0(out: torch.Tensor, x: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    """x0 from the UNet output for the sigma-space latent x (diffusers EulerDiscreteScheduler.step, fp32)."""
    s = torch.tensor(float(sigma), dtype=torch.float32)
    if prediction_type == "epsilon":
        return x - float(s) * out
    if prediction_type == "v_prediction":
        var = s ** 2 + 1
        return out * float(-s / var ** 0.5) + x / float(var)
    return out


def edm_preconditioning(sigma: float, sigma_data: float, prediction_type: str) -> tuple[torch.Tensor, ...]:
    """(c_in, c_skip, c_out) of diffusers' EDM schedulers (precondition_inputs / precondition_outputs), float32 0-d:
    c_in = 1/sqrt(s^2 + sd^2), c_skip = sd^2/(s^2 + sd^2), c_out = ±s sd/sqrt(s^2 + sd^2) (- for v_prediction)."""
    s = torch.tensor(float(sigma), dtype=torch.float32)
    c_in = 1 / ((s ** 2 + sigma_data ** 2) ** 0.5)
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = s * sigma_data / (s ** 2 + sigma_data ** 2) ** 0.5
    return c_in, c_skip, -c_out if prediction_type == "v_prediction" else c_out


def make_denoiser(model: Model, schedule: Schedule, prediction_type: str) -> Denoise:
    """`denoise(x, sigma) -> x0` for a sampler running `schedule`; `model(scaled_x, timestep)` is the UNet call."""
    if prediction_type not in PREDICTION_TYPES:
        raise ScheduleError(f"prediction_type {prediction_type!r} is not supported; "
                            f"choose one of {', '.join(PREDICTION_TYPES)}")
    timesteps = timestep_lookup(schedule)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        s = np.float32(sigma)
        t = timesteps.get(float(s))
        if t is None:
            raise ScheduleError(f"sigma {float(s)} is not an evaluation sigma of this schedule")
        if schedule.flow:  # flow matching (runtime/samplers/flow.py): velocity out, x0 = x - s v
            return x - float(s) * model(x, t).float()
        if schedule.sigma_data is not None:  # EDM (runtime/samplers/edm.py)
            c_in, c_skip, c_out = edm_preconditioning(float(s), schedule.sigma_data, prediction_type)
            return c_skip * x + c_out * model(x * c_in, t).float()
        out = model(x / input_scale(s), t)
        return to_x0(out.float(), x, float(s), prediction_type)

    return denoise
