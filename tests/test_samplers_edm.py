"""EDM samplers, zero-terminal-SNR DDIM and the refusals of schedulers sdrt does not reproduce (layer 1: a stand-in
denoiser against diffusers' schedulers, as tests/test_samplers.py does for the others).

diffusers' loop as its SD/SDXL pipelines run it: set_timesteps, latents = randn * init_noise_sigma, scale_model_input
(EDM: precondition_inputs), model, step. Bound: relative 1e-5 of the latent's scale (tests/test_samplers.py says why).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sdrt.runtime.denoiser.x0 import make_denoiser
from sdrt.runtime.samplers import classic, registry
from sdrt.runtime.samplers.schedules import ScheduleError, SchedulerConfig

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 4, 8, 8)
EDM = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "num_train_timesteps": 1000, "rho": 7.0,
       "prediction_type": "epsilon"}
SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}


def stand_in(x: torch.Tensor, t: float) -> torch.Tensor:
    return 0.3 * x + 0.1 * torch.sin(1.7 * x + float(t) / 100.0)


def run_diffusers(cls_name: str, config: dict, steps: int, seed: int = 0) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = getattr(diffusers, cls_name).from_config(config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = stand_in(sched.scale_model_input(latents, t), float(t))
        latents = sched.step(out, t, latents, generator=g, return_dict=False)[0] \
            if "generator" in sched.step.__code__.co_varnames else sched.step(out, t, latents, return_dict=False)[0]
    return latents


def run_sdrt(sampler: str, config: dict, steps: int, seed: int = 0) -> torch.Tensor:
    cfg = SchedulerConfig.from_diffusers_json(config)
    schedule = registry.make_schedule(cfg, sampler, steps)
    g = torch.Generator().manual_seed(seed)
    x = classic.initial_latents(torch.randn(SHAPE, generator=g), schedule)
    out = None
    for out in registry.get_sampler(sampler)(make_denoiser(stand_in, schedule, cfg.prediction_type), x, schedule, g):
        pass
    return out


def assert_close(ours, theirs, rtol=1e-5):
    err = float((ours - theirs).abs().max()) / float(theirs.abs().max())
    assert err <= rtol, f"relative max error {err:.3g}"


EDM_CASES = [
    ("edm_dpmpp_2m", "EDMDPMSolverMultistepScheduler", {}, 8),
    ("edm_dpmpp_2m", "EDMDPMSolverMultistepScheduler", {"sigma_schedule": "exponential"}, 6),
    ("edm_dpmpp_2m", "EDMDPMSolverMultistepScheduler", {"prediction_type": "v_prediction", "solver_type": "heun"}, 25),
    ("edm_dpmpp_2m", "EDMDPMSolverMultistepScheduler", {"solver_order": 1}, 4),
    ("edm_dpmpp_2m_sde", "EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 8),
    ("edm_euler", "EDMEulerScheduler", {}, 8),
    ("edm_euler", "EDMEulerScheduler", {"sigma_schedule": "exponential", "final_sigmas_type": "sigma_min"}, 5),
    ("edm_euler", "EDMEulerScheduler", {"prediction_type": "v_prediction"}, 1),
]


@pytest.mark.parametrize("sampler,cls,options,steps", EDM_CASES)
def test_edm_samplers_match_diffusers(sampler, cls, options, steps):
    config = {**EDM, **options}
    theirs = run_diffusers(cls, config, steps)
    ours = run_sdrt(sampler, {**config, "_class_name": cls}, steps)
    assert_close(ours, theirs)
    assert float((ours - run_sdrt(sampler, {**config, "sigma_data": 1.0}, steps)).abs().max()) > 1e-2  # it matters


def test_edm_schedule_equals_diffusers():
    for cls, sampler in (("EDMEulerScheduler", "edm_euler"), ("EDMDPMSolverMultistepScheduler", "edm_dpmpp_2m")):
        sched = getattr(diffusers, cls).from_config(EDM)
        sched.set_timesteps(10)
        ours = registry.make_schedule(SchedulerConfig.from_diffusers_json(EDM), sampler, 10)
        np.testing.assert_array_equal(ours.timesteps, sched.timesteps.numpy().astype(np.float64))
        np.testing.assert_array_equal(ours.sigmas, sched.sigmas.numpy())
        assert ours.init_noise_sigma == sched.init_noise_sigma


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_zero_terminal_snr_ddim_matches_diffusers(steps):
    """diffusers' DDIM keeps alphas_cumprod[-1] = 0 (an infinite first sigma) under rescale_betas_zero_snr."""
    config = {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    theirs = run_diffusers("DDIMScheduler", config, steps)
    assert_close(run_sdrt("ddim", config, steps), theirs)
    with pytest.raises(ScheduleError, match="v_prediction"):
        run_sdrt("ddim", {**config, "prediction_type": "epsilon"}, steps)


def test_a_scheduler_sdrt_does_not_reproduce_is_refused_not_replaced():
    for config in ({"_class_name": "DDPMScheduler"}, {"_class_name": "PNDMScheduler", "skip_prk_steps": False},
                   {"_class_name": "SomeNewScheduler"}, {"_class_name": "DPMSolverMultistepScheduler",
                                                          "algorithm_type": "dpmsolver"}):
        with pytest.raises(ScheduleError, match="not one sdrt reproduces"):
            registry.for_model(None, config)
    assert registry.for_model("euler", {"_class_name": "DDPMScheduler"}) == "euler"  # named knowingly: runs


def test_edm_models_run_edm_samplers_only():
    playground = {"_class_name": "EDMDPMSolverMultistepScheduler", **EDM}
    assert registry.for_model(None, playground) == "edm_dpmpp_2m"
    assert registry.for_model("dpmpp_2m", playground) == "edm_dpmpp_2m"
    assert registry.for_model("euler", playground) == "edm_euler"
    with pytest.raises(ScheduleError, match="EDM-trained"):
        registry.for_model("ddim", playground)
    with pytest.raises(ScheduleError, match="for EDM-trained models"):
        registry.for_model("edm_euler", {"_class_name": "EulerDiscreteScheduler"})


def test_settings_the_sampler_would_ignore_are_refused():
    with pytest.raises(ScheduleError, match="predict_x0"):
        registry.for_model(None, {"_class_name": "UniPCMultistepScheduler", "predict_x0": False})
    assert registry.for_model(None, {"_class_name": "UniPCMultistepScheduler", "predict_x0": True}) == "unipc"
    with pytest.raises(ScheduleError, match="noise_sampler_seed"):
        registry.for_model("dpmpp_sde", {"_class_name": "EulerDiscreteScheduler", "noise_sampler_seed": 3})
