"""Layer 1 (DESIGN.md §7): sdrt's schedules and samplers against diffusers' schedulers, with a stand-in denoiser.

Each case runs diffusers' scheduler the way its SD pipelines do (set_timesteps, latents = randn * init_noise_sigma,
scale_model_input, model, step(..., generator)) and sdrt's sampler behind make_denoiser with the same stand-in
model and seed, then compares the final latents and the schedules.

Bound: max|sdrt - diffusers| <= RTOL * max|diffusers|, RTOL = 1e-5. Euler, Euler ancestral and Heun come out
bit-identical (0.0 over the whole grid; asserted separately for a few cases). DDIM, LCM and DPM-Solver run in
diffusers' alpha space and in sdrt's sigma space (x / sqrt(abar)), so they differ by float32 rounding only: the
worst case measured over the grid is 1.2e-6 (DPM++ 2M SDE Karras, 25 steps). 1e-5 leaves ~8x headroom for
other CPUs' rounding and is still 10x tighter than the ~1e-4 asked for; a formula or RNG-order mistake shows
up as 1e-3 or more.
"""

from __future__ import annotations

import inspect
import types
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2

from sdrt.runtime.samplers import classic as samplers, schedules  # noqa: E402
from sdrt.runtime.denoiser.x0 import make_denoiser, timestep_lookup  # noqa: E402
from sdrt.runtime.errors import UserError  # noqa: E402
from sdrt.runtime.samplers.registry import make_schedule  # noqa: E402
from sdrt.runtime.samplers.schedules import SchedulerConfig  # noqa: E402
from sdrt.runtime.samplers import registry as sampler_registry

RTOL = 1e-5
SHAPE = (1, 4, 8, 8)
STEPS = (1, 2, 4, 8, 25)
SPACINGS = ("leading", "trailing", "linspace")

# SD 1.5 / SDXL base scheduler_config.json keys (Hub); the SD-Turbo/Lightning ones add timestep_spacing
SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}

CLASSIC = ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "lcm")
DIFFUSERS = {n: (s.diffusers_class, dict(s.diffusers_config)) for n, s in sampler_registry.REGISTRY.items()
             if n in CLASSIC}  # sdrt sampler name → (diffusers scheduler class, from_config overrides)
EULER_FAMILY = ("euler", "euler_a", "heun")


def stand_in(x: torch.Tensor, t: float) -> torch.Tensor:
    """Deterministic UNet stand-in: input- and timestep-dependent, nonlinear."""
    return 0.3 * x + 0.1 * torch.sin(1.7 * x + float(t) / 100.0)


def diffusers_scheduler(sampler: str, config: dict, karras: bool = False):
    name, extra = DIFFUSERS[sampler]
    karras_key = {"use_karras_sigmas": True} if karras else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, name).from_config({**config, **extra, **karras_key})


def _step(sched, out, t, latents, generator):
    kwargs = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    return sched.step(out, t, latents, **kwargs, return_dict=False)


def run_diffusers(sampler, config, steps, karras=False, seed=0, image=None, strength=1.0, blend=None, stop=None):
    """diffusers' SD pipeline loop; returns (decoded latents, scheduler). LCM decodes `denoised` at the end."""
    sched = diffusers_scheduler(sampler, config, karras)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    timesteps = sched.timesteps
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    if image is None:
        latents = noise * sched.init_noise_sigma
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
    else:  # StableDiffusionImg2ImgPipeline: get_timesteps, then add_noise at the first kept timestep
        host = types.SimpleNamespace(scheduler=sched)
        timesteps, _ = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(host, steps, strength, "cpu")
        latents = sched.add_noise(image, noise, timesteps[:1])
    timesteps = timesteps[:stop]
    for i, t in enumerate(timesteps):
        out = stand_in(sched.scale_model_input(latents, t), float(t))
        result = _step(sched, out, t, latents, g)
        latents = result[1] if sampler == "lcm" and t == sched.timesteps[-1] else result[0]
        if blend is not None:  # StableDiffusionInpaintPipeline, 4-channel UNet
            mask, image_latents = blend
            proper = image_latents
            if i < len(timesteps) - 1:
                proper = sched.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
            latents = (1 - mask) * proper + mask * latents
    return latents, sched


