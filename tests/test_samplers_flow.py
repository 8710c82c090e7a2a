"""Flow-match Euler against diffusers' FlowMatchEulerDiscreteScheduler with a stand-in velocity model (layer 1).

diffusers' loops as its pipelines run them: StableDiffusion3Pipeline calls set_timesteps(N) (static shift, no
sigmas); FluxPipeline passes sigmas = linspace(1, 1/N, N) and mu from the packed sequence length. The latents start
at the noise (no init_noise_sigma), the model sees them unscaled at timestep t, step() adds (s' - s)·v.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.runtime.denoiser.x0 import make_denoiser
from sdrt.runtime.samplers import classic, flow, registry
from sdrt.runtime.samplers.schedules import ScheduleError, SchedulerConfig

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 16, 6, 8)
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096}
FLUX_SCHNELL = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                "use_dynamic_shifting": False}


def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    return 0.8 * x + 0.3 * torch.sin(1.3 * x + float(t) / 200.0) - 0.2


def run_diffusers(config: dict, steps: int, flux: bool, mu: float | None = None) -> tuple[torch.Tensor, object]:
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    if flux:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:
        sched.set_timesteps(steps)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        latents = sched.step(velocity(latents, float(t)), t, latents, return_dict=False)[0]
    return latents, sched


def run_sdrt(config: dict, steps: int, flux: bool, mu: float | None = None):
    cfg = SchedulerConfig.from_diffusers_json({**config, "pipeline_sigmas": flux, "mu": mu})
    sampler = registry.for_model(None, config)
    schedule = registry.make_schedule(cfg, sampler, steps)
    x = classic.initial_latents(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), schedule)
    out = None
    for out in registry.get_sampler(sampler)(make_denoiser(velocity, schedule, cfg.prediction_type), x, schedule,
                                             None):
        pass
    return out, schedule


@pytest.mark.parametrize("config,steps,flux,mu", [
    (SD3, 1, False, None), (SD3, 5, False, None), (SD3, 28, False, None), ({**SD3, "shift": 1.0}, 4, False, None),
    ({**SD3, "shift_terminal": 0.02}, 6, False, None),
    (FLUX_SCHNELL, 4, True, None), (FLUX_DEV, 4, True, 0.8), (FLUX_DEV, 28, True, 1.15),
    ({**FLUX_DEV, "time_shift_type": "linear"}, 6, True, 1.1),
])
def test_flow_euler_matches_diffusers(config, steps, flux, mu):
    theirs, sched = run_diffusers(config, steps, flux, mu)
    ours, schedule = run_sdrt(config, steps, flux, mu)
    np.testing.assert_array_equal(schedule.sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(schedule.timesteps, sched.timesteps.numpy().astype(np.float64))
    err = float((ours - theirs).abs().max()) / float(theirs.abs().max())
    assert err <= 1e-5, f"relative max error {err:.3g}"


def test_sd3_last_sigma_is_shifted_twice_as_diffusers_does():
    schedule = run_sdrt(SD3, 5, False)[1]
    assert schedule.sigmas[-2] == pytest.approx(0.00893, abs=1e-5)  # one shift would give 0.00299
    assert schedule.sigmas[0] == 1.0 and schedule.init_noise_sigma == 1.0


def test_the_shift_matters_and_dynamic_shifting_needs_mu():
    base = run_sdrt(SD3, 5, False)[0]
    assert float((run_sdrt({**SD3, "shift": 1.0}, 5, False)[0] - base).abs().max()) > 0.05
    with pytest.raises(ScheduleError, match="mu"):
        run_sdrt(FLUX_DEV, 4, True, None)
    # diffusers' calculate_shift: 256 tokens → base_shift, 4096 → max_shift
    cfg = SchedulerConfig.from_diffusers_json(FLUX_DEV)
    assert flow.image_seq_mu(cfg, 256) == pytest.approx(0.5) and flow.image_seq_mu(cfg, 4096) == pytest.approx(1.15)


def test_flow_models_run_flow_samplers_only():
    assert registry.for_model(None, SD3) == "flow_euler"
    assert registry.for_model("euler", SD3) == "flow_euler"  # "Euler" from an AUTOMATIC1111/Forge client
    assert registry.for_model("dpmpp_2m", SD3) == "flow_dpmpp_2m"  # tests/test_samplers_flow_multistep.py
    with pytest.raises(ScheduleError, match="flow-matching model"):
        registry.for_model("dpmpp_2m_sde", SD3)
    with pytest.raises(ScheduleError, match="for flow-matching models"):
        registry.for_model("flow_euler", {"_class_name": "EulerDiscreteScheduler"})


def test_flow_presets_select_flow_euler_on_flow_models_only():
    from sdrt.runtime.samplers.presets import PRESETS

    for name in ("flux-schnell", "sd35-turbo"):
        preset = PRESETS[name]
        assert (preset.steps, preset.guidance, preset.timestep_spacing) == (4, 0.0, None)
        assert registry.for_model(preset.sampler, SD3) == "flow_euler"
        with pytest.raises(ScheduleError, match="for flow-matching models"):
            registry.for_model(preset.sampler, {"_class_name": "EulerDiscreteScheduler"})
