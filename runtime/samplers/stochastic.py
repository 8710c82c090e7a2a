"""The discrete samplers with noise of their own: TCD (its gamma, `eta`) and DPM++ SDE (torchsde's Brownian tree).
Each equals the diffusers scheduler named in its docstring (diffusers 0.42.1, src/diffusers/schedulers/
scheduling_*.py; ../shared/reference/customization.md §5); same interface and conventions as
runtime/samplers/discrete.py, whose helpers they use.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

from sdrt.runtime.samplers.discrete import (K_BETAS, abar_without_zero_snr, init_sigma, interpolated, randn,
    refuse_sample, yield_alpha)
from sdrt.runtime.samplers.schedules import (SIGMA_CONVERSIONS, Schedule, ScheduleError, SchedulerConfig,
    _alpha_space_init, _train_sigmas, convert_sigmas, sigma_to_t)
from sdrt.runtime.samplers.spec import SamplerSpec, original_steps_limit


# ---- TCD ----------------------------------------------------------------------------------------------------

def build_tcd(cfg: SchedulerConfig, abar: torch.Tensor, n: int, eta: float = 0.0) -> Schedule:
    """TCDScheduler.set_timesteps (strength 1): LCM's grid of original_inference_steps, N evenly spaced indices.

    extra["eta"] is TCD's gamma (`step(eta=...)`); the SD pipelines pass their `eta`, default 0.0
    (deterministic). Use `with_eta(schedule, 0.3)` for TCD's own recommendation.
    """
    t_count, original = cfg.num_train_timesteps, cfg.original_inference_steps
    if original > t_count:
        raise ScheduleError(f"original_inference_steps ({original}) cannot exceed num_train_timesteps ({t_count})")
    if n > original:
        raise ScheduleError(f"TCD runs at most original_inference_steps ({original}) steps, not {n}")
    _check_eta(eta)
    origin = (np.arange(1, original + 1) * (t_count // original) - 1)[::-1].copy()
    t = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    train = _train_sigmas(abar)
    sigmas = np.concatenate([train[t], [0.0]]).astype(np.float32)
    prev = np.concatenate([t[1:], [0]]).astype(np.int64)  # the last step lands on t = 0 (abar_0, not 1)
    return Schedule(sigmas=sigmas, timesteps=t.astype(np.float64), init_noise_sigma=_alpha_space_init(sigmas[0]),
                    targets=train[prev].astype(np.float32), num_train_timesteps=t_count,
                    extra={"tcd_abar": abar, "tcd_prev": prev, "eta": float(eta)})


def _check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ScheduleError(f"TCD's eta (gamma) must be in [0, 1] (got {eta})")


def with_eta(schedule: Schedule, eta: float) -> Schedule:
    """A TCD schedule with another eta (gamma): 0 deterministic, > 0 re-noises every step but the last."""
    if "tcd_prev" not in schedule.extra:
        raise ScheduleError("eta applies to tcd schedules only")
    _check_eta(eta)
    return replace(schedule, extra={**schedule.extra, "eta": float(eta)})


def tcd(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers TCDScheduler.step(eta=gamma): x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps at s = floor((1-gamma)
    t_prev); with gamma > 0 (and not on the last step) forward-noised back to t_prev with a fresh draw."""
    ex = schedule.extra
    if "tcd_prev" not in ex:
        raise ScheduleError("this schedule was not made for tcd; build it with make_schedule(..., 'tcd', ...)")
    eta = float(ex.get("eta", 0.0))
    _check_eta(eta)
    abar = ex["tcd_abar"]
    n = len(schedule.timesteps)
    x = x.float()
    for i in range(n):
        sigma = schedule.sigmas[i]
        x0 = denoise(x, float(sigma))
        eps = (x - x0) / float(sigma)
        prev = torch.tensor(int(ex["tcd_prev"][i]))
        s = torch.floor((1 - eta) * prev).to(dtype=torch.long)
        a_prev, a_s = abar[prev], abar[s]
        x_a = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
        if eta > 0 and i != n - 1:
            noise = randn(x_a, generator)
            x_a = (a_prev / a_s).sqrt() * x_a + (1 - a_prev / a_s).sqrt() * noise
        nxt = schedule.sigmas[i + 1]
        x = yield_alpha(x_a, nxt)
        sent = yield x
        if sent is not None:
            x = sent


