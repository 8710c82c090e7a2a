"""Layer 1 (DESIGN.md §7): the alpha-space multistep samplers (runtime/samplers/multistep.py) against diffusers.

unipc / unipc_bh1 (UniPCMultistepScheduler), deis (DEISMultistepScheduler), dpmpp_2s / dpmpp_2s_sde
(DPMSolverSinglestepScheduler), dpmpp_3m / dpmpp_3m_sde (DPMSolverMultistepScheduler, solver_order 3).

Each case runs diffusers' scheduler as its SD pipelines do (from_config({**config, **spec.diffusers_config}),
set_timesteps, latents = randn_tensor(generators) * init_noise_sigma, step(..., generator=generators)), and sdrt's
sampler behind make_denoiser with the same deterministic stand-in model and the same list of per-image CPU
generators (batch 2 for the stochastic samplers), then compares the final latents and the schedules.

Bound: max|sdrt - diffusers| <= RTOL * max|diffusers|, RTOL = 1e-5 (as tests/test_samplers.py). The samplers keep
diffusers' alpha-space latent and compute its scalar coefficients with diffusers' float32 operations, so the
two differ only by float32 rounding: x0 comes from the sigma-space denoiser and the model input from the
sigma-space latent. `test_worst_error_over_the_grid` prints the worst case per sampler; measured: 5.6e-6 (DEIS,
1 step, v_prediction: one step from sigma 14.6 to 0.029 cancels terms ~15x the result, diffusers' own float32
carries the same noise), otherwise <= 3.4e-6 (UniPC, cosine betas + karras), mostly ~1e-6 or less.
"""

from __future__ import annotations

import inspect
import types
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("scipy")  # diffusers' beta sigmas
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning",
                                        "ignore:__array_wrap__ must accept:DeprecationWarning")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from sdrt.runtime.samplers import registry as sampler_registry, multistep as samplers_multistep, schedules  # noqa: E402
from sdrt.runtime.denoiser.x0 import make_denoiser  # noqa: E402
from sdrt.runtime.errors import UserError  # noqa: E402
from sdrt.runtime.samplers.schedules import SchedulerConfig  # noqa: E402

RTOL = 1e-5
SHAPE = (4, 8, 8)
STEPS = (1, 2, 4, 8, 25)
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}

MINE = tuple(s.name for s in samplers_multistep.SPECS)
STOCHASTIC = tuple(n for n in MINE if sampler_registry.get(n).stochastic)
SINGLESTEP = ("dpmpp_2s", "dpmpp_2s_sde")  # DPMSolverSinglestepScheduler always spaces linspace
CONVERSION_KEYS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
WORST: dict[str, float] = {}


def stand_in(x: torch.Tensor, t: float) -> torch.Tensor:
    """Deterministic UNet stand-in: input- and timestep-dependent, nonlinear."""
    return 0.3 * x + 0.1 * torch.sin(1.7 * x + float(t) / 100.0)


def _generators(seed: int, batch: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def diffusers_scheduler(sampler: str, config: dict, sigmas: str = "default"):
    spec = sampler_registry.get(sampler)
    extra = {CONVERSION_KEYS[sigmas]: True} if sigmas in CONVERSION_KEYS else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, spec.diffusers_class).from_config({**config, **spec.diffusers_config, **extra})


