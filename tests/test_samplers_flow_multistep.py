"""Flow-match Heun, DPM-Solver++(2M) and UniPC on flow sigmas against diffusers 0.42 (layer 1, stand-in velocity model).

The reference is built from the registry: the entry's diffusers class `from_config(model config, **overrides)`
(flow.reference_config: the entry's overrides, plus flow_shift = the model's shift for DPMSolverMultistep/UniPC),
run as StableDiffusion3Pipeline runs it: set_timesteps(N), latents = the noise, model(latents, t), step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.runtime.denoiser.x0 import make_denoiser
from sdrt.runtime.samplers import classic, flow, registry
from sdrt.runtime.samplers.schedules import ScheduleError, SchedulerConfig, from_index

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 16, 6, 8)
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV = {**SD3, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096}
NEW = ("flow_heun", "flow_dpmpp_2m", "flow_unipc")


def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    return 0.8 * x + 0.3 * torch.sin(1.3 * x + float(t) / 200.0) - 0.2


def reference(name: str, config: dict):
    spec = registry.get(name)
    return getattr(diffusers, spec.diffusers_class).from_config(config, **flow.reference_config(spec, config))


def run_diffusers(name: str, config: dict, steps: int):
    sched = reference(name, config)
    sched.set_timesteps(steps)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        latents = sched.step(velocity(latents, t), t, latents, return_dict=False)[0]
    return latents, sched


def run_sdrt(name: str, config: dict, steps: int, requested: str | None = None):
    cfg = SchedulerConfig.from_diffusers_json(config)
    sampler = registry.for_model(requested or name, config)
    schedule = registry.make_schedule(cfg, sampler, steps)
    x = classic.initial_latents(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), schedule)
    out = None
    for out in registry.get_sampler(sampler)(make_denoiser(velocity, schedule, cfg.prediction_type), x, schedule,
                                             None):
        pass
    return out, schedule


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max()) / float(theirs.abs().max())


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("config,steps", [
    (SD3, 1), (SD3, 2), (SD3, 5), (SD3, 28), ({**SD3, "shift": 1.0}, 4), ({**SD3, "shift": 6.0}, 9),
])
def test_flow_samplers_match_diffusers(name, config, steps):
    theirs, sched = run_diffusers(name, config, steps)
    ours, schedule = run_sdrt(name, config, steps)
    np.testing.assert_array_equal(schedule.sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(schedule.timesteps, sched.timesteps.numpy().astype(np.float64))
    assert _relative(ours, theirs) <= 1e-5


@pytest.mark.parametrize("name,extra", [
    ("flow_dpmpp_2m", {"solver_type": "heun"}), ("flow_dpmpp_2m", {"solver_order": 1}),
    ("flow_unipc", {"solver_order": 3}), ("flow_unipc", {"solver_order": 1}),
])
def test_solver_settings_from_the_model_config_match_diffusers(name, extra):
    config = {**SD3, **extra}
    theirs, _ = run_diffusers(name, config, 8)
    ours, schedule = run_sdrt(name, config, 8)
    assert _relative(ours, theirs) <= 1e-5


def test_flow_shift_is_the_model_shift_and_it_matters():
    assert flow.reference_config(registry.get("flow_unipc"), SD3)["flow_shift"] == 3.0
    assert "flow_shift" not in flow.reference_config(registry.get("flow_heun"), SD3)  # its key is `shift`
    for name in NEW:
        base = run_sdrt(name, SD3, 6)[0]
        assert float((run_sdrt(name, {**SD3, "shift": 1.0}, 6)[0] - base).abs().max()) > 0.02, name  # parity is 1e-5
    # the schedules differ from flow_euler's where diffusers' do: DPM starts below 1, UniPC at 1 - 1e-6
    assert run_sdrt("flow_dpmpp_2m", SD3, 5)[1].sigmas[0] == np.float32(3 * 0.999 / (1 + 2 * 0.999))
    assert run_sdrt("flow_unipc", SD3, 5)[1].sigmas[0] == np.float32(1 - 1e-6)


def test_heun_schedule_is_two_evaluations_per_step_and_img2img_cuts_whole_steps():
    schedule = run_sdrt("flow_heun", SD3, 5)[1]
    assert schedule.order == 2 and len(schedule.timesteps) == 9
    assert schedule.sigmas[1] == schedule.sigmas[2] and schedule.sigmas[-1] == 0.0
    assert len(from_index(schedule, 4).timesteps) == 5
    with pytest.raises(ScheduleError, match="multiple of 2"):
        from_index(schedule, 3)


def test_a1111_names_select_the_flow_forms_on_flow_models():
    for typed, expected in (("Heun", "flow_heun"), ("DPM++ 2M", "flow_dpmpp_2m"), ("UniPC", "flow_unipc"),
                            ("Euler", "flow_euler")):
        name, schedule = registry.resolve(typed)
        assert schedule is None and registry.for_model(name, SD3) == expected
    assert registry.for_model(None, {"_class_name": "FlowMatchHeunDiscreteScheduler", "shift": 3.0}) == "flow_heun"
    with pytest.raises(ScheduleError, match="flow-matching model"):
        registry.for_model("dpmpp_2m_sde", SD3)
    for name in NEW:  # and never on a discrete-time model
        with pytest.raises(ScheduleError, match="for flow-matching models"):
            registry.for_model(name, {"_class_name": "EulerDiscreteScheduler"})
    # the discrete-time models keep their samplers: a plain DPMSolverMultistep/UniPC config is not flow
    assert registry.for_model(None, {"_class_name": "DPMSolverMultistepScheduler"}) == "dpmpp_2m"
    assert registry.for_model(None, {"_class_name": "UniPCMultistepScheduler"}) == "unipc"


FLUX_SCHNELL = {**SD3, "shift": 1.0, "use_dynamic_shifting": False}


@pytest.mark.parametrize("name,config,mu", [("flow_dpmpp_2m", FLUX_DEV, 0.8), ("flow_dpmpp_2m", FLUX_DEV, 1.15),
                                            ("flow_unipc", FLUX_DEV, 0.8), ("flow_unipc", FLUX_DEV, 1.15),
                                            ("flow_unipc", FLUX_SCHNELL, 0.8)])
def test_multistep_on_flux_match_diffusers_as_flux_pipeline_calls_them(name, config, mu):
    """FluxPipeline gives a use_flow_sigmas scheduler no sigmas, only mu: set_timesteps(N, mu=mu) (on schnell's
    config DPM-Solver asserts on that mu: refused, test_refused_settings_name_what_to_do)."""
    sched = reference(name, config)
    dynamic = config.get("use_dynamic_shifting", False)
    sched.set_timesteps(6, mu=mu)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        latents = sched.step(velocity(latents, t), t, latents, return_dict=False)[0]
    cfg = SchedulerConfig.from_diffusers_json({**config, "pipeline_sigmas": True, "mu": mu})
    schedule = registry.make_schedule(cfg, name, 6)
    np.testing.assert_array_equal(schedule.sigmas, sched.sigmas.numpy())
    x = classic.initial_latents(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), schedule)
    for ours in registry.get_sampler(name)(make_denoiser(velocity, schedule, cfg.prediction_type), x, schedule, None):
        pass
    assert _relative(ours, latents) <= 1e-5
    if dynamic:  # mu moves the schedule
        other = registry.make_schedule(SchedulerConfig.from_diffusers_json({**cfg.__dict__, "mu": mu + 0.5}), name, 6)
        assert abs(float(other.sigmas[2]) - float(schedule.sigmas[2])) > 0.01


def test_refused_settings_name_what_to_do():
    cfg = SchedulerConfig.from_diffusers_json({**FLUX_DEV, "pipeline_sigmas": True, "mu": 1.0})
    with pytest.raises(ScheduleError, match="use flow_euler, flow_dpmpp_2m or flow_unipc"):
        registry.make_schedule(cfg, "flow_heun", 4)
    schnell = SchedulerConfig.from_diffusers_json({**FLUX_SCHNELL, "pipeline_sigmas": True, "mu": 1.0})
    with pytest.raises(ScheduleError, match="use flow_euler or flow_unipc"):
        registry.make_schedule(schnell, "flow_dpmpp_2m", 4)
    with pytest.raises(AssertionError):  # diffusers itself: FluxPipeline's mu on a config without dynamic shifting
        reference("flow_dpmpp_2m", FLUX_SCHNELL).set_timesteps(4, mu=1.0)
    with pytest.raises(ScheduleError, match="karras sigmas are not available for flow_dpmpp_2m"):
        registry.make_schedule(SchedulerConfig.from_diffusers_json(SD3), "flow_dpmpp_2m", 4, "karras")
    with pytest.raises(ScheduleError, match="final_sigmas_type"):
        registry.make_schedule(SchedulerConfig.from_diffusers_json({**SD3, "final_sigmas_type": "sigma_min"}),
                               "flow_unipc", 4)
