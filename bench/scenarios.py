"""What one `sdrt bench` run measures: the scenario (model, shapes, sampler, backends) and the harness settings.

Presets follow the models' authors (runtime/samplers/presets.py, reference/fewstep_perf.md §1.1-1.2) and the
protocol of fewstep_perf.md §2.5: batch 1, guidance off for the few-step models, warm-up excluded.
Everything here is cheap to import: no torch, no diffusers.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from sdrt.runtime.errors import UserError

SDRT_BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt")
DIFFUSERS_BACKENDS = ("diffusers", "diffusers-compile")
BACKENDS = SDRT_BACKENDS + DIFFUSERS_BACKENDS
# full-size, random weights, built by sdrt.bench.fullsize; the transformer families at full width (bench/fullsize_flow.py:
# FLUX.1's transformer and T5-XXL at reduced depth, as bench/configs/*.json say)
ARCHITECTURES = ("sd15", "sd21", "sdxl", "sd35m", "flux-schnell")
PRECISIONS = ("fp32", "fp16")
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"

@dataclass(frozen=True)
class BenchPreset:
    sampler: str
    timestep_spacing: str | None
    steps: int
    guidance: float
    model: str  # architecture benchmarked when no MODEL is given
    size_gpu: int
    size_cpu: int
    prediction_type: str | None = None


PRESETS = {
    # SDXL-Lightning: Euler, trailing, no guidance; 1-step checkpoint predicts x0 (runtime/samplers/presets.py)
    "lightning-4step": BenchPreset("euler", "trailing", 4, 0.0, "sdxl", 1024, 512),
    "lightning-1step": BenchPreset("euler", "trailing", 1, 0.0, "sdxl", 1024, 512, prediction_type="sample"),
    # SDXL-Turbo: Euler ancestral, trailing, 1 step, no guidance, trained at 512²
    "turbo": BenchPreset("euler_a", "trailing", 1, 0.0, "sdxl", 512, 512),
    # SD 1.5 as most people run it: 25 steps with classifier-free guidance 7.5 (UNet batch doubles)
    "sd15-classic": BenchPreset("euler", None, 25, 7.5, "sd15", 512, 512),
    # FLUX.1-schnell: flow-match Euler, 4 steps, no guidance input (runtime/samplers/presets.py flux-schnell)
    "flux-schnell": BenchPreset("flow_euler", None, 4, 0.0, "flux-schnell", 1024, 512),
    # SD3.5 Large Turbo's recipe (4 steps, guidance 0) on SD3.5-medium's architecture: Large (8 B) does not fit here
    "sd35-turbo": BenchPreset("flow_euler", None, 4, 0.0, "sd35m", 1024, 512),
}


@dataclass(frozen=True)
class Scenario:
    name: str  # preset name, used in the results folder's name
    model: str  # an engine directory, or one of ARCHITECTURES
    width: int
    height: int
    steps: int
    sampler: str
    timestep_spacing: str | None  # None: the model's own
    prediction_type: str | None  # None: the model's own
    guidance: float  # <= 1: off (UNet at batch B), else batched cond+uncond (2B)
    batch: int  # images per run (one prompt, images_per_prompt = batch)
    precision: str
    backends: tuple[str, ...]
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    vae: str = "full"  # full | tiny: every backend decodes with the tiny VAE (diffusers: pipe.vae = AutoencoderTiny)
    cache_interval: int = 1  # step caching (DeepCache branch 0) in every backend (diffusers: DeepCacheSDHelper)

    @property
    def is_architecture(self) -> bool:
        return self.model in ARCHITECTURES

    def as_dict(self) -> dict:
        return dict(self.__dict__, backends=list(self.backends))


@dataclass(frozen=True)
class HarnessConfig:
    warmup: int = 1
    runs: int = 5
    threads: int = 0  # 0: physical cores; ORT intra-op threads = torch threads
    workdir: Path = Path("build/bench")  # random-weight folders, their exports, the FLOP-count cache
    isolate: bool = True  # each backend in its own process: clean peak RSS, no shared thread pools
    interleave: bool = False  # all backends in this process, timed runs alternating: a drifting machine hits all alike
    alternate: bool = False  # timed runs alternating as with interleave, each in a fresh process after its own warm-up
    peak_matmul_size: int = 2048


Progress = Callable[[str, int, int], None]  # (what, done, total); total 0: a one-off message


def silent(what: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class Overrides:
    """What the command line gave; None means the preset's value."""

    model: str | None = None
    resolution: str | None = None
    steps: int | None = None
    sampler: str | None = None
    guidance: float | None = None
    batch: int = 1
    precision: str | None = None
    backends: tuple[str, ...] = ()
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    vae: str = "full"
    cache_interval: int = 1


