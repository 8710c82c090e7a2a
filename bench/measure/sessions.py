"""Sessions: a backend loaded, its engines timed, ready to run the scenario once.

sdrt's backends are driven through `pipeline.Generation` (its steps yield the latents after each step), so each
step is marked; diffusers is timed the same way, with wrappers around `pipe.text_encoder(_2).forward`,
`pipe.unet.forward` and `pipe.vae.decode`, and `callback_on_step_end` marking the steps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdrt.runtime.errors import UserError

from sdrt.bench.measure.timing import CallRecorder, Clock, Sample, TimedEngine, timed_function
from sdrt.bench.scenarios import Scenario, gpu_present


@dataclass(frozen=True)
class Session:
    run_once: Callable[[], Sample]
    device: str
    load_seconds: float
    notes: str = ""


def _pixels(images) -> object:
    import numpy as np

    first = images[0] if isinstance(images, (list, tuple)) else images
    return np.asarray(first.convert("RGB")) if hasattr(first, "convert") else None


def open_sdrt(scenario: Scenario, backend: str, engine_dir: Path, threads: int) -> Session:
    import torch

    from sdrt.engines.ort import OrtConfig
    from sdrt.runtime.pipeline import Generation, Pipeline, Request

    torch.set_num_threads(threads)  # the sampler's tensor math runs in torch
    clock = Clock(cuda=backend != "ort-cpu")
    started = clock.now()
    pipe = Pipeline.load(engine_dir, backend=backend, ort_config=OrtConfig(intra_op_threads=threads))
    if scenario.cache_interval > 1:  # opened now, so that they are loaded before the clock and timed like the rest
        for name in ("unet_deepcache", "unet_deepcache_shallow"):
            pipe.lazy_engine(name)
    if scenario.vae == "tiny":  # likewise the tiny decoder, which Pipeline.load leaves to first use
        pipe.component("vae_decoder_tiny")
    load_seconds = clock.now() - started
    recorder = CallRecorder()
    pipe.engines = {name: TimedEngine(e, name, recorder, clock) for name, e in pipe.engines.items()}
    request = Request.of(prompt=(scenario.prompt,), steps=scenario.steps, guidance=scenario.guidance,
                      sampler=scenario.sampler, timestep_spacing=scenario.timestep_spacing,
                      prediction_type=scenario.prediction_type, seed=scenario.seed, width=scenario.width,
                      height=scenario.height, images_per_prompt=scenario.batch, vae=scenario.vae,
                      cache_interval=scenario.cache_interval)
    request = pipe.validate(request)

    def run_once() -> Sample:
        recorder.calls.clear()
        marks: list[int] = []
        start = clock.now()
        run = Generation(pipe, request)
        for _ in run.steps():
            marks.append(recorder.count("unet"))
        images = run.finish(run.decode())
        end_to_end = clock.now() - start
        return Sample(end_to_end, tuple(recorder.calls), tuple(marks), _pixels(images))

    device = "cpu" if backend == "ort-cpu" else "cuda"
    return Session(run_once, device, load_seconds, f"ONNX Runtime intra-op threads {threads}"
                   if backend.startswith("ort") else "")


def open_diffusers(scenario: Scenario, source_dir: Path, threads: int, compiled: bool,
                   tiny_dir: Path | None = None) -> Session:
    import diffusers
    import torch

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass
    torch.set_num_threads(threads)
    gpu = gpu_present()
    device = "cuda" if gpu else "cpu"
    dtype = torch.float16 if scenario.precision == "fp16" else torch.float32
    clock = Clock(cuda=gpu)
    started = clock.now()
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only the first
        warnings.simplefilter("ignore", FutureWarning)
        pipe = diffusers.DiffusionPipeline.from_pretrained(source_dir, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler(pipe.scheduler.config, scenario)
    notes = f"torch threads {threads}, {scenario.precision}, {type(pipe.scheduler).__name__}"
    if scenario.vae == "tiny":  # as the tiny VAE's authors show it: pipe.vae = AutoencoderTiny.from_pretrained(...)
        if tiny_dir is None:
            raise UserError("--vae tiny with a diffusers backend needs the tiny VAE folder the engine directory "
                            "was exported from (its manifest's tiny_vae location), and none exists here")
        pipe.vae = diffusers.AutoencoderTiny.from_pretrained(tiny_dir, torch_dtype=dtype).to(device)
        notes += ", AutoencoderTiny as pipe.vae"
    if scenario.cache_interval > 1:  # the DeepCache package's helper, as its README applies it
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError:
            raise UserError("--cache-interval with a diffusers backend needs the DeepCache package "
                            "(pip install DeepCache)") from None
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=scenario.cache_interval, cache_branch_id=0)
        helper.enable()
        notes += f", DeepCacheSDHelper(cache_interval={scenario.cache_interval}, cache_branch_id=0)"
    denoiser = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"  # SD3, FLUX.1
    if compiled:  # torch.compile default mode; compilation happens in the warm-up runs
        getattr(pipe, denoiser).forward = torch.compile(getattr(pipe, denoiser).forward)
        pipe.vae.decode = torch.compile(pipe.vae.decode)
        notes += f", torch.compile (default mode) of {denoiser}.forward and vae.decode"
    load_seconds = clock.now() - started
    recorder = CallRecorder()
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.forward = timed_function(module.forward, name, recorder, clock)
    getattr(pipe, denoiser).forward = timed_function(getattr(pipe, denoiser).forward, denoiser, recorder, clock)
    pipe.vae.decode = timed_function(pipe.vae.decode, "vae_decoder_tiny" if scenario.vae == "tiny" else "vae_decoder",
                                     recorder, clock)
    kwargs = dict(prompt=scenario.prompt, num_inference_steps=scenario.steps, guidance_scale=scenario.guidance,
                  height=scenario.height, width=scenario.width, num_images_per_prompt=scenario.batch,
                  output_type="pil")

    def run_once() -> Sample:
        recorder.calls.clear()
        marks: list[int] = []

        def on_step(_pipe, _i, _t, callback_kwargs):
            marks.append(recorder.count("unet"))
            return callback_kwargs

        start = clock.now()
        generators = [torch.Generator().manual_seed(scenario.seed + i) for i in range(scenario.batch)]  # per-image seeds
        images = pipe(**kwargs, generator=generators, callback_on_step_end=on_step).images
        end_to_end = clock.now() - start
        return Sample(end_to_end, tuple(recorder.calls), tuple(marks), _pixels(images))

    return Session(run_once, device, load_seconds, notes)


def diffusers_scheduler(config, scenario: Scenario):
    """The diffusers scheduler that matches sdrt's sampler, spacing and prediction type."""
    import diffusers

    from sdrt.runtime.samplers.registry import get

    spec = get(scenario.sampler)
    name, kwargs = spec.diffusers_class, dict(spec.diffusers_config)
    overrides = dict(kwargs)
    if scenario.timestep_spacing:
        overrides["timestep_spacing"] = scenario.timestep_spacing
    if scenario.prediction_type:
        overrides["prediction_type"] = scenario.prediction_type
    return getattr(diffusers, name).from_config(config, **overrides)