def run_diffusers(sampler, config, steps, sigmas="default", batch=1, seed=0, image=None, strength=1.0,
                  blend=None, stop=None):
    """diffusers' SD pipeline loop; returns (latents, scheduler)."""
    sched = diffusers_scheduler(sampler, config, sigmas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singlestep: "changing lower_order_final" warnings
        sched.set_timesteps(steps)
    gens = _generators(seed, batch)
    noise = randn_tensor((batch, *SHAPE), generator=gens, dtype=torch.float32)
    timesteps = sched.timesteps
    if image is None:
        latents = noise * sched.init_noise_sigma
        sched.set_begin_index(0)
    else:  # StableDiffusionImg2ImgPipeline: get_timesteps (sets the begin index), add_noise at the first kept t
        host = types.SimpleNamespace(scheduler=sched)
        timesteps, _ = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(host, steps, strength, "cpu")
        latents = sched.add_noise(image, noise, timesteps[:1].repeat(batch))
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    for i, t in enumerate(timesteps[:stop]):
        out = stand_in(sched.scale_model_input(latents, t), float(t))
        latents = sched.step(out, t, latents, **({"generator": gens} if takes_generator else {}),
                             return_dict=False)[0]
        if blend is not None:  # StableDiffusionInpaintPipeline, 4-channel UNet
            mask, image_latents = blend
            proper = image_latents
            if i < len(timesteps) - 1:
                proper = sched.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
            latents = (1 - mask) * proper + mask * latents
    return latents, sched


def run_sdrt(sampler, config, steps, sigmas="default", batch=1, seed=0, image=None, strength=1.0, blend=None):
    """sdrt's sampler; returns (every yielded latent, the full schedule)."""
    cfg = SchedulerConfig.from_diffusers_json(config)
    full = sampler_registry.build_schedule(cfg, sampler, steps, sigmas)
    schedule = full
    gens = _generators(seed, batch)
    noise = torch.cat([torch.randn((1, *SHAPE), generator=g, dtype=torch.float32) for g in gens])
    if image is None:
        x = noise * schedule.init_noise_sigma
    else:
        schedule = schedules.from_index(full, schedules.strength_start_index(full, steps, strength))
        x = image + noise * float(schedule.sigmas[0])
    run = sampler_registry.get_sampler(sampler)(make_denoiser(stand_in, schedule, cfg.prediction_type), x,
                                                schedule, gens)
    yielded = [next(run)]
    for i in range(1, schedules.num_steps(schedule)):
        x = yielded[-1]
        if blend is not None:
            mask, image_latents = blend
            x = (1 - mask) * (image_latents + noise * float(schedule.sigmas[i])) + mask * x
        yielded.append(run.send(x))
    if blend is not None:
        mask, image_latents = blend
        yielded[-1] = (1 - mask) * image_latents + mask * yielded[-1]
    return yielded, full


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max()) / float(theirs.abs().max())


def assert_close(ours, theirs, sampler: str, rtol: float = RTOL) -> None:
    assert torch.isfinite(theirs).all() and torch.isfinite(ours).all()
    err = rel_err(ours, theirs)
    WORST[sampler] = max(WORST.get(sampler, 0.0), err)
    assert err <= rtol, f"relative max error {err:.3g} > {rtol:g}"


def assert_same_schedule(sched, schedule: schedules.Schedule) -> None:
    """Timesteps exactly, every sigma diffusers steps through exactly, and diffusers' alpha-space start."""
    np.testing.assert_array_equal(schedule.timesteps, sched.timesteps.numpy().astype(np.float64))
    np.testing.assert_array_equal(schedule.sigmas[:-1], sched.sigmas.numpy()[:-1])
    np.testing.assert_array_equal(schedule.targets, sched.sigmas.numpy()[1:])
    assert schedule.sigmas[-1] == 0.0
    assert sched.init_noise_sigma == 1.0
    assert schedule.init_noise_sigma == schedules.input_scale(schedule.sigmas[0])


def compare(sampler, config, steps, sigmas="default", rtol=RTOL, **kw):
    batch = 2 if sampler in STOCHASTIC else 1
    theirs, sched = run_diffusers(sampler, config, steps, sigmas, batch=batch, **kw)
    ours, schedule = run_sdrt(sampler, config, steps, sigmas, batch=batch, **kw)
    assert_same_schedule(sched, schedule)
    if sampler == "unipc_bh1" and schedule.targets[-1] == 0 and "image" not in kw and "blend" not in kw:
        return _compare_bh1_to_zero(config, steps, sigmas, ours, schedule, batch)
    # the zero-SNR schedule starts at sigma ~4096: float32 rounding of the start latent is carried
    assert_close(ours[-1], theirs, sampler, rtol=rtol if schedule.sigmas[0] < 1e3 else max(rtol, 1e-4))