VAES = ("full", "tiny")


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_resolution(text: str) -> tuple[int, int]:
    """'512' → (512, 512); '768x512' → (768, 512) as (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", text)
    if not match:
        raise UserError(f"--resolution must be N or WIDTHxHEIGHT, e.g. 512 or 768x512 (got {text!r})")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise UserError(f"width and height must be positive multiples of 8 (got {width}x{height})")
    return width, height


def split_backends(values: tuple[str, ...]) -> tuple[str, ...]:
    """Repeated --backend options and comma-separated lists, in order, without duplicates."""
    out: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return tuple(out)


def backend_unavailable(backend: str, gpu: bool) -> str | None:
    """None when `backend` can run on this machine, else the reason it cannot."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}"
    if backend == "ort-cuda":
        import onnxruntime as ort

        if not gpu or "CUDAExecutionProvider" not in ort.get_available_providers():
            return "backend ort-cuda needs a CUDA GPU and onnxruntime-gpu"
    if backend == "tensorrt" and not (gpu and importlib.util.find_spec("tensorrt") is not None):
        return "backend tensorrt needs a CUDA GPU and TensorRT"
    if backend == "diffusers-compile" and not gpu:
        return "backend diffusers-compile (torch.compile) is benchmarked on a GPU only; this machine has none"
    if backend in DIFFUSERS_BACKENDS and importlib.util.find_spec("diffusers") is None:
        return f"backend {backend} needs diffusers (pip install 'sdrt[export]')"
    return None


def default_backends(gpu: bool) -> tuple[str, ...]:
    """All that run here, but TensorRT only when asked for: it needs plans built for the scenario's shapes."""
    wanted = ("ort-cuda", "diffusers", "diffusers-compile") if gpu else ("ort-cpu", "diffusers")
    return tuple(b for b in wanted if backend_unavailable(b, gpu) is None)


def resolve(preset_name: str, o: Overrides, gpu: bool | None = None) -> Scenario:
    """Preset + command-line overrides → a checked Scenario; bad input raises UserError."""
    if preset_name not in PRESETS:
        raise UserError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    gpu = gpu_present() if gpu is None else gpu
    size = preset.size_gpu if gpu else preset.size_cpu
    width, height = parse_resolution(o.resolution) if o.resolution else (size, size)
    model = o.model or preset.model
    if model not in ARCHITECTURES and not Path(model).is_dir():
        raise UserError(f"{model} is neither an engine directory nor an architecture ({', '.join(ARCHITECTURES)})")
    backends = split_backends(o.backends) or default_backends(gpu)
    for backend in backends:
        reason = backend_unavailable(backend, gpu)
        if reason:
            raise UserError(reason)
    if not backends:
        raise UserError("no backend can run on this machine")
    precision = o.precision or ("fp16" if gpu else "fp32")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose fp32 or fp16")
    sampler = o.sampler or preset.sampler
    from sdrt.runtime.samplers.registry import resolve

    sampler, _ = resolve(sampler)
    steps = preset.steps if o.steps is None else o.steps
    if steps < 1:
        raise UserError(f"--steps must be at least 1 (got {steps})")
    if o.batch < 1:
        raise UserError(f"--batch must be at least 1 (got {o.batch})")
    guidance = preset.guidance if o.guidance is None else o.guidance
    if o.vae not in VAES:
        raise UserError(f"--vae must be full or tiny (got {o.vae!r})")
    if o.cache_interval < 1:
        raise UserError(f"--cache-interval must be at least 1 (1 = off; got {o.cache_interval})")
    return Scenario(name=preset_name, model=model, width=width, height=height, steps=steps, sampler=sampler,
                    timestep_spacing=preset.timestep_spacing,
                    prediction_type=preset.prediction_type,
                    guidance=guidance, batch=o.batch, precision=precision, backends=backends, prompt=o.prompt,
                    seed=o.seed, vae=o.vae, cache_interval=o.cache_interval)


def check_config(c: HarnessConfig) -> HarnessConfig:
    if c.runs < 1:
        raise UserError(f"--runs must be at least 1 (got {c.runs})")
    if c.warmup < 0:
        raise UserError(f"--warmup must be 0 or more (got {c.warmup})")
    if c.threads < 0:
        raise UserError(f"--threads must be 0 (physical cores) or more (got {c.threads})")
    if c.interleave and c.alternate:
        raise UserError("--interleave and --alternate are two ways to alternate the backends' runs; pick one "
                        "(--alternate, a process per run, when the backends do not fit in memory together)")
    return c


def with_threads(c: HarnessConfig) -> HarnessConfig:
    """Resolve threads = 0 to the number of physical cores (ONNX Runtime's and torch's own default)."""
    if c.threads:
        return c
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return replace(c, threads=cores or os.cpu_count() or 1)
