"""Noise schedules: exactly the timesteps and sigmas diffusers' schedulers build in `set_timesteps`.

Formulas restated from ../shared/reference/fewstep_perf.md §1.4-1.5 (diffusers 0.42.1, schedulers/ and the
SD/SDXL img2img pipelines' `get_timesteps`). Everything lives in sigma space (k-diffusion convention
x = x0 + sigma*eps). The alpha-space schedulers (DDIM, LCM, DPM-Solver: x_a = sqrt(abar)*x0 + sqrt(1-abar)*eps)
are expressed there through x = x_a / sqrt(abar), sigma = sqrt((1 - abar) / abar), so one denoiser serves all.

The arithmetic follows diffusers' dtypes (training schedule in torch float32, spacing in numpy) so that the
arrays are bit-identical, not merely close.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Mapping

import numpy as np
import torch

from sdrt.runtime.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Sigma schedules a request may choose (reference/customization.md §5): "default" keeps the model's config;
# karras / exponential / beta replace the sigmas (diffusers' use_*_sigmas); sgm_uniform and its alias simple are
# diffusers' timestep_spacing "trailing" (its scheduler overview table).
SIGMA_SCHEDULES = ("default", "karras", "exponential", "beta", "sgm_uniform", "simple")
SIGMA_CONVERSIONS = ("karras", "exponential", "beta")

class ScheduleError(UserError, ValueError):
    """An unsupported scheduler setting or sampler choice; the message names the valid choices."""


def _choice(what: str, value, valid) -> None:
    if value not in valid:
        raise ScheduleError(f"{what} {value!r} is not supported; choose one of {', '.join(map(str, valid))}")


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler settings a diffusers `scheduler_config.json` carries.

    None means "absent from the json": the default of the diffusers class behind the chosen sampler applies
    (diffusers' `from_config` drops keys listed in `_use_default_values`, so the target class decides them).
    """

    num_train_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None  # linear | scaled_linear | squaredcos_cap_v2
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample
    timestep_spacing: str | None = None  # leading | trailing | linspace
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    # EulerDiscrete / Heun / DPM-Solver sigma options
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    # DPMSolverMultistep
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    use_dynamic_shifting: bool = False
    # DDIM / LCM / Heun
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    thresholding: bool = False
    # LCM
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    # flow matching (FlowMatchEulerDiscreteScheduler; runtime/samplers/flow.py)
    shift: float = 1.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    invert_sigmas: bool = False
    stochastic_sampling: bool = False
    mu: float | None = None  # dynamic shifting: set per request from the packed image sequence length
    pipeline_sigmas: bool = False  # the family's pipeline passes linspace(1, 1/N, N) sigmas (Flux), SD3's none
    # EDM (EDMEulerScheduler, EDMDPMSolverMultistepScheduler): set only by EDM configs
    sigma_data: float | None = None
    sigma_schedule: str | None = None  # karras | exponential
    rho: float = 7.0

    def __post_init__(self):
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing is not None:
            _choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        if self.beta_schedule is not None and self.trained_betas is None:
            _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)

    @classmethod
    def from_diffusers_json(cls, d: Mapping) -> "SchedulerConfig":
        """From a diffusers scheduler_config.json dict of any scheduler class (PNDM, Euler, DDIM, LCM, DPM, ...)."""
        defaulted = set(d.get("_use_default_values", ()))
        known = {f.name: f for f in fields(cls)}
        given = {k: v for k, v in d.items() if k in known and k not in defaulted and v is not None}
        if "trained_betas" in given:
            given["trained_betas"] = tuple(float(b) for b in given["trained_betas"])
        if given.get("solver_type") in ("logrho", "bh1", "bh2"):  # DPMSolverMultistepScheduler.__init__ remaps these
            given["solver_type"] = "midpoint"
        for k in ("num_train_timesteps", "steps_offset", "solver_order", "original_inference_steps",
                  "base_image_seq_len", "max_image_seq_len"):
            if k in given:
                given[k] = int(given[k])
        return cls(**given)

    def resolved(self, class_defaults: Mapping) -> "SchedulerConfig":
        """This config with the absent keys set to `class_defaults` (those of the sampler's diffusers class)."""
        absent = {k: v for k, v in class_defaults.items() if getattr(self, k, None) is None}
        return replace(self, **absent)

    @property
    def sigma_conversion(self) -> str | None:
        """karras | exponential | beta when the config asks for converted sigmas (diffusers allows one), else None."""
        chosen = [k for k, on in (("karras", self.use_karras_sigmas), ("exponential", self.use_exponential_sigmas),
                                  ("beta", self.use_beta_sigmas)) if on]
        if len(chosen) > 1:
            raise ScheduleError(f"the scheduler config asks for {' and '.join(chosen)} sigmas; diffusers allows one")
        return chosen[0] if chosen else None

    def with_sigma_schedule(self, name: str) -> "SchedulerConfig":
        """This config with a request's sigma schedule applied (SIGMA_SCHEDULES)."""
        _choice("schedule", name, SIGMA_SCHEDULES)
        if name == "default":
            return self
        if name in ("sgm_uniform", "simple"):
            return replace(self, timestep_spacing="trailing")
        return replace(self, use_karras_sigmas=name == "karras", use_exponential_sigmas=name == "exponential",
                       use_beta_sigmas=name == "beta")