def run_sdrt(sampler, config, steps, karras=False, seed=0, image=None, strength=1.0, blend=None, stop=None):
    cfg = SchedulerConfig.from_diffusers_json(config)
    schedule = make_schedule(cfg, sampler, steps, karras)
    full = schedule
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    if image is None:
        x = samplers.initial_latents(noise, schedule)
    else:
        schedule = schedules.from_index(schedule, schedules.strength_start_index(schedule, steps, strength))
        x = image + noise * float(schedule.sigmas[0])
    run = sampler_registry.get_sampler(sampler)(make_denoiser(stand_in, schedule, cfg.prediction_type), x, schedule, g)
    count = schedules.num_steps(schedule) if stop is None else stop
    x = next(run)
    for i in range(count):
        if blend is not None:
            mask, image_latents = blend
            x = (1 - mask) * (image_latents + noise * float(schedule.sigmas[i + 1])) + mask * x
        if i + 1 == count:
            break
        x = run.send(x)
    return x, full


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> None:
    err = float((ours - theirs).abs().max()) / float(theirs.abs().max())
    assert err <= rtol, f"relative max error {err:.3g} > {rtol:g}"


def assert_same_schedule(sampler: str, sched, schedule: schedules.Schedule) -> None:
    """Timesteps, sigmas and the start sigma equal diffusers' exactly."""
    np.testing.assert_array_equal(schedule.timesteps, sched.timesteps.numpy().astype(np.float64))
    if sampler in EULER_FAMILY:
        np.testing.assert_array_equal(schedule.sigmas, sched.sigmas.numpy())
        assert schedule.init_noise_sigma == float(sched.init_noise_sigma)
        return
    assert sched.init_noise_sigma == 1.0
    if sampler.startswith("dpmpp"):
        np.testing.assert_array_equal(schedule.sigmas[:-1], sched.sigmas.numpy()[:-1])
        np.testing.assert_array_equal(schedule.targets, sched.sigmas.numpy()[1:])
    else:  # DDIM, LCM: the sigma of each timestep
        abar = sched.alphas_cumprod[sched.timesteps]
        np.testing.assert_array_equal(schedule.sigmas[:-1], (((1 - abar) / abar) ** 0.5).numpy())
    assert schedule.sigmas[-1] == 0.0


def _grid():
    for sampler in DIFFUSERS:
        spacings = ("leading",) if sampler == "lcm" else SPACINGS  # LCM's own schedule ignores the spacing
        karras_options = (False, True) if "karras" in sampler_registry.get(sampler).conversions else (False,)
        predictions = ("epsilon", "v_prediction") if sampler == "euler_a" else schedules.PREDICTION_TYPES
        for spacing in spacings:
            for karras in karras_options:
                for prediction in predictions:
                    for steps in STEPS:
                        tag = f"{sampler}-{spacing}{'-karras' if karras else ''}-{prediction}-{steps}"
                        yield pytest.param(sampler, spacing, karras, prediction, steps, id=tag)


@pytest.mark.parametrize("sampler,spacing,karras,prediction,steps", list(_grid()))
def test_sampler_matches_diffusers(sampler, spacing, karras, prediction, steps):
    config = {**SD, "timestep_spacing": spacing, "prediction_type": prediction}
    theirs, sched = run_diffusers(sampler, config, steps, karras)
    ours, schedule = run_sdrt(sampler, config, steps, karras)
    assert_same_schedule(sampler, sched, schedule)
    assert_close(ours, theirs)


@pytest.mark.parametrize("sampler,spacing,karras,steps", [
    ("euler", "trailing", False, 1), ("euler", "trailing", False, 4), ("euler", "leading", True, 25),
    ("euler_a", "trailing", False, 1), ("euler_a", "linspace", False, 8), ("heun", "linspace", True, 8),
])
def test_euler_family_is_bit_identical(sampler, spacing, karras, steps):
    # Same float32 operations as diffusers (scalars rounded to float32 first, torch's pow for square roots).
    config = {**SD, "timestep_spacing": spacing}
    theirs, _ = run_diffusers(sampler, config, steps, karras)
    ours, _ = run_sdrt(sampler, config, steps, karras)
    assert torch.equal(ours, theirs)


# ---- scheduler options beyond the grid ----------------------------------------------------------------