def _compare_bh1_to_zero(config, steps, sigmas, ours, schedule, batch):
    # diffusers' bh1 step to sigma 0 computes alpha_t * B(h) * 0 = -inf * 0 = NaN (see the test below); sdrt returns
    # the limit. So: the latents before that step equal diffusers', and the last one is diffusers' own data
    # prediction at the last evaluation (the step's limit: sigma_t / sigma_s = 0, alpha_t (e^-h - 1) = -1)
    if steps > 1:
        before, _ = run_diffusers("unipc_bh1", config, steps, sigmas, batch=batch, stop=steps - 1)
        assert_close(ours[-2] / schedules.input_scale(schedule.sigmas[steps - 1]), before, "unipc_bh1")
    else:
        before = randn_tensor((batch, *SHAPE), generator=_generators(0, batch), dtype=torch.float32)
    sched = diffusers_scheduler("unipc_bh1", config, sigmas)
    sched.set_timesteps(steps)
    sched._step_index = steps - 1
    t = sched.timesteps[-1]
    x0 = sched.convert_model_output(stand_in(before, float(t)), sample=before)
    assert_close(ours[-1], x0, "unipc_bh1")


# ---- the grid ------------------------------------------------------------------------------------------------

def _grid():
    for sampler in MINE:
        for spacing in (("linspace",) if sampler in SINGLESTEP else SPACINGS):
            for prediction in PREDICTIONS:
                for steps in STEPS:
                    yield pytest.param(sampler, spacing, prediction, steps,
                                       id=f"{sampler}-{spacing}-{prediction}-{steps}")


@pytest.mark.parametrize("sampler,spacing,prediction,steps", list(_grid()))
def test_sampler_matches_diffusers(sampler, spacing, prediction, steps):
    compare(sampler, {**SD, "timestep_spacing": spacing, "prediction_type": prediction}, steps)


def _conversion_grid():
    for sampler in MINE:
        for sigmas in ("karras", "exponential", "beta"):
            for steps, spacing, prediction in ((3, "leading", "epsilon"), (8, "trailing", "v_prediction"),
                                               (16, "linspace", "epsilon")):
                yield pytest.param(sampler, sigmas, steps, spacing, prediction,
                                   id=f"{sampler}-{sigmas}-{steps}-{spacing}-{prediction}")


@pytest.mark.parametrize("sampler,sigmas,steps,spacing,prediction", list(_conversion_grid()))
def test_sigma_conversions_match_diffusers(sampler, sigmas, steps, spacing, prediction):
    # karras timesteps rounded, exponential / beta ones truncated; the converted sigmas span the training table
    compare(sampler, {**SD, "timestep_spacing": spacing, "prediction_type": prediction}, steps, sigmas)


@pytest.mark.parametrize("sampler", MINE)
def test_sigma_conversion_from_the_model_config(sampler):
    # use_karras_sigmas in the scheduler_config.json itself (request schedule "default")
    compare(sampler, {**SD, "use_karras_sigmas": True}, 10)


@pytest.mark.parametrize("sampler", MINE)
def test_absent_keys_take_the_sampler_class_defaults(sampler):
    # {}: betas 0.0001-0.02 linear, linspace spacing, solver_order 2 (3 for the 3M entries)
    compare(sampler, {}, 6)


# diffusers' bh1 ends in NaN on the step to sigma 0 (below): img2img and inpainting compare it ending at sigma_min
_BH1_FINITE = {"unipc_bh1": {"final_sigmas_type": "sigma_min"}}


@pytest.mark.parametrize("sampler", MINE)
def test_img2img_matches_diffusers(sampler):
    image = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(11))
    config = {**SD, "timestep_spacing": "leading", **_BH1_FINITE.get(sampler, {})}
    for steps, strength in ((10, 0.6), (7, 0.3)):
        compare(sampler, config, steps, image=image, strength=strength)


@pytest.mark.parametrize("sampler", MINE)
def test_inpaint_blend_sent_back_into_the_sampler_matches_diffusers(sampler):
    # 4-channel inpainting re-imposes the noised original outside the mask after every step; sdrt's caller send()s
    # the blended latent back, diffusers overwrites `latents` (UniPC's corrector then discards it, in both)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1.0
    blend = (mask, torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(11)))
    compare(sampler, {**SD, "timestep_spacing": "trailing", **_BH1_FINITE.get(sampler, {})}, 6, blend=blend)


# ---- scheduler options beyond the grid -----------------------------------------------------------------------