@dataclass(frozen=True, eq=False)
class Schedule:
    """What a sampler needs for n model evaluations (Heun: 2*steps - 1), all in sigma space.

    A step i evaluates the model at sigmas[i] (timestep timesteps[i]) and lands on targets[i]. targets equals
    sigmas[1:] except for DDIM (diffusers steps to t - T//N, which is not always the next timestep) and
    DPM-Solver's final_sigmas_type "sigma_min"; the alpha-space samplers then re-express the landed latent at
    the next evaluation's scale (x * sqrt((1 + sigmas[i+1]**2) / (1 + targets[i]**2))), which is exactly
    diffusers' alpha-space latent when sigmas[i+1] is the closing 0.
    """

    sigmas: np.ndarray  # float32 [n+1]: sigma of each evaluation, then 0.0
    timesteps: np.ndarray  # float64 [n]: the value diffusers feeds the UNet at each evaluation
    init_noise_sigma: float  # txt2img start: x = randn * init_noise_sigma (sigma space)
    targets: np.ndarray  # float32 [n]
    order: int = 1  # diffusers' scheduler.order: evaluations per step (Heun 2)
    solver_orders: tuple[int, ...] = ()  # DPM-Solver: highest order step i may use (lower_order_final rule)
    solver_type: str = "midpoint"  # DPM-Solver second-order update: midpoint | heun
    clip_sample: float | None = None  # clamp x0 to [-v, v] (DDIM, LCM, Heun clip_sample)
    c_skip: np.ndarray | None = None  # LCM boundary condition per step, float32 [n]
    c_out: np.ndarray | None = None
    num_train_timesteps: int = 1000
    # EDM preconditioning (Karras et al. 2022, Table 1, as diffusers' EDM schedulers): the UNet is fed
    # x / sqrt(sigma^2 + sigma_data^2) at timestep 0.25 ln(sigma) and x0 = c_skip x + c_out F (runtime/denoiser/x0.py);
    # None: the variance-preserving UNets' x / sqrt(sigma^2 + 1) and eps / v / sample outputs
    sigma_data: float | None = None
    # flow matching (runtime/samplers/flow.py): the latent is (1 - s) x0 + s noise, the model is fed it unscaled at
    # timestep s·T and predicts the velocity (x0 = x - s v)
    flow: bool = False
    # Whatever else one sampler's schedule builder hands to its sampler (name → value). Arrays with one entry
    # per evaluation ([n]) are cut by from_index like the fields above; anything else is passed as is.
    extra: Mapping = field(default_factory=dict)