OPTION_CASES = [
    ("euler", {"final_sigmas_type": "sigma_min"}, 7),
    ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, 6),
    ("euler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 6),
    ("euler_a", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 5),
    ("euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 3),
    ("euler", {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, 5),
    ("heun", {"clip_sample": True, "prediction_type": "sample"}, 5),
    ("heun", {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}, 4),
    ("dpmpp_2m", {"solver_type": "heun"}, 10),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, 10),
    ("dpmpp_2m", {"lower_order_final": False}, 7),
    ("dpmpp_2m", {"euler_at_final": True}, 20),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, 7),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, 20),
    ("dpmpp_2m_sde", {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}, 16),
    ("dpmpp_2m", {"solver_order": 1}, 6),
    ("dpmpp_2m", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                  "timestep_spacing": "trailing"}, 8),
    ("dpmpp_2m", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 12),
    ("dpmpp_2m", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 12),
    ("ddim", {"clip_sample": True, "set_alpha_to_one": True}, 6),
    ("ddim", {"clip_sample": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 3),
    ("ddim", {"timestep_spacing": "linspace"}, 7),
    ("ddim", {"timestep_spacing": "trailing"}, 3),
    ("lcm", {"clip_sample": True}, 4),
    ("lcm", {"original_inference_steps": 100, "timestep_scaling": 5.0}, 6),
    ("lcm", {"prediction_type": "v_prediction"}, 50),
]


@pytest.mark.parametrize("sampler,options,steps", OPTION_CASES,
                         ids=[f"{s}-{'-'.join(o)}-{n}" for s, o, n in OPTION_CASES])
def test_scheduler_options_match_diffusers(sampler, options, steps):
    config = {**SD, **options}
    theirs, sched = run_diffusers(sampler, config, steps)
    ours, schedule = run_sdrt(sampler, config, steps)
    np.testing.assert_array_equal(schedule.timesteps, sched.timesteps.numpy().astype(np.float64))
    if sampler in EULER_FAMILY or sampler.startswith("dpmpp"):
        np.testing.assert_array_equal(schedule.sigmas[:-1], sched.sigmas.numpy()[:len(schedule.sigmas) - 1])
        np.testing.assert_array_equal(schedule.targets[-1], sched.sigmas.numpy()[-1])
    # the cosine schedule starts at sigma ~2e4: float32 rounding of the start latent is carried (measured 5.2e-6)
    assert_close(ours, theirs, rtol=RTOL if schedule.sigmas[0] < 1e3 else 1e-4)


@pytest.mark.parametrize("sampler", list(DIFFUSERS))
def test_absent_keys_take_the_sampler_class_defaults(sampler):
    # {}: every key defaulted by the diffusers class behind the sampler (e.g. DDIM leading + clip_sample, LCM betas)
    theirs, sched = run_diffusers(sampler, {}, 4)
    ours, schedule = run_sdrt(sampler, {}, 4)
    assert_same_schedule(sampler, sched, schedule)
    assert_close(ours, theirs)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_config_of_a_loaded_pndm_scheduler(sampler):
    # SD 1.5's Hub config has no timestep_spacing; the loaded PNDM config lists it in _use_default_values, so
    # Target.from_config(pndm.config) takes the target's default (Euler linspace, DDIM leading), not PNDM's.
    hub = {"_class_name": "PNDMScheduler", **SD, "skip_prk_steps": True, "trained_betas": None}
    loaded = dict(diffusers.PNDMScheduler.from_config(hub).config)
    assert "timestep_spacing" in loaded["_use_default_values"]
    theirs, sched = run_diffusers(sampler, loaded, 10)
    ours, schedule = run_sdrt(sampler, loaded, 10)
    assert_same_schedule(sampler, sched, schedule)
    assert_close(ours, theirs)


# ---- golden tables (reference/fewstep_perf.md §1.1, §1.3, §1.4) -------------------------------------

SDXL = {**SD, "_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon", "interpolation_type": "linear",
        "timestep_spacing": "leading", "use_karras_sigmas": False, "sample_max_value": 1.0, "skip_prk_steps": True}


def _cfg(**overrides) -> SchedulerConfig:
    return SchedulerConfig.from_diffusers_json({**SDXL, **overrides})


def test_training_schedule_constants():
    abar = schedules.alphas_cumprod(_cfg().resolved(sampler_registry.get("euler").class_defaults), "euler").numpy()
    sigma = np.sqrt((1 - abar) / abar)
    np.testing.assert_allclose([abar[0], abar[-1]], [0.99915, 0.0046601], rtol=1e-4)
    np.testing.assert_allclose([sigma[0], sigma[-1]], [0.029168, 14.6146], rtol=1e-4)


