"""Alpha-space multistep samplers: UniPC, DEIS, DPM-Solver++ singlestep (2S) and DPM-Solver++ third order (3M).

Each equals the diffusers scheduler named in its docstring (diffusers 0.42.1, src/diffusers/schedulers/). These
solvers work in diffusers' alpha space (x_a = alpha x0 + sigma_t eps, alpha = 1/sqrt(1 + sigma^2), sigma_t =
sigma alpha); the sampler keeps that latent (`sample`, exactly what diffusers' scheduler holds), steps it with
diffusers' own float32 arithmetic, and yields it re-expressed in sigma space at the next evaluation's sigma
(x = x_a sqrt(1 + sigma^2); at the end sigma is 0, so the last yield is diffusers' alpha-space latent itself,
e.g. DEIS's latent at sigma_min). A latent sent back (inpainting) replaces `sample` as it replaces diffusers'
`latents`. The scalar coefficients (alpha, sigma_t, lambda = log alpha - log sigma_t, the B(h) / phi_k and rho
terms, DEIS's log-rho integrals) are computed from the float32 sigmas exactly as diffusers computes them (torch
float32 0-d tensors; numpy's float32 log where diffusers calls np.log), so only the latent arithmetic differs by
float32 rounding.

The registry picks up SPECS (runtime/samplers/registry.py). SPECS is built on first access (PEP 562 module
`__getattr__`) because it needs SamplerSpec from the registry, which itself imports this module while it loads;
importing this module first therefore works too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

from sdrt.runtime.samplers.noise import randn_like
from sdrt.runtime.samplers.spec import SamplerSpec, check_dpm
from sdrt.runtime.samplers.schedules import (Schedule, ScheduleError, SchedulerConfig, _alpha_space_init,
    _spaced_dpm, _train_sigmas, alphas_cumprod, convert_sigmas, dpm_multistep, input_scale, sigma_to_t)

__all__ = ["unipc", "deis", "dpmpp_2s", "dpmpp_2s_sde", "dpmpp_3m", "dpmpp_3m_sde", "unipc_schedule",
           "deis_schedule", "singlestep_schedule", "dpm3_schedule"]


# ---- shared: diffusers' scalars and the alpha-space loop ---------------------------------------------------

class _Scalars:
    """alpha, sigma_t and lambda of every sigma diffusers' scheduler steps through (its self.sigmas from the start
    index: the evaluation sigmas, then the last target), as float32 0-d tensors computed like
    `_sigma_to_alpha_sigma_t` and `torch.log(alpha) - torch.log(sigma_t)`."""

    def __init__(self, schedule: Schedule):
        n = len(schedule.timesteps)
        sigmas = np.concatenate([schedule.sigmas[:n], schedule.targets[-1:]]).astype(np.float32)
        self.sigma = [torch.tensor(float(v), dtype=torch.float32) for v in sigmas]
        self.alpha = [1 / ((s ** 2 + 1) ** 0.5) for s in self.sigma]
        self.sigma_t = [s * a for s, a in zip(self.sigma, self.alpha)]
        self.lam = [torch.log(a) - torch.log(s) for a, s in zip(self.alpha, self.sigma_t)]


def _needs(schedule: Schedule, solver: str) -> None:
    if schedule.extra.get("solver") != solver or not schedule.solver_orders:
        raise ScheduleError(f"this schedule was not made for a {solver} sampler; build it with make_schedule(...) "
                            f"for that sampler")


def _to_alpha(x: torch.Tensor, sigma) -> torch.Tensor:
    return x / input_scale(sigma)  # what the denoiser feeds the UNet, i.e. diffusers' latent


def _alpha_loop(denoise, x: torch.Tensor, schedule: Schedule, step) -> Iterator[torch.Tensor]:
    """Run `step(i, x0, sample) -> next alpha-space sample` over the schedule, yielding in sigma space."""
    n = len(schedule.timesteps)
    x = x.float()
    sample = _to_alpha(x, schedule.sigmas[0])
    for i in range(n):
        x0 = denoise(x, float(schedule.sigmas[i]))
        sample = step(i, x0, sample)
        scale = input_scale(schedule.sigmas[i + 1])  # 1.0 after the last step (sigmas[n] = 0)
        x = sample * scale if scale != 1.0 else sample
        sent = yield x
        if sent is not None and sent is not x:  # callers may send back the very latent they got
            x = sent.float()
            sample = _to_alpha(x, schedule.sigmas[i + 1])


def _np_log(v: torch.Tensor) -> torch.Tensor:
    # diffusers' DEIS calls np.log on 0-d torch tensors: numpy's float32 log (not always torch.log's last bit)
    return torch.tensor(np.log(v.numpy()), dtype=torch.float32)


# ---- UniPC ---------------------------------------------------------------------------------------------------

def _unipc_rho_terms(sc: _Scalars, t: int, s0: int, history: list[int], outs: list[torch.Tensor], m0, order: int,
                     variant: str, corrector: bool):
    """The shared part of diffusers' multistep_uni_p_bh_update / multistep_uni_c_bh_update (predict_x0=True)."""
    h = sc.lam[t] - sc.lam[s0]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (sc.lam[history[k - 1]] - sc.lam[s0]) / h
        rks.append(rk)
        d1s.append((outs[-(k + 1)] - m0) / rk)
    rks.append(torch.ones(()))
    rks = torch.stack(rks)
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rhos = None
    if (corrector and order > 1) or (not corrector and order > 2):  # solved rhos (diffusers: torch.linalg.solve)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        r, b = [], []
        for k in range(1, order + 1):
            r.append(torch.pow(rks, k - 1))
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        r, b = torch.stack(r), torch.stack(b)
        rhos = torch.linalg.solve(r, b) if corrector else torch.linalg.solve(r[:-1, :-1], b[:-1])
    elif corrector or order == 2:
        rhos = torch.ones(1) * 0.5
    d1s = torch.stack(d1s, dim=1) if d1s else None
    return h_phi_1, b_h, rhos, d1s