def num_steps(schedule: Schedule) -> int:
    """Number of model evaluations (= sampler yields) in the schedule."""
    return len(schedule.timesteps)


def from_index(schedule: Schedule, start: int) -> Schedule:
    """The schedule from evaluation `start` on (img2img, refiner): diffusers' `set_begin_index(start)`."""
    n = num_steps(schedule)
    if not 0 <= start < n:
        raise ScheduleError(f"start index {start} leaves no step to run; the schedule has {n} evaluations")
    if start % schedule.order:
        raise ScheduleError(f"start index {start} splits a Heun step; it must be a multiple of {schedule.order}")
    if start == 0:
        return schedule
    cut = (lambda a: None if a is None else a[start:])
    extra = {k: v[start:] if isinstance(v, (np.ndarray, tuple)) and len(v) == n else v
             for k, v in schedule.extra.items()}
    return replace(schedule, sigmas=schedule.sigmas[start:], timesteps=schedule.timesteps[start:],
                   targets=schedule.targets[start:], solver_orders=schedule.solver_orders[start:],
                   c_skip=cut(schedule.c_skip), c_out=cut(schedule.c_out), extra=extra)


# ---- training schedule -------------------------------------------------------------------------------

def _cosine_betas(t_count: int) -> torch.Tensor:
    # diffusers betas_for_alpha_bar(alpha_transform_type="cosine", max_beta=0.999)
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - abar((i + 1) / t_count) / abar(i / t_count), 0.999) for i in range(t_count)],
                        dtype=torch.float32)


def _zero_snr(betas: torch.Tensor) -> torch.Tensor:
    # diffusers rescale_zero_terminal_snr (arXiv 2305.08891, Algorithm 1): shift sqrt(abar) to end at 0, keep start
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def alphas_cumprod(cfg: SchedulerConfig, sampler: str) -> torch.Tensor:
    """abar_t, float32 [T], for a config resolved for `sampler`."""
    t_count = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, t_count, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, t_count, dtype=torch.float32) ** 2
    else:
        betas = _cosine_betas(t_count)
    zero_snr = cfg.rescale_betas_zero_snr and sampler != "heun"  # HeunDiscreteScheduler has no such option
    if zero_snr:
        betas = _zero_snr(betas)
    abar = torch.cumprod(1.0 - betas, dim=0)
    if zero_snr:
        abar[-1] = 2.0 ** -24  # diffusers keeps the last sigma finite (fp16's smallest subnormal)
    return abar


def _train_sigmas(abar: torch.Tensor) -> np.ndarray:
    return (((1 - abar) / abar) ** 0.5).numpy()  # float32 [T], ascending in t


# ---- spacing -----------------------------------------------------------------------------------------