@pytest.mark.parametrize("steps,timesteps,sigmas", [
    (1, [999], [14.6146, 0]),
    (2, [999, 499], [14.6146, 1.6129, 0]),
    (4, [999, 749, 499, 249], [14.6146, 4.0817, 1.6129, 0.6932, 0]),
    (8, [999, 874, 749, 624, 499, 374, 249, 124], None),
])
def test_lightning_euler_trailing_golden(steps, timesteps, sigmas):
    schedule = make_schedule(_cfg(timestep_spacing="trailing"), "euler", steps)
    np.testing.assert_array_equal(schedule.timesteps, timesteps)
    if sigmas is not None:
        np.testing.assert_allclose(schedule.sigmas, sigmas, atol=1e-4)
    assert schedule.init_noise_sigma == pytest.approx(14.6146, abs=1e-4)  # sigma_max: trailing spacing


def test_lightning_one_step_x0_model_returns_its_prediction_exactly():
    # 1-step SDXL-Lightning predicts x0 ("sample"): Euler to sigma 0 gives x + (x - x0)/sigma*(0 - sigma) = x0
    cfg = _cfg(timestep_spacing="trailing", prediction_type="sample")
    schedule = make_schedule(cfg, "euler", 1)
    x0 = torch.full(SHAPE, 0.25)
    x = samplers.initial_latents(torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)), schedule)
    (out,) = list(samplers.euler(make_denoiser(lambda s, t: x0, schedule, "sample"), x, schedule))
    assert torch.allclose(out, x0, atol=1e-6)


@pytest.mark.parametrize("steps,timesteps", [
    (1, [999]), (4, [999, 759, 499, 259]), (8, [999, 879, 759, 639, 499, 379, 259, 139]),
])
def test_lcm_golden(steps, timesteps):
    schedule = make_schedule(SchedulerConfig.from_diffusers_json({}), "lcm", steps)
    np.testing.assert_array_equal(schedule.timesteps, timesteps)
    assert abs(schedule.c_skip).max() < 1e-5 and abs(1 - schedule.c_out).max() < 1e-5  # t >= 139


@pytest.mark.parametrize("spacing,timesteps", [("trailing", [999, 749, 499, 249]), ("leading", [751, 501, 251, 1])])
def test_ddim_golden(spacing, timesteps):
    schedule = make_schedule(_cfg(timestep_spacing=spacing), "ddim", 4)
    np.testing.assert_array_equal(schedule.timesteps, timesteps)


def test_ddim_steps_to_t_minus_T_over_N_whatever_the_spacing():
    # trailing N=3: timesteps 999, 666, 332 but the steps land on 666, 333 (not 332), then the final alpha
    schedule = make_schedule(_cfg(timestep_spacing="trailing"), "ddim", 3)
    np.testing.assert_array_equal(schedule.timesteps, [999, 666, 332])
    abar = schedules.alphas_cumprod(_cfg().resolved(sampler_registry.get("ddim").class_defaults), "ddim").numpy()
    landed = np.sqrt((1 - abar[[666, 333, 0]]) / abar[[666, 333, 0]])  # set_alpha_to_one false: abar_0 at the end
    np.testing.assert_allclose(schedule.targets, landed, rtol=1e-6)
    assert schedule.targets[1] != schedule.sigmas[2]


def test_dpmpp_2m_karras_20_golden():
    schedule = make_schedule(_cfg(), "dpmpp_2m", 20, "karras")
    np.testing.assert_array_equal(schedule.timesteps, [999, 962, 921, 876, 827, 772, 710, 640, 561, 474, 380, 285,
                                                       197, 123, 69, 35, 15, 6, 2, 0])
    assert schedule.sigmas[0] == pytest.approx(14.6146, abs=1e-4)
    assert schedule.sigmas[19] == pytest.approx(0.0292, abs=1e-4)
    linspace = make_schedule(_cfg(timestep_spacing="linspace"), "dpmpp_2m", 20)
    assert linspace.timesteps[0] == 999 and linspace.timesteps[-1] == 50 and 500 in linspace.timesteps
    assert set(np.diff(linspace.timesteps)) <= {-49.0, -50.0, -51.0}


@pytest.mark.parametrize("steps,options,orders", [
    (25, {}, (2,) * 24 + (1,)),  # final_sigmas_type zero: last step first order whatever N (diffusers >= 0.26)
    (10, {}, (2,) * 9 + (1,)),
    (20, {"final_sigmas_type": "sigma_min"}, (2,) * 20),  # N >= 15: no lower-order final
    (10, {"final_sigmas_type": "sigma_min"}, (2,) * 9 + (1,)),  # N < 15 and lower_order_final
    (20, {"final_sigmas_type": "sigma_min", "euler_at_final": True}, (2,) * 19 + (1,)),
])
def test_dpm_final_step_order_rule(steps, options, orders):
    # the first step is first order too: the sampler has no history yet
    assert make_schedule(_cfg(**options), "dpmpp_2m", steps).solver_orders == orders