def _unipc(denoise, x, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    _needs(schedule, "unipc")
    variant = schedule.solver_type
    if variant not in ("bh1", "bh2"):
        raise ScheduleError(f"UniPC solver_type {variant!r} is not supported; choose bh1 or bh2")
    sc = _Scalars(schedule)
    outs: list[torch.Tensor] = []
    state = {"last": None, "order": 0}

    def step(i, x0, sample):
        if i > 0 and state["last"] is not None:  # UniC: correct the current sample with the new output
            order, last = state["order"], state["last"]
            m0 = outs[-1]
            h_phi_1, b_h, rhos, d1s = _unipc_rho_terms(sc, i, i - 1, [i - (k + 1) for k in range(1, order)],
                                                       outs, m0, order, variant, corrector=True)
            x_t_ = sc.sigma_t[i] / sc.sigma_t[i - 1] * last - sc.alpha[i] * h_phi_1 * m0
            d1_t = x0 - m0
            if d1s is not None:
                corr_res = torch.einsum("k,bkc...->bc...", rhos[:-1], d1s)
                sample = x_t_ - sc.alpha[i] * b_h * (corr_res + rhos[-1] * d1_t)
            else:
                sample = x_t_ - sc.alpha[i] * b_h * (rhos[-1] * d1_t)
        outs.append(x0)
        del outs[:-3]
        order = min(schedule.solver_orders[i], i + 1)  # lower_order_final cap, then the warm-up
        state["order"], state["last"] = order, sample
        # UniP predictor from the (corrected) sample
        m0 = outs[-1]
        h_phi_1, b_h, rhos, d1s = _unipc_rho_terms(sc, i + 1, i, [i - k for k in range(1, order)], outs, m0,
                                                   order, variant, corrector=False)
        x_t_ = sc.sigma_t[i + 1] / sc.sigma_t[i] * sample - sc.alpha[i + 1] * h_phi_1 * m0
        if d1s is None:
            # diffusers subtracts alpha_t * B(h) * 0 here, which is NaN for bh1 on the step to sigma 0
            # (alpha_t * B(h) = -inf); the limit, and diffusers' value everywhere else, is x_t_ itself
            return x_t_
        pred_res = torch.einsum("k,bkc...->bc...", rhos, d1s)
        return x_t_ - sc.alpha[i + 1] * b_h * pred_res

    return _alpha_loop(denoise, x, schedule, step)


def unipc(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers UniPCMultistepScheduler (predict_x0, bh1 or bh2 as the schedule says, UniC corrector on every step
    after the first, lower_order_final): the corrector re-integrates the previous step with the new model output
    (the UNet is not re-run), then the predictor steps on. No noise."""
    return _unipc(denoise, x, schedule, generator)


# ---- DEIS ----------------------------------------------------------------------------------------------------

def _deis_ind2(t, b, c):
    return t * (-_np_log(c) + _np_log(t) - 1) / (_np_log(b) - _np_log(c))


def _deis_ind3(t, b, c, d):
    lc, ld, lt, lb = _np_log(c), _np_log(d), _np_log(t), _np_log(b)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt ** 2 - 2 * lt + 2)
    return numerator / ((lb - lc) * (lb - ld))


def deis(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers DEISMultistepScheduler (algorithm deis, log-rho): epsilon multistep of order <= 3 in rho = sigma.

    diffusers ends DEIS at sigma_min (the training schedule's smallest sigma, or the last karras/exponential/beta
    sigma), not at 0: its pipelines decode that latent, and so the last yield is diffusers' alpha-space latent
    there (schedule.targets[-1] = sigma_min, schedule.sigmas[-1] = 0). No noise.
    """
    _needs(schedule, "deis")
    sc = _Scalars(schedule)
    rho = [s / a for s, a in zip(sc.sigma_t, sc.alpha)]
    eps: list[torch.Tensor] = []

    def step(i, x0, sample):
        eps.append((sample - sc.alpha[i] * x0) / sc.sigma_t[i])  # diffusers' convert_model_output
        del eps[:-3]
        order = min(schedule.solver_orders[i], i + 1)
        a_t = sc.alpha[i + 1]
        if order == 1:
            h = sc.lam[i + 1] - sc.lam[i]
            return (a_t / sc.alpha[i]) * sample - (sc.sigma_t[i + 1] * (torch.exp(h) - 1.0)) * eps[-1]
        if order == 2:
            r_t, r0, r1 = rho[i + 1], rho[i], rho[i - 1]
            coef1 = _deis_ind2(r_t, r0, r1) - _deis_ind2(r0, r0, r1)
            coef2 = _deis_ind2(r_t, r1, r0) - _deis_ind2(r0, r1, r0)
            return a_t * (sample / sc.alpha[i] + coef1 * eps[-1] + coef2 * eps[-2])
        r_t, r0, r1, r2 = rho[i + 1], rho[i], rho[i - 1], rho[i - 2]
        coef1 = _deis_ind3(r_t, r0, r1, r2) - _deis_ind3(r0, r0, r1, r2)
        coef2 = _deis_ind3(r_t, r1, r2, r0) - _deis_ind3(r0, r1, r2, r0)
        coef3 = _deis_ind3(r_t, r2, r0, r1) - _deis_ind3(r0, r2, r0, r1)
        return a_t * (sample / sc.alpha[i] + coef1 * eps[-1] + coef2 * eps[-2] + coef3 * eps[-3])

    return _alpha_loop(denoise, x, schedule, step)


# ---- DPM-Solver++ updates (data prediction), shared by the singlestep and the multistep third order ----------

def _dpm_first(sc: _Scalars, t: int, s: int, sample, m, noise):
    h = sc.lam[t] - sc.lam[s]
    a_t, s_t = sc.alpha[t], sc.sigma_t[t]
    if noise is None:
        return (s_t / sc.sigma_t[s]) * sample - (a_t * (torch.exp(-h) - 1.0)) * m
    return ((s_t / sc.sigma_t[s] * torch.exp(-h)) * sample + (a_t * (1 - torch.exp(-2.0 * h))) * m
            + s_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)


def _dpm_second(sc: _Scalars, t: int, s0: int, s1: int, anchor: int, sample, d0, d1, h, solver_type, noise):
    """The second-order DPM-Solver++ combination (x at `anchor`, D0, D1, h over anchor -> t), both solver types."""
    a_t, s_t = sc.alpha[t], sc.sigma_t[t]
    if noise is None:
        if solver_type == "midpoint":
            return ((s_t / sc.sigma_t[anchor]) * sample - (a_t * (torch.exp(-h) - 1.0)) * d0
                    - 0.5 * (a_t * (torch.exp(-h) - 1.0)) * d1)
        return ((s_t / sc.sigma_t[anchor]) * sample - (a_t * (torch.exp(-h) - 1.0)) * d0
                + (a_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1)
    if solver_type == "midpoint":
        return ((s_t / sc.sigma_t[anchor] * torch.exp(-h)) * sample + (a_t * (1 - torch.exp(-2.0 * h))) * d0
                + 0.5 * (a_t * (1 - torch.exp(-2.0 * h))) * d1 + s_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)
    return ((s_t / sc.sigma_t[anchor] * torch.exp(-h)) * sample + (a_t * (1 - torch.exp(-2.0 * h))) * d0
            + (a_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
            + s_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)


# ---- DPM-Solver++ singlestep (2S) ----------------------------------------------------------------------------

def _singlestep(denoise, x, schedule: Schedule, generator, sde: bool) -> Iterator[torch.Tensor]:
    _needs(schedule, "dpm_singlestep")
    sc = _Scalars(schedule)
    outs: list[torch.Tensor] = []
    anchor = {"sample": None}

    def step(i, x0, sample):
        outs.append(x0)
        del outs[:-2]
        noise = randn_like(sample, generator, torch.float32) if sde else None  # every step, after the output
        order = min(schedule.solver_orders[i], i + 1)  # the order list, lowered while history is missing
        if order == 1:
            anchor["sample"] = sample
            return _dpm_first(sc, i + 1, i, sample, outs[-1], noise)
        # second order from the group's anchor at i - 1, with the outputs at i - 1 and i
        m0, m1 = outs[-1], outs[-2]
        h, h_0 = sc.lam[i + 1] - sc.lam[i - 1], sc.lam[i] - sc.lam[i - 1]
        r0 = h_0 / h
        d0, d1 = m1, (1.0 / r0) * (m0 - m1)
        return _dpm_second(sc, i + 1, i, i - 1, i - 1, anchor["sample"], d0, d1, h, schedule.solver_type, noise)

    return _alpha_loop(denoise, x, schedule, step)


def dpmpp_2s(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers DPMSolverSinglestepScheduler(algorithm_type="dpmsolver++", solver_order=2): steps are grouped in
    pairs by its order list; the first of a pair is a first-order step that sets the anchor, the second
    re-integrates from the anchor with both outputs. No noise."""
    return _singlestep(denoise, x, schedule, generator, sde=False)


def dpmpp_2s_sde(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2): as dpmpp_2s with
    the SDE update; one float32 noise draw per step (per image with a list of generators)."""
    return _singlestep(denoise, x, schedule, generator, sde=True)


# ---- DPM-Solver++ multistep, third order (3M) ----------------------------------------------------------------

def _dpm3(denoise, x, schedule: Schedule, generator, sde: bool) -> Iterator[torch.Tensor]:
    _needs(schedule, "dpm_multistep3")
    sc = _Scalars(schedule)
    outs: list[torch.Tensor] = []

    def step(i, x0, sample):
        outs.append(x0)
        del outs[:-3]
        noise = randn_like(sample, generator, torch.float32) if sde else None  # every step, float32
        order = min(schedule.solver_orders[i], i + 1)
        if order > 1 and bool(sc.lam[i + 1] == sc.lam[i]):
            # a karras schedule ending on sigma_min twice (final_sigmas_type "sigma_min"): the step is the identity.
            # diffusers' second-order update gets there too (D1 = 0); its third-order update divides 0 by 0 (NaN)
            order = 1
        if order == 1:
            return _dpm_first(sc, i + 1, i, sample, outs[-1], noise)
        m0, m1 = outs[-1], outs[-2]
        if order == 2:
            h, h_0 = sc.lam[i + 1] - sc.lam[i], sc.lam[i] - sc.lam[i - 1]
            r0 = h_0 / h
            d0, d1 = m0, (1.0 / r0) * (m0 - m1)
            return _dpm_second(sc, i + 1, i, i - 1, i, sample, d0, d1, h, schedule.solver_type, noise)
        m2 = outs[-3]
        h, h_0, h_1 = sc.lam[i + 1] - sc.lam[i], sc.lam[i] - sc.lam[i - 1], sc.lam[i - 1] - sc.lam[i - 2]
        r0, r1 = h_0 / h, h_1 / h
        d0 = m0
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        a_t, s_t, s_s0 = sc.alpha[i + 1], sc.sigma_t[i + 1], sc.sigma_t[i]
        if noise is None:
            return ((s_t / s_s0) * sample - (a_t * (torch.exp(-h) - 1.0)) * d0
                    + (a_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
                    - (a_t * ((torch.exp(-h) - 1.0 + h) / h ** 2 - 0.5)) * d2)
        return ((s_t / s_s0 * torch.exp(-h)) * sample + (a_t * (1.0 - torch.exp(-2.0 * h))) * d0
                + (a_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
                + (a_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
                + s_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)

    return _alpha_loop(denoise, x, schedule, step)


def dpmpp_3m(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers DPMSolverMultistepScheduler(solver_order=3, algorithm_type="dpmsolver++"). No noise."""
    return _dpm3(denoise, x, schedule, generator, sde=False)


def dpmpp_3m_sde(denoise, x: torch.Tensor, schedule: Schedule, generator=None) -> Iterator[torch.Tensor]:
    """diffusers DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++"): one float32 noise
    draw per step (per image with a list of generators). Not k-diffusion's sample_dpmpp_3m_sde (A1111): that one
    uses BrownianTree noise and a different D2 coefficient (reference/customization.md §5)."""
    return _dpm3(denoise, x, schedule, generator, sde=True)


# ---- schedules -------------------------------------------------------------------------------------------------

def _without_zero_snr(cfg: SchedulerConfig, abar: torch.Tensor, sampler: str) -> torch.Tensor:
    # DEIS and DPMSolverSinglestep have no rescale_betas_zero_snr: from_config drops the key
    return alphas_cumprod(replace(cfg, rescale_betas_zero_snr=False), sampler) if cfg.rescale_betas_zero_snr else abar


def _alpha_sigmas(cfg: SchedulerConfig, abar: torch.Tensor, n: int, last_t: int, round_karras: bool):
    """(sigmas [n] float64, timesteps [n] float64 before the int64 cast, train sigmas) as set_timesteps builds them;
    converted sigmas span the whole training table (multistep solvers), with cfg.sigma_min/max if set."""
    train = _train_sigmas(abar)
    t = _spaced_dpm(cfg, n, last_t)
    kind = cfg.sigma_conversion
    if kind is None:
        return np.interp(t, np.arange(0, len(train)), train), t, train, False
    sig = convert_sigmas(kind, cfg, train[::-1], n)
    t = sigma_to_t(sig, train)
    if kind == "karras" and round_karras:
        t = t.round()
    return sig, t, train, True


def _schedule(sig, last: float, t, cfg: SchedulerConfig, orders, solver: str, solver_type: str) -> Schedule:
    full = np.concatenate([sig, [last]]).astype(np.float32)
    t = t.astype(np.int64)  # torch .to(int64) truncates like numpy (exponential / beta timesteps are not rounded)
    return Schedule(sigmas=np.concatenate([full[:-1], [0.0]]).astype(np.float32), timesteps=t.astype(np.float64),
                    init_noise_sigma=_alpha_space_init(full[0]), targets=full[1:].copy(), solver_orders=tuple(orders),
                    solver_type=solver_type, num_train_timesteps=cfg.num_train_timesteps, extra={"solver": solver})


def unipc_schedule(cfg: SchedulerConfig, abar: torch.Tensor, n: int, variant: str) -> Schedule:
    """UniPCMultistepScheduler.set_timesteps: spacing over all training steps (no lambda clipping), karras
    timesteps rounded (whatever the beta schedule), exponential/beta ones truncated; final sigma 0, or sigma_min
    (the training table's, or the last converted sigma)."""
    sig, t, train, converted = _alpha_sigmas(cfg, abar, n, cfg.num_train_timesteps, round_karras=True)
    last = 0.0
    if cfg.final_sigmas_type == "sigma_min":
        last = float(sig[-1]) if converted else float(train[0])
    order = cfg.solver_order
    orders = [min(order, n - i) if cfg.lower_order_final else order for i in range(n)]
    return _schedule(sig, last, t, cfg, orders, "unipc", variant)


def deis_schedule(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    """DEISMultistepScheduler.set_timesteps: like UniPC's, but the class has no final_sigmas_type nor
    rescale_betas_zero_snr: it always ends at sigma_min (the training table's, or the last converted sigma, which
    then is stepped to itself). sigma_min/sigma_max are not __init__ arguments, but from_config keeps a json's
    keys on the config and the conversions read them with hasattr, so they apply (as for every class here)."""
    abar = _without_zero_snr(cfg, abar, "deis")
    sig, t, train, converted = _alpha_sigmas(cfg, abar, n, cfg.num_train_timesteps, round_karras=True)
    last = float(sig[-1]) if converted else float(train[0])
    order, low = cfg.solver_order, cfg.lower_order_final and n < 15
    orders = [1 if order == 1 or (i == n - 1 and low) else 2 if order == 2 or (i == n - 2 and low) else 3
              for i in range(n)]
    return _schedule(sig, last, t, cfg, orders, "deis", "logrho")


def singlestep_order_list(n: int, order: int, lower_order_final: bool, final_sigmas_type: str) -> list[int]:
    """DPMSolverSinglestepScheduler.get_order_list after set_timesteps forced lower_order_final where it does."""
    if not lower_order_final and (n % order != 0 or final_sigmas_type == "zero"):
        lower_order_final = True  # set_timesteps re-registers lower_order_final=True in these cases
    if lower_order_final:
        if order == 3:
            orders = ([1, 2, 3] * (n // 3 - 1) + [1, 2] + [1] if n % 3 == 0 else
                      [1, 2, 3] * (n // 3) + [1] if n % 3 == 1 else [1, 2, 3] * (n // 3) + [1, 2])
        elif order == 2:
            orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
        else:
            orders = [1] * n
    else:
        orders = [1, 2, 3] * (n // 3) if order == 3 else [1, 2] * (n // 2) if order == 2 else [1] * n
    if final_sigmas_type == "zero":
        orders[-1] = 1
    return orders


def singlestep_schedule(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    """DPMSolverSinglestepScheduler.set_timesteps (solver_order 2): always linspace spacing up to the
    lambda-clipped last timestep (timestep_spacing and steps_offset are not read), karras timesteps rounded, final
    sigma 0 or the training sigma_min; no rescale_betas_zero_snr."""
    cfg = replace(cfg, timestep_spacing="linspace", solver_order=2)
    abar = _without_zero_snr(cfg, abar, "dpmpp_2s")
    lam = torch.log(torch.sqrt(abar)) - torch.log(torch.sqrt(1 - abar))
    clipped = int(torch.searchsorted(torch.flip(lam, [0]), cfg.lambda_min_clipped))
    sig, t, train, _ = _alpha_sigmas(cfg, abar, n, cfg.num_train_timesteps - clipped, round_karras=True)
    last = float(train[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
    orders = singlestep_order_list(n, 2, cfg.lower_order_final, cfg.final_sigmas_type)
    return _schedule(sig, last, t, cfg, orders, "dpm_singlestep", _dpm_solver_type(cfg))


def _dpm_solver_type(cfg: SchedulerConfig) -> str:
    # DPMSolver*Scheduler.__init__ maps logrho / bh1 / bh2 to midpoint
    return cfg.solver_type if cfg.solver_type in ("midpoint", "heun") else "midpoint"


def dpm3_schedule(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    """DPMSolverMultistepScheduler(solver_order=3).set_timesteps: runtime/samplers/schedules.py dpm_multistep, with the
    third-order step rule of its step(): first order on the last step when euler_at_final, final_sigmas_type
    "zero" or (lower_order_final and N < 15), second order on the one before when lower_order_final and N < 15."""
    cfg = replace(cfg, solver_order=3, solver_type=_dpm_solver_type(cfg))
    base = dpm_multistep(cfg, abar, n)
    low = cfg.lower_order_final and n < 15
    last_first = cfg.euler_at_final or low or cfg.final_sigmas_type == "zero"
    orders = [1 if i == n - 1 and last_first else 2 if i == n - 2 and low else 3 for i in range(n)]
    return replace(base, solver_orders=tuple(orders), extra={**base.extra, "solver": "dpm_multistep3"})


# ---- checks --------------------------------------------------------------------------------------------------

def _choice(what: str, value, valid) -> None:
    if value not in valid:
        raise ScheduleError(f"{what} {value!r} is not supported; choose one of {', '.join(map(str, valid))}")


def _check_common(cfg: SchedulerConfig, name: str) -> None:
    if cfg.thresholding:
        raise ScheduleError("dynamic thresholding is not supported; set thresholding to false")
    if cfg.use_flow_sigmas or cfg.use_dynamic_shifting:
        raise ScheduleError(f"flow sigmas and dynamic shifting are not supported by {name}; "
                            "use the default, karras, exponential or beta sigmas")


def _check_unipc(cfg: SchedulerConfig) -> None:
    _check_common(cfg, "unipc")
    _choice("solver_order", cfg.solver_order, (1, 2, 3))
    _choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
    if not cfg.lower_order_final and cfg.solver_order > 1 and cfg.final_sigmas_type == "zero":
        raise ScheduleError("UniPC with lower_order_final false steps to sigma 0 with a multistep update, which "
                            "diverges (diffusers returns inf/NaN); set lower_order_final true or "
                            "final_sigmas_type 'sigma_min'")


def _check_deis(cfg: SchedulerConfig) -> None:
    _check_common(cfg, "deis")
    _choice("solver_order", cfg.solver_order, (1, 2, 3))


def _check_singlestep(cfg: SchedulerConfig) -> None:
    _check_common(cfg, "the DPM-Solver singlestep samplers")
    _choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
    if cfg.variance_type in ("learned", "learned_range"):
        raise ScheduleError("learned-variance UNets (6 output channels) are not supported; "
                            "sdrt runs UNets that predict epsilon, v or the sample")


def _check_dpm3(cfg: SchedulerConfig) -> None:
    check_dpm(replace(cfg, solver_order=3, solver_type=_dpm_solver_type(cfg)), orders=(3,))


# ---- registry entries ----------------------------------------------------------------------------------------

# The __init__ defaults of UniPC/DEIS/DPMSolverSinglestep/DPMSolverMultistep for keys a scheduler_config.json may lack
_CLASS_DEFAULTS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", timestep_spacing="linspace")
_CONVERSIONS = ("karras", "exponential", "beta")


def spec(name, run, build, cls, config, **kw):
    return SamplerSpec(name, run, build, cls, config, _CLASS_DEFAULTS, conversions=_CONVERSIONS, **kw)


SPECS = (
    spec("unipc", unipc, lambda c, a, n: unipc_schedule(c, a, n, "bh2"), "UniPCMultistepScheduler",
         {"solver_type": "bh2"}, a1111=("UniPC",), check=_check_unipc,
         description="UniPC (bh2; predictor-corrector, order from the config's solver_order, default 2)"),
    spec("unipc_bh1", unipc, lambda c, a, n: unipc_schedule(c, a, n, "bh1"), "UniPCMultistepScheduler",
         {"solver_type": "bh1"}, check=_check_unipc,
         description="UniPC bh1 (B(h) = h; recommended by UniPC's authors for unconditional sampling). On the "
                     "final step to sigma 0 diffusers 0.42.1 returns NaN (0 * inf); sdrt returns the limit, "
                     "the data prediction"),
    spec("deis", deis, deis_schedule, "DEISMultistepScheduler", {}, check=_check_deis,
         description="DEIS (log-rho multistep, order from the config's solver_order, default 2); like "
                     "diffusers it ends at sigma_min, not 0"),
    spec("dpmpp_2s", dpmpp_2s, singlestep_schedule, "DPMSolverSinglestepScheduler",
         {"algorithm_type": "dpmsolver++", "solver_order": 2}, a1111=("DPM++ 2S a",), check=_check_singlestep,
         description="DPM-Solver++(2S), diffusers' DPMSolverSinglestepScheduler (deterministic). AUTOMATIC1111's "
                     "'DPM++ 2S a' is ancestral; diffusers maps that name to this scheduler ('very similar')"),
    spec("dpmpp_2s_sde", dpmpp_2s_sde, singlestep_schedule, "DPMSolverSinglestepScheduler",
         {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, stochastic=True, check=_check_singlestep,
         description="SDE DPM-Solver++(2S), diffusers' singlestep sde-dpmsolver++, noise from the request's "
                     "generators every step"),
    spec("dpmpp_3m", dpmpp_3m, dpm3_schedule, "DPMSolverMultistepScheduler",
         {"algorithm_type": "dpmsolver++", "solver_order": 3}, check=_check_dpm3,
         description="DPM-Solver++(3M)"),
    spec("dpmpp_3m_sde", dpmpp_3m_sde, dpm3_schedule, "DPMSolverMultistepScheduler",
         {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, a1111=("DPM++ 3M SDE",), stochastic=True,
         check=_check_dpm3,
         description="SDE DPM-Solver++(3M) as diffusers implements it (noise from the request's generators); "
                     "AUTOMATIC1111's (k-diffusion) uses Brownian-tree noise and another D2 coefficient"),
)