def _spaced(cfg: SchedulerConfig, n: int, dtype) -> np.ndarray:
    """Euler/EulerA/Heun (float32, linspace not rounded) and DDIM (int64) timestep spacing, descending."""
    t_count = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        if dtype == np.int64:
            return np.linspace(0, t_count - 1, n).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, t_count - 1, n, dtype=np.float32)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        t = (np.arange(0, n) * (t_count // n)).round()[::-1].copy().astype(dtype)
        return t + dtype(cfg.steps_offset)  # float32 + float32 / int64 + int64
    return np.arange(t_count, 0, -(t_count / n)).round().astype(dtype) - dtype(1)  # trailing


def _spaced_dpm(cfg: SchedulerConfig, n: int, last: int) -> np.ndarray:
    """DPMSolverMultistep spacing (int64): N+1 points with the last dropped, up to the lambda-clipped last t."""
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + cfg.steps_offset
    return np.arange(last, 0, -(cfg.num_train_timesteps / n)).round().astype(np.int64) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: rho-spaced from sigma_max to sigma_min, float64 [n]."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma: linear in log-sigma between neighbouring training steps (float64)."""
    log_train = np.log(train_sigmas)
    log_s = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_train, log_s, side="right") - 1, 0, len(log_train) - 2)
    w = np.clip((log_train[low] - log_s) / (log_train[low] - log_train[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """diffusers _convert_to_exponential: log-uniform from sigma_max to sigma_min, float64 [n]."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (modified Lentz), float64 to ~1e-16."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below the mean; use the symmetry above it
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of I_x(a, b) (scipy.stats.beta.ppf), by bisection to the last float64 bit."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _incomplete_beta(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """diffusers _convert_to_beta (Lee et al. 2024, arXiv 2407.12173): sigma_min + ppf(1 - u) (sigma_max - sigma_min)."""
    return np.array([sigma_min + beta_ppf(float(q), alpha, beta) * (sigma_max - sigma_min)
                     for q in 1 - np.linspace(0, 1, n)])


def convert_sigmas(kind: str, cfg: SchedulerConfig, ends: np.ndarray, n: int) -> np.ndarray:
    """karras | exponential | beta sigmas between the config's sigma_min/max, else the ends of `ends` (descending)."""
    lo = cfg.sigma_min if cfg.sigma_min is not None else float(ends[-1])
    hi = cfg.sigma_max if cfg.sigma_max is not None else float(ends[0])
    return {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}[kind](lo, hi, n)


def input_scale(sigma: float) -> float:
    """sqrt(sigma^2 + 1) in float32 as diffusers computes it (torch pow, which can differ from numpy by 1 ulp)."""
    s = torch.tensor(float(sigma), dtype=torch.float32)
    return float((s ** 2 + 1) ** 0.5)


def _alpha_space_init(sigma0: np.float32) -> float:
    # diffusers starts alpha-space samplers at randn * 1.0; in sigma space that is randn * sqrt(1 + sigma0^2)
    return input_scale(sigma0)


# ---- one builder per sampler family ------------------------------------------------------------------

def euler_family(cfg: SchedulerConfig, abar: torch.Tensor, n: int, sampler: str) -> Schedule:
    # diffusers EulerDiscreteScheduler / EulerAncestralDiscreteScheduler / HeunDiscreteScheduler.set_timesteps
    train = _train_sigmas(abar)
    t = _spaced(cfg, n, np.float32)
    sig = np.interp(t, np.arange(0, len(train)), train)
    kind = cfg.sigma_conversion
    if kind is not None:  # the interpolated sigmas' ends bound the converted ones (Euler-type schedulers)
        sig = convert_sigmas(kind, cfg, sig, n)
        t = sigma_to_t(sig, train)
    final = 0.0
    if sampler == "euler" and cfg.final_sigmas_type == "sigma_min":
        final = float(train[0])
    sigmas = np.concatenate([sig, [final]]).astype(np.float32)
    if sampler == "euler" and cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
        t = np.array([float(0.25 * torch.tensor(s).log()) for s in sigmas[:-1]], dtype=np.float32)  # EDM c_noise
    t = t.astype(np.float32)
    if sampler == "heun":  # every sigma after the first is evaluated twice (predictor, corrector)
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        t = np.concatenate([t[:1], np.repeat(t[1:], 2)])
    top = sigmas.max()
    init = float(top) if cfg.timestep_spacing in ("linspace", "trailing") else input_scale(top)
    targets = sigmas[1:].copy()
    eval_sigmas = sigmas.copy()
    eval_sigmas[-1] = 0.0
    clip = cfg.clip_sample_range if sampler == "heun" and cfg.clip_sample else None
    return Schedule(sigmas=eval_sigmas, timesteps=t.astype(np.float64), init_noise_sigma=init,
                    targets=targets, order=2 if sampler == "heun" else 1, clip_sample=clip,
                    num_train_timesteps=cfg.num_train_timesteps)


def dpm_multistep(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    # diffusers DPMSolverMultistepScheduler.set_timesteps
    train = _train_sigmas(abar)
    lam = torch.log(torch.sqrt(abar)) - torch.log(torch.sqrt(1 - abar))
    clipped = int(torch.searchsorted(torch.flip(lam, [0]), cfg.lambda_min_clipped))
    last = cfg.num_train_timesteps - clipped
    t = _spaced_dpm(cfg, n, last)
    kind = cfg.sigma_conversion
    if kind is not None:  # the whole training table's ends bound the converted sigmas (multistep solvers)
        sig = convert_sigmas(kind, cfg, train[::-1], n)
        t = sigma_to_t(sig, train)
        if kind == "karras" and cfg.beta_schedule != "squaredcos_cap_v2":
            t = t.round()
    else:
        sig = np.interp(t, np.arange(0, len(train)), train)
    final = float(train[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
    full = np.concatenate([sig, [final]]).astype(np.float32)
    t = t.astype(np.int64)  # torch .to(int64) truncates like numpy
    steps = len(t)
    last_first_order = (cfg.euler_at_final or (cfg.lower_order_final and steps < 15)
                        or cfg.final_sigmas_type == "zero")
    orders = tuple(1 if cfg.solver_order == 1 or (i == steps - 1 and last_first_order) else 2 for i in range(steps))
    return Schedule(sigmas=np.concatenate([full[:-1], [0.0]]).astype(np.float32), timesteps=t.astype(np.float64),
                    init_noise_sigma=_alpha_space_init(full[0]), targets=full[1:].copy(), solver_orders=orders,
                    solver_type=cfg.solver_type, num_train_timesteps=cfg.num_train_timesteps)


# Zero terminal SNR (rescale_betas_zero_snr): DDIMScheduler keeps alphas_cumprod[-1] = 0, an infinite sigma. The
# sigma-space loop holds it as 2**60: the start x = noise * 2**60 (sqrt(1 + 2**120) is 2**60 in float32), the UNet
# input x / 2**60 is the noise itself (a power of two: exact), v → x0 gives -v (the x / (sigma^2 + 1) term, ~1e-18,
# is below float32's resolution of x0) and DDIM's eps = (x - x0) / sigma is the noise, as in diffusers' alpha space.
ZERO_SNR_SIGMA = 2.0 ** 60


def ddim(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    # diffusers DDIMScheduler.set_timesteps / step (eta = 0)
    t_count = cfg.num_train_timesteps
    if n > t_count:
        raise ScheduleError(f"DDIM runs at most num_train_timesteps ({t_count}) steps, not {n}")
    if cfg.rescale_betas_zero_snr:
        if cfg.prediction_type != "v_prediction":  # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) divides by 0
            raise ScheduleError("rescale_betas_zero_snr needs a v_prediction model (its last timestep has no signal "
                                f"to recover with {cfg.prediction_type}); diffusers would produce NaN")
        abar = abar.clone()
        abar[-1] = 0.0
    train = _train_sigmas(abar)
    train = np.where(np.isinf(train), np.float32(ZERO_SNR_SIGMA), train).astype(np.float32)
    t = _spaced(cfg, n, np.int64)
    final_abar = torch.tensor(1.0) if cfg.set_alpha_to_one else abar[0]
    prev = t - t_count // n  # diffusers steps to t - T//N whatever the spacing
    abar_prev = torch.stack([abar[p] if p >= 0 else final_abar for p in prev])
    targets = (((1 - abar_prev) / abar_prev) ** 0.5).numpy().astype(np.float32)
    sigmas = np.concatenate([train[t], [0.0]]).astype(np.float32)
    return Schedule(sigmas=sigmas, timesteps=t.astype(np.float64), init_noise_sigma=_alpha_space_init(sigmas[0]),
                    targets=targets, clip_sample=cfg.clip_sample_range if cfg.clip_sample else None,
                    num_train_timesteps=t_count)


def lcm(cfg: SchedulerConfig, abar: torch.Tensor, n: int) -> Schedule:
    # diffusers LCMScheduler.set_timesteps (strength 1) / get_scalings_for_boundary_condition_discrete
    t_count, original = cfg.num_train_timesteps, cfg.original_inference_steps
    if original > t_count:
        raise ScheduleError(f"original_inference_steps ({original}) cannot exceed num_train_timesteps ({t_count})")
    if n > original:
        raise ScheduleError(f"LCM runs at most original_inference_steps ({original}) steps, not {n}")
    origin = (np.arange(1, original + 1) * (t_count // original) - 1)[::-1].copy()
    t = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    train = _train_sigmas(abar)
    sigmas = np.concatenate([train[t], [0.0]]).astype(np.float32)
    scaled = torch.from_numpy(t) * cfg.timestep_scaling  # float32
    c_skip = 0.25 / (scaled ** 2 + 0.25)  # sigma_data = 0.5
    c_out = scaled / (scaled ** 2 + 0.25) ** 0.5
    return Schedule(sigmas=sigmas, timesteps=t.astype(np.float64), init_noise_sigma=_alpha_space_init(sigmas[0]),
                    targets=sigmas[1:].copy(), clip_sample=cfg.clip_sample_range if cfg.clip_sample else None,
                    c_skip=c_skip.numpy(), c_out=c_out.numpy(), num_train_timesteps=t_count)



def scheduler_config(model_json: Mapping, timestep_spacing: str | None = None,
                     prediction_type: str | None = None) -> SchedulerConfig:
    """A model's scheduler_config.json with a request's overrides (few-step presets set "trailing" spacing,
    SDXL-Lightning 1-step predicts the sample)."""
    overrides = {}
    if timestep_spacing:
        overrides["timestep_spacing"] = timestep_spacing
    if prediction_type:
        overrides["prediction_type"] = prediction_type
    return SchedulerConfig.from_diffusers_json({**model_json, **overrides})

# ---- img2img and base/refiner windows ----------------------------------------------------------------

def strength_start_index(schedule: Schedule, steps: int, strength: float) -> int:
    """First evaluation index for img2img: diffusers' StableDiffusion(XL)Img2ImgPipeline.get_timesteps."""
    if not 0 < strength <= 1:
        raise ScheduleError(f"strength must be in (0, 1] (got {strength})")
    if schedule.flow:  # StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline.get_timesteps: steps·strength not floored
        return int(max(steps - min(steps * strength, steps), 0)) * schedule.order
    init_timestep = min(int(steps * strength), steps)
    if init_timestep < 1:
        raise ScheduleError(f"strength {strength} with {steps} steps runs no step; int(steps * strength) must be >= 1")
    return max(steps - init_timestep, 0) * schedule.order


def _cutoff(fraction: float, what: str, cfg: SchedulerConfig | None, schedule: Schedule) -> int:
    if not 0 < fraction < 1:
        raise ScheduleError(f"{what} must be in (0, 1) (got {fraction})")
    t_count = cfg.num_train_timesteps if cfg is not None else schedule.num_train_timesteps
    return int(round(t_count - fraction * t_count))


def denoising_start_index(schedule: Schedule, denoising_start: float, cfg: SchedulerConfig | None = None) -> int:
    """First evaluation index for an SDXL refiner started at `denoising_start` (StableDiffusionXLImg2ImgPipeline)."""
    cutoff = _cutoff(denoising_start, "denoising_start", cfg, schedule)
    remaining = int((schedule.timesteps < cutoff).sum())
    if schedule.order == 2 and remaining % 2 == 0:  # never start between a Heun predictor and its corrector
        remaining += 1
    return num_steps(schedule) - remaining


def denoising_end_count(schedule: Schedule, denoising_end: float, cfg: SchedulerConfig | None = None) -> int:
    """Evaluations an SDXL base runs before handing over at `denoising_end` (timesteps >= the cutoff)."""
    cutoff = _cutoff(denoising_end, "denoising_end", cfg, schedule)
    return int((schedule.timesteps >= cutoff).sum())