# ---- img2img, inpaint blending, base -> refiner (pipelines' get_timesteps) ----------------------------

def _image_latents(seed: int = 11) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", list(DIFFUSERS))
@pytest.mark.parametrize("steps,strength", [(10, 0.6), (7, 0.3), (4, 1.0)])
def test_img2img_matches_diffusers(sampler, steps, strength):
    config = {**SD, "timestep_spacing": "leading" if sampler in ("ddim", "lcm") else "linspace"}
    theirs, _ = run_diffusers(sampler, config, steps, image=_image_latents(), strength=strength)
    ours, _ = run_sdrt(sampler, config, steps, image=_image_latents(), strength=strength)
    assert_close(ours, theirs)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "ddim", "lcm"])
@pytest.mark.parametrize("steps,strength", [(10, 0.8), (25, 0.33), (3, 0.5), (50, 0.3)])
def test_strength_start_index_equals_img2img_get_timesteps(sampler, steps, strength):
    sched = diffusers_scheduler(sampler, SD)
    sched.set_timesteps(steps)
    host = types.SimpleNamespace(scheduler=sched)
    kept, _ = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(host, steps, strength, "cpu")
    schedule = make_schedule(SchedulerConfig.from_diffusers_json(SD), sampler, steps)
    start = schedules.strength_start_index(schedule, steps, strength)
    assert start == len(sched.timesteps) - len(kept)
    np.testing.assert_array_equal(schedules.from_index(schedule, start).timesteps, kept.numpy().astype(np.float64))


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "ddim"])
@pytest.mark.parametrize("steps,fraction", [(10, 0.8), (25, 0.7), (9, 0.5), (40, 0.85)])
def test_denoising_start_and_end_equal_sdxl_pipelines(sampler, steps, fraction):
    config = {**SDXL, "timestep_spacing": "leading"}
    cfg = SchedulerConfig.from_diffusers_json(config)
    schedule = make_schedule(cfg, sampler, steps)
    # base (StableDiffusionXLPipeline step 8.1): keep timesteps >= cutoff
    sched = diffusers_scheduler(sampler, config)
    sched.set_timesteps(steps)
    cutoff = int(round(1000 - fraction * 1000))
    assert schedules.denoising_end_count(schedule, fraction, cfg) == len([t for t in sched.timesteps if t >= cutoff])
    # refiner (StableDiffusionXLImg2ImgPipeline.get_timesteps with denoising_start)
    host = types.SimpleNamespace(scheduler=sched)
    kept, _ = diffusers.StableDiffusionXLImg2ImgPipeline.get_timesteps(host, steps, 0.3, "cpu",
                                                                       denoising_start=fraction)
    assert schedules.denoising_start_index(schedule, fraction, cfg) == len(sched.timesteps) - len(kept)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "ddim", "euler_a"])
def test_base_to_refiner_hand_off_matches_diffusers(sampler):
    config, steps, split = {**SD, "timestep_spacing": "leading"}, 10, 0.8
    cfg = SchedulerConfig.from_diffusers_json(config)
    # diffusers: base stops at the cutoff, the refiner continues from its latents without re-noising
    stop = schedules.denoising_end_count(make_schedule(cfg, sampler, steps), split, cfg)
    handed, _ = run_diffusers(sampler, config, steps, stop=stop)
    sched = diffusers_scheduler(sampler, config)
    sched.set_timesteps(steps)
    kept, _ = diffusers.StableDiffusionXLImg2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=sched), steps, 0.3, "cpu", denoising_start=split)
    g = torch.Generator().manual_seed(5)
    theirs = handed
    for t in kept:
        out = stand_in(sched.scale_model_input(theirs, t), float(t))
        theirs = _step(sched, out, t, theirs, g)[0]
    # sdrt hands over its sigma-space latent; diffusers' alpha-space samplers hold x / sqrt(1 + sigma^2)
    ours, _ = run_sdrt(sampler, config, steps, stop=stop)
    schedule = make_schedule(cfg, sampler, steps)
    alpha_space = sampler in ("dpmpp_2m", "ddim")
    assert_close(ours / schedules.input_scale(schedule.sigmas[stop]) if alpha_space else ours, handed)
    schedule = schedules.from_index(schedule, schedules.denoising_start_index(schedule, split, cfg))
    g = torch.Generator().manual_seed(5)
    for ours in sampler_registry.get_sampler(sampler)(make_denoiser(stand_in, schedule, cfg.prediction_type), ours, schedule, g):
        pass
    assert_close(ours, theirs)