OPTION_CASES = [
    ("unipc", {"solver_order": 1}, 5),
    ("unipc", {"solver_order": 3}, 4),
    ("unipc", {"solver_order": 3}, 12),
    ("unipc", {"solver_order": 3, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 25),
    ("unipc", {"final_sigmas_type": "sigma_min"}, 7),
    ("unipc", {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}, 9),
    ("unipc", {"final_sigmas_type": "sigma_min", "lower_order_final": False, "solver_order": 3}, 9),
    ("unipc", {"lower_order_final": False, "solver_order": 1}, 5),
    ("unipc", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 8),
    ("unipc", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 10),
    ("unipc", {"sigma_min": 0.1, "sigma_max": 10.0, "use_karras_sigmas": True}, 8),
    ("unipc", {"solver_type": "bh2", "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, 6),
    ("unipc_bh1", {"final_sigmas_type": "sigma_min"}, 8),
    ("unipc_bh1", {"solver_order": 3}, 10),
    ("unipc_bh1", {"solver_order": 3, "final_sigmas_type": "sigma_min", "use_exponential_sigmas": True}, 10),
    ("deis", {"solver_order": 1}, 5),
    ("deis", {"solver_order": 3}, 10),
    ("deis", {"solver_order": 3}, 20),
    ("deis", {"solver_order": 3, "use_karras_sigmas": True}, 18),
    ("deis", {"lower_order_final": False}, 6),
    ("deis", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, 16),
    ("deis", {"rescale_betas_zero_snr": True}, 6),  # DEIS has no such option: from_config drops it
    # sigma_min/max are no __init__ argument of DEIS, DPMSolverSinglestep/Multistep, but from_config keeps them
    ("deis", {"sigma_min": 0.1, "sigma_max": 10.0, "use_karras_sigmas": True}, 8),
    ("dpmpp_2s", {"sigma_min": 0.1, "sigma_max": 10.0, "use_exponential_sigmas": True}, 8),
    ("deis", {"beta_schedule": "squaredcos_cap_v2", "use_beta_sigmas": True}, 9),
    ("dpmpp_2s", {"solver_type": "heun"}, 9),
    ("dpmpp_2s_sde", {"solver_type": "heun"}, 8),
    ("dpmpp_2s", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, 8),
    ("dpmpp_2s", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, 7),  # odd: forced lower-order
    ("dpmpp_2s", {"final_sigmas_type": "sigma_min", "lower_order_final": True}, 8),
    ("dpmpp_2s_sde", {"final_sigmas_type": "sigma_min", "lower_order_final": False, "use_karras_sigmas": True}, 10),
    ("dpmpp_2s", {"timestep_spacing": "trailing", "steps_offset": 1}, 10),  # not read by the singlestep class
    ("dpmpp_2s", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 12),
    ("dpmpp_2s", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 10),
    ("dpmpp_2s", {"rescale_betas_zero_snr": True}, 6),  # nor rescale_betas_zero_snr
    ("dpmpp_3m", {"solver_type": "heun"}, 10),
    ("dpmpp_3m_sde", {"solver_type": "heun"}, 10),
    ("dpmpp_3m", {"final_sigmas_type": "sigma_min"}, 20),  # N >= 15: third order on the last step too
    ("dpmpp_3m_sde", {"final_sigmas_type": "sigma_min"}, 20),
    ("dpmpp_3m", {"final_sigmas_type": "sigma_min"}, 9),
    ("dpmpp_3m", {"final_sigmas_type": "sigma_min", "euler_at_final": True}, 20),
    ("dpmpp_3m", {"lower_order_final": False}, 7),
    ("dpmpp_3m_sde", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 7),
    ("dpmpp_3m", {"solver_order": 2}, 9),  # the entry's solver_order 3 overrides the model's
    ("dpmpp_3m", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
     8),
    ("dpmpp_3m", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 12),
    ("dpmpp_3m", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 12),  # not rounded (cosine)
    ("dpmpp_3m_sde", {"sigma_min": 0.1, "sigma_max": 10.0, "use_karras_sigmas": True}, 8),
]


@pytest.mark.parametrize("sampler,options,steps", OPTION_CASES,
                         ids=[f"{s}-{'-'.join(o)}-{n}" for s, o, n in OPTION_CASES])
def test_scheduler_options_match_diffusers(sampler, options, steps):
    compare(sampler, {**SD, **options}, steps)


# ---- what diffusers gets wrong, and what sdrt returns instead ------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4])
def test_unipc_bh1_final_step_is_nan_in_diffusers_and_the_limit_in_sdrt(steps):
    theirs, _ = run_diffusers("unipc_bh1", SD, steps)
    assert torch.isnan(theirs).all()  # alpha_t * B(h) * 0 with B(h) = h = -inf
    compare("unipc_bh1", SD, steps)


@pytest.mark.parametrize("sampler", ["dpmpp_3m", "dpmpp_3m_sde"])
def test_dpm3_karras_ending_twice_on_sigma_min(sampler):
    # karras sigmas end on sigma_min and final_sigmas_type "sigma_min" steps to it again: h = 0. diffusers' third
    # order update divides 0 by 0 there (NaN); sdrt takes the step's limit, the identity (as diffusers' 2M does)
    config, steps = {**SD, "final_sigmas_type": "sigma_min", "use_karras_sigmas": True}, 16
    batch = 2 if sampler in STOCHASTIC else 1
    theirs, sched = run_diffusers(sampler, config, steps, batch=batch)
    assert torch.isnan(theirs).all()
    ours, schedule = run_sdrt(sampler, config, steps, batch=batch)
    assert_same_schedule(sched, schedule)
    assert schedule.sigmas[steps - 1] == schedule.targets[-1]
    before, _ = run_diffusers(sampler, config, steps, batch=batch, stop=steps - 1)
    alpha_space = ours[-2] / schedules.input_scale(schedule.sigmas[steps - 1])
    assert_close(alpha_space, before, sampler)
    assert torch.allclose(ours[-1], alpha_space, rtol=0, atol=1e-6)


# ---- per-image seeds -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_an_image_is_the_same_alone_or_in_a_batch(sampler):
    # image 1 of a batch seeded 0 uses seed 1 for its start and for every step's noise
    config = {**SD, "timestep_spacing": "trailing"}
    batch, _ = run_sdrt(sampler, config, 8, batch=2, seed=0)
    alone, _ = run_sdrt(sampler, config, 8, batch=1, seed=1)
    assert torch.equal(batch[-1][1:], alone[-1])
    theirs, _ = run_diffusers(sampler, config, 8, batch=1, seed=1)
    assert_close(alone[-1], theirs, sampler)


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_noise_is_drawn_once_per_step_in_float32(sampler):
    # after the run, each generator has made 1 + steps draws of one image's shape (start latent + each step)
    ours_gens = _generators(0, 2)
    cfg = SchedulerConfig.from_diffusers_json(SD)
    schedule = sampler_registry.build_schedule(cfg, sampler, 5)
    x = torch.cat([torch.randn((1, *SHAPE), generator=g) for g in ours_gens]) * schedule.init_noise_sigma
    for _ in sampler_registry.get_sampler(sampler)(make_denoiser(stand_in, schedule, "epsilon"), x, schedule,
                                                   ours_gens):
        pass
    reference = _generators(0, 2)
    for g in reference:
        for _ in range(1 + 5):
            torch.randn((1, *SHAPE), generator=g, dtype=torch.float32)
    for ours, ref in zip(ours_gens, reference):
        assert torch.equal(ours.get_state(), ref.get_state())


# ---- registry entries, names, errors -------------------------------------------------------------------------

def test_registry_entries():
    names = sampler_registry.NAMES
    assert names.index("dpmpp_3m_sde") > names.index("dpmpp_2m_sde")
    for name in MINE:
        spec = sampler_registry.get(name)
        assert spec.conversions == ("karras", "exponential", "beta")
        assert set(spec.class_defaults) >= {"beta_start", "beta_end", "beta_schedule", "timestep_spacing"}
    assert sampler_registry.resolve("UniPC") == ("unipc", None)
    assert sampler_registry.resolve("DPM++ 3M SDE Karras") == ("dpmpp_3m_sde", "karras")
    assert sampler_registry.resolve("DPM++ 2S a") == ("dpmpp_2s", None)
    assert sampler_registry.resolve("dpm++ 2s a exponential") == ("dpmpp_2s", "exponential")
    assert "AUTOMATIC1111" in sampler_registry.get("dpmpp_2s").description
    assert sampler_registry.get("dpmpp_2s_sde").stochastic and sampler_registry.get("dpmpp_3m_sde").stochastic


@pytest.mark.parametrize("config,expected", [
    ({"_class_name": "UniPCMultistepScheduler"}, "unipc"),
    ({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2"}, "unipc"),
    ({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh1"}, "unipc_bh1"),
    ({"_class_name": "DEISMultistepScheduler"}, "deis"),
    ({"_class_name": "DPMSolverSinglestepScheduler"}, "dpmpp_2s"),
    ({"_class_name": "DPMSolverSinglestepScheduler", "algorithm_type": "sde-dpmsolver++"}, "dpmpp_2s_sde"),
])
def test_default_sampler_for_a_model_scheduler_config(config, expected):
    assert sampler_registry.default_for(config) == expected


def test_model_solver_order_is_respected_by_unipc_and_deis():
    cfg = SchedulerConfig.from_diffusers_json({**SD, "solver_order": 3})
    assert max(sampler_registry.build_schedule(cfg, "unipc", 10).solver_orders) == 3
    assert max(sampler_registry.build_schedule(cfg, "deis", 20).solver_orders) == 3
    assert max(sampler_registry.build_schedule(cfg, "dpmpp_2s", 10).solver_orders) == 2  # the entry says 2


def test_singlestep_order_list():
    order_list = samplers_multistep.singlestep_order_list
    assert order_list(6, 2, False, "zero") == [1, 2, 1, 2, 1, 1]
    assert order_list(5, 2, False, "zero") == [1, 2, 1, 2, 1]
    assert order_list(6, 2, False, "sigma_min") == [1, 2, 1, 2, 1, 2]
    assert order_list(7, 3, True, "sigma_min") == [1, 2, 3, 1, 2, 3, 1]
    sched = diffusers_scheduler("dpmpp_2s", SD)
    for n in (1, 2, 3, 10, 25):
        sched.set_timesteps(n)
        assert order_list(n, 2, False, "zero") == sched.order_list


def _cfg(**options) -> SchedulerConfig:
    return SchedulerConfig.from_diffusers_json({**SD, **options})


@pytest.mark.parametrize("sampler,options,match", [
    ("unipc", {"solver_order": 4}, "solver_order 4"),
    ("deis", {"solver_order": 4}, "solver_order 4"),
    ("unipc", {"thresholding": True}, "thresholding"),
    ("deis", {"thresholding": True}, "thresholding"),
    ("dpmpp_2s", {"thresholding": True}, "thresholding"),
    ("dpmpp_3m", {"thresholding": True}, "thresholding"),
    ("unipc", {"lower_order_final": False}, "lower_order_final"),
    ("unipc", {"use_flow_sigmas": True}, "flow sigmas"),
    ("dpmpp_2s", {"variance_type": "learned_range"}, "learned-variance"),
    ("dpmpp_3m_sde", {"variance_type": "learned"}, "learned-variance"),
    ("dpmpp_3m", {"use_lu_lambdas": True}, "lu-lambdas"),
    ("unipc", {"final_sigmas_type": "denoised"}, "final_sigmas_type"),
])
def test_unsupported_settings_raise_one_clear_value_error(sampler, options, match):
    with pytest.raises(ValueError, match=match) as info:
        sampler_registry.build_schedule(_cfg(**options), sampler, 6)
    assert isinstance(info.value, UserError)


def test_a_schedule_of_another_sampler_is_refused():
    schedule = sampler_registry.build_schedule(_cfg(), "dpmpp_2m", 4)
    for name in MINE:
        with pytest.raises(ValueError, match="not made for"):
            next(sampler_registry.get_sampler(name)(lambda x, s: x, torch.zeros(1, *SHAPE), schedule, None))


def test_worst_error_over_the_grid():
    # runs last in this file (pytest keeps file order); reports the worst relative error per sampler
    if not WORST:
        pytest.skip("run with the rest of the file")
    print("\nworst relative error per sampler:", {k: f"{v:.2e}" for k, v in sorted(WORST.items())})
    assert max(WORST.values()) <= RTOL