def _check_tcd(cfg: SchedulerConfig) -> None:
    # TCDScheduler.step applies neither clip_sample nor thresholding: diffusers ignores them, so does sdrt
    if cfg.rescale_betas_zero_snr:
        raise ScheduleError("rescale_betas_zero_snr puts the first tcd sigma at infinity; "
                            "use euler, euler_a or dpmpp_2m with it")


# ---- DPM++ SDE (DPMSolverSDEScheduler) -----------------------------------------------------------------------

def _torchsde():
    try:
        import torchsde
    except ImportError:
        raise ScheduleError("dpmpp_sde draws its noise from torchsde's Brownian tree, as diffusers does: "
                            "pip install torchsde (or choose dpmpp_2m_sde / euler_a)") from None
    return torchsde


def _check_sde(cfg: SchedulerConfig) -> None:
    refuse_sample("dpmpp_sde")(cfg)
    _torchsde()


def build_dpmpp_sde(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    """DPMSolverSDEScheduler.set_timesteps: evaluations [s0, m0, s1, m1, ..., s_{N-1}], m_k the midpoint in
    t = -log sigma (float32 as step() computes it), its timestep from the float64 midpoint. Per evaluation,
    extra holds step()'s float32 coefficients: x' = ratio x - expm1 x0 + noise(n_from, n_to) up (stage 0, 1),
    or Euler to 0 (stage 2); tree_lo/hi: the Brownian tree's range over the whole schedule."""
    train = _train_sigmas(abar_without_zero_snr(cfg, "dpmpp_sde"))
    t, sig = interpolated(cfg, train, n, float64=True)
    kind = cfg.sigma_conversion
    if kind is not None:  # karras (copied from LMS) ignores config sigma_min/max; exponential and beta read them
        sig = convert_sigmas(kind, replace(cfg, sigma_min=None, sigma_max=None) if kind == "karras" else cfg, sig, n)
        t = sigma_to_t(sig, train)
    lt = -np.log(sig)  # _second_order_timesteps, float64
    t_mid = sigma_to_t(np.exp(-(lt[:-1] + np.diff(lt) * 0.5)), train)
    s = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    sig_ev, ts, stage, ratio, em1, up, n_from, n_to = [], [], [], [], [], [], [], []

    def ancestral(t_from: torch.Tensor, t_to: torch.Tensor):
        sigma_from, sigma_to = t_from.neg().exp(), t_to.neg().exp()
        u = min(sigma_to, (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
        t_down = ((sigma_to ** 2 - u ** 2) ** 0.5).log().neg()
        return t_down.neg().exp() / t_from.neg().exp(), (t_from - t_down).expm1(), u, sigma_from, sigma_to

    for k in range(n - 1):
        t_k, t_next = s[k].log().neg(), s[k + 1].log().neg()
        t_prop = t_k + (t_next - t_k) * 0.5
        for half, (sigma_eval, t_to, timestep) in enumerate(((s[k], t_prop, t[k]),
                                                             (t_prop.neg().exp(), t_next, t_mid[k]))):
            r, e, u, a, b = ancestral(t_k, t_to)
            sig_ev.append(sigma_eval); ts.append(timestep); stage.append(half)
            ratio.append(r); em1.append(e); up.append(u); n_from.append(a); n_to.append(b)
    sig_ev.append(s[n - 1]); ts.append(t[n - 1]); stage.append(2)
    for arr in (ratio, em1, up, n_from, n_to):
        arr.append(torch.tensor(0.0))
    f32 = (lambda v: np.array([float(a) for a in v], dtype=np.float32))
    sigmas = np.concatenate([f32(sig_ev), [0.0]]).astype(np.float32)
    landed = [s[k // 2 + 1] if k % 2 else sig_ev[k + 1] for k in range(len(ts) - 1)] + [0.0]
    positive = s[s > 0]
    extra = {"stage": np.array(stage, dtype=np.int64), "ratio": f32(ratio), "expm1": f32(em1), "up": f32(up),
             "n_from": f32(n_from), "n_to": f32(n_to),
             "tree_lo": float(positive.min()), "tree_hi": float(s.max())}
    return Schedule(sigmas=sigmas, timesteps=np.array(ts, dtype=np.float64),
                    init_noise_sigma=init_sigma(cfg, sigmas.max()), targets=f32(landed), order=2,
                    num_train_timesteps=cfg.num_train_timesteps, extra=extra)


class _BrownianNoise:
    """diffusers' BrownianTreeNoiseSampler (torchsde.BrownianInterval, tol 1e-6, pool 24, halfway tree).

    One tree per image, seeded with that image's generator seed (`initial_seed()`), each the shape of one
    image: image i equals diffusers run alone with noise_sampler_seed = its seed. A single generator seeds one
    tree over the batch (diffusers with that noise_sampler_seed); None draws the seed from torch's global RNG
    as diffusers does when noise_sampler_seed is None.
    """

    def __init__(self, torchsde, x: torch.Tensor, lo: float, hi: float, generator):
        t0, t1 = torch.as_tensor(lo), torch.as_tensor(hi)
        t0, t1, self.sign = (t0, t1, 1.0) if t0 < t1 else (t1, t0, -1.0)
        if generator is None or isinstance(generator, torch.Generator):
            seeds = [generator.initial_seed() if generator is not None
                     else torch.randint(0, 2 ** 63 - 1, []).item()]
            shape = tuple(x.shape)
        else:
            if len(generator) != x.shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}; "
                                 "give one generator per image")
            seeds = [g.initial_seed() for g in generator]
            shape = (1, *x.shape[1:])
        self.trees = [torchsde.BrownianInterval(t0=t0, t1=t1, size=shape, dtype=x.dtype, device=x.device,
                                                entropy=seed, tol=1e-6, pool_size=24, halfway_tree=True)
                      for seed in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b, sign = (sigma, sigma_next, 1.0) if sigma < sigma_next else (sigma_next, sigma, -1.0)
        with warnings.catch_warnings():  # sigma_fn(t_fn(sigma)) may leave the range by an ulp: torchsde clamps
            warnings.simplefilter("ignore")
            w = torch.cat([tree(a, b) * (self.sign * sign) for tree in self.trees])
        return w / (sigma_next - sigma).abs().sqrt()


def dpmpp_sde(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers DPMSolverSDEScheduler (k-diffusion sample_dpmpp_sde, r = 1/2): two ancestral exponential half
    steps per interval with Brownian-tree noise, Euler to sigma 0 at the end."""
    ex = schedule.extra
    if "tree_lo" not in ex:
        raise ScheduleError("this schedule was not made for dpmpp_sde; build it with make_schedule(..., "
                            "'dpmpp_sde', ...)")
    torchsde = _torchsde()
    x = x.float()
    noise = stored = None
    for i in range(len(schedule.timesteps)):
        sigma = schedule.sigmas[i]
        x0 = denoise(x, float(sigma))
        if ex["stage"][i] == 2:
            x = x + (x - x0) / float(sigma) * float(np.float32(0) - sigma)
        else:
            if ex["stage"][i] == 0:
                stored = start = x
            else:
                start, stored = stored, None
            moved = float(ex["ratio"][i]) * start - float(ex["expm1"][i]) * x0
            if noise is None:  # diffusers makes its tree on the first step, from that step's sample
                noise = _BrownianNoise(torchsde, x, ex["tree_lo"], ex["tree_hi"], generator)
            z = noise(torch.tensor(ex["n_from"][i]), torch.tensor(ex["n_to"][i]))
            x = moved + z * 1.0 * float(ex["up"][i])
        sent = yield x
        if sent is not None:
            x = sent


# ---- registry entries -----------------------------------------------------------------------------------------

_SIGMA_SPACE = dict(timestep_spacing="linspace")
SPECS = (
    SamplerSpec("tcd", tcd, build_tcd, "TCDScheduler",
                class_defaults=dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False),
                stochastic=True, check=_check_tcd, step_limit=original_steps_limit, eta=(),
                description="trajectory consistency distillation; eta (gamma) 0 as the pipelines pass it"),
    SamplerSpec("dpmpp_sde", dpmpp_sde, build_dpmpp_sde, "DPMSolverSDEScheduler",
                class_defaults={**K_BETAS, **_SIGMA_SPACE}, a1111=("DPM++ SDE",), stochastic=True,
                conversions=SIGMA_CONVERSIONS, check=_check_sde,
                description="DPM++ SDE (k-diffusion sample_dpmpp_sde), Brownian-tree noise per image seed; "
                            "needs torchsde"),
)