@pytest.mark.parametrize("sampler", list(DIFFUSERS))
def test_inpaint_blend_sent_back_into_the_sampler_matches_diffusers(sampler):
    # 4-channel inpainting re-imposes the noised original outside the mask after every step; sdrt's caller
    # send()s the blended latent back, diffusers overwrites `latents`
    config = {**SD, "timestep_spacing": "trailing"}
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1.0
    blend = (mask, _image_latents())
    theirs, _ = run_diffusers(sampler, config, 6, blend=blend)
    ours, _ = run_sdrt(sampler, config, 6, blend=blend)
    assert_close(ours, theirs)


# ---- adapter and errors -------------------------------------------------------------------------------

def test_denoiser_pairs_each_sigma_with_its_own_timestep():
    schedule = make_schedule(_cfg(), "heun", 4, "karras")  # interleaved sigmas, fractional timesteps
    pairs = timestep_lookup(schedule)
    assert len(pairs) == 4
    seen = []
    denoise = make_denoiser(lambda x, t: seen.append(t) or x, schedule, "epsilon")
    for sigma in schedule.sigmas[:-1]:
        denoise(torch.zeros(SHAPE), float(sigma))
    assert seen == schedule.timesteps.tolist()
    with pytest.raises(ValueError, match="not an evaluation sigma"):
        denoise(torch.zeros(SHAPE), 1.2345)


def test_v_prediction_x0_identity():
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 at x_alpha = sqrt(abar) x0 + sqrt(1 - abar) eps
    schedule = make_schedule(_cfg(), "euler", 5)
    sigma = float(schedule.sigmas[2])
    abar = 1 / (1 + sigma ** 2)
    x0, eps = _image_latents(1), _image_latents(2)
    v = abar ** 0.5 * eps - (1 - abar) ** 0.5 * x0
    denoise = make_denoiser(lambda x, t: v, schedule, "v_prediction")
    assert torch.allclose(denoise(x0 + sigma * eps, sigma), x0, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: make_schedule(_cfg(), "k_dpm_fast", 4), "choose one of euler, euler_a, heun"),
    (lambda: make_schedule(_cfg(prediction_type="sample"), "euler_a", 4), "euler_a does not support"),
    (lambda: make_schedule(_cfg(), "ddim", 4, "karras"), "karras sigmas are not available for ddim"),
    (lambda: make_schedule(_cfg(), "euler_a", 4, "karras"), "karras sigmas are not available"),
    (lambda: make_schedule(_cfg(thresholding=True), "ddim", 4), "thresholding"),
    (lambda: make_schedule(_cfg(solver_order=3), "dpmpp_2m", 4), "solver_order 3"),
    (lambda: make_schedule(_cfg(rescale_betas_zero_snr=True), "lcm", 4), "rescale_betas_zero_snr"),
    (lambda: make_schedule(_cfg(interpolation_type="log_linear"), "euler", 4), "interpolation_type"),
    (lambda: make_schedule(_cfg(), "lcm", 51), "at most original_inference_steps"),
    (lambda: make_schedule(_cfg(), "euler", 0), "steps must be at least 1"),
    (lambda: _cfg(prediction_type="flow_prediction"), "prediction_type 'flow_prediction'"),
    (lambda: _cfg(timestep_spacing="uniform"), "timestep_spacing 'uniform'"),
    (lambda: make_denoiser(stand_in, make_schedule(_cfg(), "euler", 2), "x0"), "prediction_type 'x0'"),
    (lambda: sampler_registry.get_sampler("dpm_fast"), "unknown sampler 'dpm_fast'"),
    (lambda: schedules.strength_start_index(make_schedule(_cfg(), "euler", 4), 4, 0.1), "runs no step"),
    (lambda: schedules.denoising_start_index(make_schedule(_cfg(), "euler", 4), 1.0), r"denoising_start must be"),
    (lambda: schedules.from_index(make_schedule(_cfg(), "heun", 4), 1), "splits a Heun step"),
])
def test_unsupported_settings_raise_one_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert isinstance(info.value, UserError)  # the CLI prints it as one line
