"""The benchmark harness behind `sdrt bench`: sdrt's backends and diffusers on one scenario, stage by stage.

Timing happens here, never in runtime/: the harness drives `Pipeline.denoise` (a generator yielding the
latents after each step) and wraps every engine in a proxy that records each call's duration, so a run
splits into text encoding, each UNet step, VAE decode, and the runtime's own overhead (end to end minus
engine time: tokenizer, conditioning, sampler math, image conversion). diffusers is timed the same way,
with wrappers around `pipe.text_encoder(_2).forward`, `pipe.unet.forward` and `pipe.vae.decode`, and
`callback_on_step_end` marking the steps. On a GPU every clock reading synchronizes the device first,
which covers work on any stream (ONNX Runtime's, TensorRT's, torch's).

By default each backend runs in a child process (`python -m sdrt.bench.harness SPEC`): its peak RSS is its
own, and thread pools and allocator caches of one backend do not leak into the next. On a machine whose speed
drifts, backends measured one after the other see different machines: `interleave` loads all of them in this
process and alternates their timed runs; `alternate` does the same with a fresh child process per run, for
models two backends cannot hold in memory together.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from sdrt.runtime.errors import UserError

from sdrt.bench.scenarios import DIFFUSERS_BACKENDS, HarnessConfig, Scenario, check_config, gpu_present, with_threads

SCHEMA = "sdrt-bench/1"
STAGE_OF = {"text_encoder": "text_encoding", "text_encoder_2": "text_encoding", "unet": "unet",
            "vae_decoder": "vae_decode", "vae_decoder_tiny": "vae_decode",
            "unet_deepcache": "unet", "unet_deepcache_shallow": "unet"}  # step caching: both graphs are UNet time
STAGES = ("text_encoding", "unet", "vae_decode", "runtime_overhead", "end_to_end")
_PREFIX = "SDRT-BENCH "  # marks the worker's protocol lines on its stdout

Progress = Callable[[str, int, int], None]  # (what, done, total); total 0: a one-off message


def _silent(what: str, done: int, total: int) -> None:
    pass


# ---- clocks and recorders ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clock:
    cuda: bool = False

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass(frozen=True)
class EngineCall:
    component: str  # text_encoder | text_encoder_2 | unet | vae_decoder
    batch: int  # leading dimension of the call's main input (input_ids, sample, latent_sample)
    seconds: float


@dataclass
class CallRecorder:
    calls: list[EngineCall] = field(default_factory=list)

    def count(self, component: str) -> int:
        """Calls of a stage's components (\"unet\": the UNet and the step-caching graphs)."""
        return sum(1 for c in self.calls if STAGE_OF.get(c.component, c.component) == component)


def _batch_of(values) -> int:
    """Leading dimension of the first tensor argument of rank ≥ 1."""
    for v in values:
        shape = getattr(v, "shape", None)
        if shape is not None and len(shape) >= 1:
            return int(shape[0])
    return 1


class TimedEngine:
    """An Engine that records the duration of each call; everything else is the wrapped engine's."""

    def __init__(self, engine, component: str, recorder: CallRecorder, clock: Clock):
        self._engine, self._component, self._recorder, self._clock = engine, component, recorder, clock

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __call__(self, feed):
        start = self._clock.now()
        out = self._engine(feed)
        seconds = self._clock.now() - start
        self._recorder.calls.append(EngineCall(self._component, _batch_of(feed.values()), seconds))
        return out


def timed_function(fn, component: str, recorder: CallRecorder, clock: Clock):
    """The same for a torch module's forward (or vae.decode) in the diffusers pipeline."""

    def wrapper(*args, **kwargs):
        start = clock.now()
        out = fn(*args, **kwargs)
        seconds = clock.now() - start
        recorder.calls.append(EngineCall(component, _batch_of(list(args) + list(kwargs.values())), seconds))
        return out

    return wrapper


# ---- one run and its stages ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    end_to_end: float
    calls: tuple[EngineCall, ...]
    step_marks: tuple[int, ...]  # UNet calls made by the end of each step
    image: object = field(default=None, compare=False)  # the first image, uint8 [H, W, 3], for quality comparisons


def _pixels(images) -> object:
    import numpy as np

    first = images[0] if isinstance(images, (list, tuple)) else images
    return np.asarray(first.convert("RGB")) if hasattr(first, "convert") else None


def stage_times(s: Sample) -> dict:
    """Seconds per stage of one run; runtime_overhead = end to end − time inside engines."""
    totals = {"text_encoding": 0.0, "unet": 0.0, "vae_decode": 0.0}
    for call in s.calls:
        totals[STAGE_OF[call.component]] += call.seconds
    unet = [c.seconds for c in s.calls if STAGE_OF[c.component] == "unet"]
    bounds = (0,) + s.step_marks
    steps = [sum(unet[a:b]) for a, b in zip(bounds, bounds[1:])]
    engines = sum(c.seconds for c in s.calls)
    return {**totals, "unet_steps": steps, "engines": engines, "runtime_overhead": s.end_to_end - engines,
            "end_to_end": s.end_to_end}


def sample_record(s: Sample) -> dict:
    return {**stage_times(s), "calls": [[c.component, c.batch, c.seconds] for c in s.calls]}


# ---- sessions: a loaded backend that can run the scenario once ----------------------------------------

@dataclass(frozen=True)
class Session:
    run_once: Callable[[], Sample]
    device: str
    load_seconds: float
    notes: str = ""


def open_sdrt(scenario: Scenario, backend: str, engine_dir: Path, threads: int) -> Session:
    import torch

    from sdrt.engines.ort import OrtConfig
    from sdrt.runtime.pipeline import Pipeline, Request

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
        latents = None
        for latents in pipe.denoise(request):
            marks.append(recorder.count("unet"))
        images = pipe.decode(latents, request.vae, request.tile_vae)
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
    if compiled:  # torch.compile default mode; compilation happens in the warm-up runs
        pipe.unet.forward = torch.compile(pipe.unet.forward)
        pipe.vae.decode = torch.compile(pipe.vae.decode)
        notes += ", torch.compile (default mode) of unet.forward and vae.decode"
    load_seconds = clock.now() - started
    recorder = CallRecorder()
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.forward = timed_function(module.forward, name, recorder, clock)
    pipe.unet.forward = timed_function(pipe.unet.forward, "unet", recorder, clock)
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


# ---- memory ----------------------------------------------------------------------------------------------

def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM (the peak RSS). False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def gpu_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"gpu_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,  # torch's allocator only
            "gpu_used_gib": (total - free) / 2**30}  # every allocator on the device (ORT, TensorRT), at the end


# ---- one backend, all its runs ------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """Everything a worker needs: JSON-serializable."""

    scenario: Scenario
    backend: str
    engine_dir: str
    source_dir: str | None
    warmup: int
    runs: int
    threads: int
    tiny_dir: str | None = None  # the AutoencoderTiny folder, for diffusers with --vae tiny

    @property
    def key(self) -> str:
        """The backend's name in the results: "+tiny-vae" marks runs that decode with the tiny VAE."""
        return self.backend + ("+tiny-vae" if self.scenario.vae == "tiny" else "") + \
            (f"+cache{self.scenario.cache_interval}" if self.scenario.cache_interval > 1 else "")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "scenario": self.scenario.as_dict()})

    @classmethod
    def from_json(cls, text: str) -> "Job":
        d = json.loads(text)
        s = d.pop("scenario")
        return cls(scenario=Scenario(**{**s, "backends": tuple(s["backends"])}), **d)


def measure_backend(job: Job, on_progress: Progress = _silent, peak_reset: bool = True) -> dict:
    """Load the backend, run warm-up runs, then timed runs; raw samples and memory."""
    reset = reset_peak_rss() if peak_reset else False
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except ImportError:
        pass
    session = open_backend(job, on_progress)
    warmup = [_warm_up(session, job, i, on_progress) for i in range(job.warmup)]
    samples = [_timed_run(session, job, i, on_progress) for i in range(job.runs)]
    scope = "this backend's process" if not peak_reset else \
        ("since this backend started (VmHWM reset)" if reset else "whole process so far")
    return backend_record(job, session, warmup, samples, scope)


def open_backend(job: Job, on_progress: Progress = _silent) -> Session:
    on_progress(f"{job.backend}: loading", 0, 0)
    if job.backend in DIFFUSERS_BACKENDS:
        if job.source_dir is None:
            raise UserError(f"backend {job.backend} needs the diffusers folder the engine directory was exported "
                            "from, and its manifest names none that exists here")
        return open_diffusers(job.scenario, Path(job.source_dir), job.threads, job.backend == "diffusers-compile",
                              Path(job.tiny_dir) if job.tiny_dir else None)
    return open_sdrt(job.scenario, job.backend, Path(job.engine_dir), job.threads)


def _warm_up(session: Session, job: Job, i: int, on_progress: Progress) -> Sample:
    sample = session.run_once()
    on_progress(f"{job.backend}: warm-up", i + 1, job.warmup)
    return sample


def _timed_run(session: Session, job: Job, i: int, on_progress: Progress) -> Sample:
    gc.collect()
    sample = session.run_once()
    on_progress(f"{job.backend}: runs", i + 1, job.runs)
    return sample


def _png_b64(image) -> str | None:
    if image is None:
        return None
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def psnr(a, b) -> float:
    """PSNR in dB between two uint8 images (inf when equal)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def quality(backends: dict) -> dict:
    """With step caching or the tiny VAE: each backend's first image against diffusers' plain run (PSNR, dB)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    def image(b):
        text = b.get("image_png_b64")
        return None if not text else np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))

    reference = image(backends.get("diffusers", {}))
    if reference is None:
        return {}
    return {name: psnr(img, reference) for name, b in backends.items()
            if name != "diffusers" and (img := image(b)) is not None and img.shape == reference.shape}


def backend_record(job: Job, session: Session, warmup: list[Sample], samples: list[Sample], rss_scope: str) -> dict:
    return {
        "image_png_b64": _png_b64(samples[0].image) if samples else None,
        "backend": job.backend,
        "status": "ok",
        "device": session.device,
        "notes": session.notes,
        "load_seconds": session.load_seconds,
        "warmup": [sample_record(s) for s in warmup],
        "samples": [sample_record(s) for s in samples],
        "memory": {"peak_rss_gib": peak_rss_bytes() / 2**30, "peak_rss_scope": rss_scope, **gpu_memory()},
    }


def _measure_alone(job: Job, isolate: bool, on_progress: Progress) -> dict:
    try:
        return run_isolated(job, on_progress) if isolate else measure_backend(job, on_progress)
    except Exception as e:  # a backend that cannot run this is reported, and the others still run
        return _failure(job.backend, e)


def _failure(backend: str, error: BaseException) -> dict:
    text = " ".join(str(error).split()) if isinstance(error, UserError) else traceback.format_exc(limit=-4)
    return {"backend": backend, "status": "failed", "error": text}


def measure_interleaved(jobs: list[Job], on_progress: Progress = _silent) -> dict[str, dict]:
    """Every backend loaded in this process, each warmed up, then timed runs in turn (A B A B ...): a machine
    whose speed drifts (shared host, clocks) slows every backend alike instead of whichever ran last.
    Peak RSS is then the whole process's, all backends together. A backend that fails leaves the rotation."""
    raws: dict[str, dict] = {}
    live: dict[str, tuple[Job, Session, list[Sample], list[Sample]]] = {}

    def attempt(job: Job, action) -> None:
        try:
            action()
        except Exception as e:  # reported beside the others, which go on
            raws[job.key] = _failure(job.backend, e)
            live.pop(job.key, None)

    for job in jobs:
        attempt(job, lambda: live.__setitem__(job.key, (job, open_backend(job, on_progress), [], [])))
    for job, session, warmup, _ in list(live.values()):
        attempt(job, lambda: warmup.extend(_warm_up(session, job, i, on_progress) for i in range(job.warmup)))
    for i in range(max((job.runs for job in jobs), default=0)):
        for job, session, _, samples in list(live.values()):
            attempt(job, lambda: samples.append(_timed_run(session, job, i, on_progress)))
    for job, session, warmup, samples in live.values():
        raws[job.key] = backend_record(job, session, warmup, samples, "the whole process: all backends, interleaved")
    return {job.key: raws[job.key] for job in jobs}


def measure_alternating(jobs: list[Job], on_progress: Progress = _silent) -> dict[str, dict]:
    """Timed runs in turn (A B A B ...) like measure_interleaved, but each run in a fresh child process after
    its own load and warm-up: for a model that two backends cannot hold in memory at once (SDXL in fp32 on a
    24 GiB machine). Peak RSS is the largest of one backend's processes. A backend that fails leaves the turn."""
    runs: dict[str, list[dict]] = {job.key: [] for job in jobs}
    failed: dict[str, dict] = {}
    for i in range(max((job.runs for job in jobs), default=0)):
        for job in jobs:
            if job.key in failed or i >= job.runs:
                continue

            def renumbered(what: str, done: int, total: int, i=i, job=job) -> None:
                if what.endswith(": runs"):
                    done, total = i + 1, job.runs
                on_progress(what, done, total)

            raw = run_isolated(replace(job, runs=1), renumbered)
            if raw["status"] == "ok":
                runs[job.key].append(raw)
            else:
                failed[job.key] = raw
    return {job.key: failed.get(job.key) or merged_runs(runs[job.key]) for job in jobs}


def merged_runs(records: list[dict]) -> dict:
    """One backend's record from several one-run processes: their samples in order, the median load time,
    the largest peak memory."""
    import numpy as np

    largest = max(records, key=lambda r: r["memory"]["peak_rss_gib"])
    return {**records[0],
            "load_seconds": float(np.median([r["load_seconds"] for r in records])),
            "warmup": [w for r in records for w in r["warmup"]],
            "samples": [s for r in records for s in r["samples"]],
            "memory": {**largest["memory"],
                       "peak_rss_scope": f"the largest of this backend's {len(records)} processes, one per timed run"}}


def run_isolated(job: Job, on_progress: Progress = _silent) -> dict:
    """measure_backend in a child process; its progress and result come back as marked JSON lines."""
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sdrt.bench.harness", job.to_json()], stdout=subprocess.PIPE,
                                stderr=err, text=True)
        result, user_error = None, None
        try:
            for line in proc.stdout:
                if not line.startswith(_PREFIX):
                    continue
                kind, _, payload = line[len(_PREFIX):].partition(" ")
                if kind == "progress":
                    on_progress(*json.loads(payload))
                elif kind == "result":
                    result = json.loads(payload)
                elif kind == "user-error":
                    user_error = json.loads(payload)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if user_error is not None:
            return {"backend": job.backend, "status": "failed", "error": user_error}
        if proc.returncode != 0 or result is None:
            err.seek(0)
            tail = err.read().strip().splitlines()[-15:]
            return {"backend": job.backend, "status": "failed",
                    "error": f"worker exited with {proc.returncode}: " + "\n".join(tail)}
        return result


def worker_main(argv: list[str]) -> int:
    def emit(kind: str, payload) -> None:
        print(_PREFIX + kind + " " + json.dumps(payload), flush=True)

    job = Job.from_json(argv[0])
    try:
        result = measure_backend(job, lambda what, done, total: emit("progress", [what, done, total]),
                                 peak_reset=False)
    except UserError as e:
        emit("user-error", " ".join(str(e).split()))
        return 2
    emit("result", result)
    return 0


# ---- the model: an engine directory, or a random-weight architecture exported once ----------------------

@dataclass(frozen=True)
class ModelPaths:
    engine_dir: Path
    source_dir: Path | None  # the diffusers folder it was exported from, when it exists here
    tiny_dir: Path | None = None  # the AutoencoderTiny folder its vae_decoder_tiny came from, when it exists here


def prepare_model(scenario: Scenario, workdir: Path, on_progress: Progress = _silent) -> ModelPaths:
    if scenario.is_architecture:
        return _prepare_architecture(scenario.model, scenario.precision, Path(workdir), on_progress,
                                     scenario.vae == "tiny", scenario.cache_interval > 1)
    engine_dir = Path(scenario.model)
    manifest = _manifest(engine_dir)
    if manifest is not None and manifest.get("precision") and manifest["precision"] != scenario.precision:
        raise UserError(f"{engine_dir} was exported in {manifest['precision']}, not {scenario.precision}; pass "
                        f"--precision {manifest['precision']} or export it again")
    location = (manifest or {}).get("source", {}).get("location")
    source = Path(location) if location and Path(location).is_dir() else None
    tiny = ((manifest or {}).get("tiny_vae") or {}).get("location")
    if scenario.cache_interval > 1 and not (engine_dir / "unet_deepcache_shallow" / "model.onnx").is_file():
        raise UserError(f"--cache-interval: {engine_dir} has no step-caching graphs; export it with sdrt export "
                        "--deepcache")
    if scenario.vae == "tiny" and not (engine_dir / "vae_decoder_tiny" / "model.onnx").is_file():
        raise UserError(f"--vae tiny: {engine_dir} has no vae_decoder_tiny; export it with sdrt export --tiny-vae")
    return ModelPaths(engine_dir, source, Path(tiny) if tiny and Path(tiny).is_dir() else None)


def _manifest(engine_dir: Path) -> dict | None:
    path = Path(engine_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _prepare_architecture(arch: str, precision: str, workdir: Path, on_progress: Progress,
                          tiny: bool = False, deepcache: bool = False) -> ModelPaths:
    from sdrt.bench import fullsize

    folder = workdir / arch / "model"
    engine_dir = workdir / arch / f"engine-{precision}"
    if not (folder / "model_index.json").is_file():
        on_progress(f"writing the random-weight {arch} pipeline to {folder}", 0, 0)
        partial = folder.with_name("model.partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier run that was killed
        try:
            fullsize.write(arch, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(folder)
    tiny_dir = workdir / arch / "taesd" if tiny else None
    if tiny_dir is not None and not (tiny_dir / "config.json").is_file():
        from sdrt.export.extras.tiny_vae import write_tiny_vae

        on_progress(f"writing a random-weight TAESD (AutoencoderTiny's default config) to {tiny_dir}", 0, 0)
        write_tiny_vae(tiny_dir, scale_factor=size_multiple_of_architecture(arch), full_size=True)
    manifest = _manifest(engine_dir)
    stale = manifest is None or manifest.get("precision") != precision
    missing_cache = deepcache and "unet_deepcache_shallow" not in (manifest or {}).get("components", {})
    if stale or (tiny and not manifest.get("tiny_vae")) or missing_cache:
        from sdrt.export.exporter import ExportConfig, export

        on_progress(f"exporting {folder} ({precision}) to {engine_dir}", 0, 0)
        export(ExportConfig(model=str(folder), output=engine_dir, precision=precision,
                            force=manifest is not None and stale, tiny_vae=str(tiny_dir) if tiny_dir else None,
                            deepcache=deepcache or "unet_deepcache" in (manifest or {}).get("components", {})),
               lambda name, status: on_progress(f"export {name}: {status}", 0, 0))
    return ModelPaths(engine_dir, folder, tiny_dir)


def size_multiple(engine_dir: Path) -> int:
    from sdrt.runtime.loader import open_dir

    d = open_dir(engine_dir)
    return d.vae_scale_factor * d.latent_multiple


def size_multiple_of_architecture(arch: str) -> int:
    """The VAE factor from the published configs, before anything is built: sdrt's exports take any latent size
    (the UNet resizes each up-sampler to its skip connection, as diffusers does)."""
    cfg = json.loads((Path(__file__).parent / "configs" / f"{arch}.json").read_text())
    return 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)


def check_size(scenario: Scenario, multiple: int) -> None:
    if scenario.width % multiple or scenario.height % multiple:
        raise UserError(f"width and height must be multiples of {multiple} for this model "
                        f"(got {scenario.width}x{scenario.height})")


# ---- statistics ----------------------------------------------------------------------------------------

def stats(values: list[float]) -> dict:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "min": float(a.min()),
            "max": float(a.max()), "mean": float(a.mean()), "n": int(a.size)}


def run_flops(sample: dict, per_image: dict[str, int]) -> dict:
    """FLOPs of one run per stage, from the calls it made (batch × per-image count of that component)."""
    out = {"text_encoding": 0, "unet": 0, "vae_decode": 0}
    for component, batch, _ in sample["calls"]:  # the step-caching full graph counts as the UNet; its shallow one 0
        count = per_image.get(component, per_image.get("unet", 0) if component == "unet_deepcache" else 0)
        out[STAGE_OF[component]] += batch * count
    out["end_to_end"] = sum(out.values())
    return out


def summarize(raw: dict, per_image: dict[str, int], peak_flops: float, images_per_run: int) -> dict:
    """Stats per stage over the timed runs; images/s; achieved FLOP/s per stage and its share of the peak."""
    if raw.get("status") != "ok":
        return raw
    samples = raw["samples"]
    by_stage = {stage: stats([s[stage] for s in samples]) for stage in STAGES}
    steps = len(samples[0]["unet_steps"])
    per_step = [stats([s["unet_steps"][i] for s in samples]) for i in range(steps)]
    all_steps = stats([t for s in samples for t in s["unet_steps"]]) if steps else None
    flops = run_flops(samples[0], per_image)
    achieved = {}
    for stage, count in flops.items():
        median = by_stage[stage]["median"]
        rate = count / median if median > 0 else 0.0
        achieved[stage] = {"flops": count, "flops_per_second": rate,
                           "fraction_of_peak": rate / peak_flops if peak_flops else None}
    return {**raw, "stats": {**by_stage, "unet_step": all_steps, "unet_steps": per_step},
            "images_per_second": images_per_run / by_stage["end_to_end"]["median"],
            "achieved": achieved}


# ---- the machine ---------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    try:
        import psutil

        physical, memory = psutil.cpu_count(logical=False), psutil.virtual_memory().total
    except ImportError:
        physical, memory = None, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
               "compute_capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count(),
               "cuda": torch.version.cuda}
    return {"cpu": cpu_model(), "architecture": platform.machine(), "cores_logical": os.cpu_count(),
            "cores_physical": physical, "memory_gib": round(memory / 2**30, 1), "os": platform.platform(),
            "python": platform.python_version(), "gpu": gpu}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("sdrt", "torch", "onnxruntime", "onnxruntime-gpu", "diffusers", "transformers", "tensorrt"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


# ---- the whole benchmark ---------------------------------------------------------------------------------

def run(scenario: Scenario, config: HarnessConfig, on_progress: Progress = _silent, command: str = "") -> dict:
    """Prepare the model, measure the peak, count FLOPs, then every backend in turn; the full result dict."""
    from sdrt.bench.flops import METHOD, ModelConfigs, measure_peak, per_image_flops

    config = with_threads(check_config(config))
    gpu = gpu_present()
    if scenario.is_architecture:
        check_size(scenario, size_multiple_of_architecture(scenario.model))
    paths = prepare_model(scenario, config.workdir, on_progress)
    check_size(scenario, size_multiple(paths.engine_dir))
    wants_source = [b for b in scenario.backends if b in DIFFUSERS_BACKENDS]
    if wants_source and paths.source_dir is None:
        raise UserError(f"backend {wants_source[0]} runs the diffusers folder {paths.engine_dir} was exported from, "
                        "and its manifest names none that exists here; drop that backend or export from a local folder")

    if "tensorrt" in scenario.backends and not any((paths.engine_dir / "trt").glob("unet__*.plan")):
        raise UserError(f"backend tensorrt needs TensorRT plans in {paths.engine_dir / 'trt'}; build them first: sdrt "
                        f"build {paths.engine_dir} --resolution {scenario.width}x{scenario.height}"
                        f"{'' if scenario.guidance > 1 else ' --no-guidance'} --batch {scenario.batch}")
    on_progress("counting FLOPs per component", 0, 0)
    configs = ModelConfigs.from_engine_dir(paths.engine_dir)
    latent_hw = (scenario.height // configs.vae_scale_factor, scenario.width // configs.vae_scale_factor)
    per_image = per_image_flops(configs, latent_hw, Path(config.workdir) / "flops_cache.json")
    load_before = _load_average()
    on_progress("measuring the machine's matmul peak", 0, 0)
    peaks = [measure_peak(config.threads, gpu=gpu, precision=scenario.precision, size=config.peak_matmul_size)]

    tiny_dir = str(paths.tiny_dir) if paths.tiny_dir else None
    jobs = [Job(scenario, backend, str(paths.engine_dir), str(paths.source_dir) if paths.source_dir else None,
                config.warmup, config.runs, config.threads, tiny_dir) for backend in scenario.backends]
    if scenario.vae == "tiny" or scenario.cache_interval > 1:  # what users gain: diffusers as it runs by default
        jobs += [replace(j, scenario=replace(scenario, vae="full", cache_interval=1)) for j in jobs
                 if j.backend in DIFFUSERS_BACKENDS]
    if config.interleave:
        raws = measure_interleaved(jobs, on_progress)
    elif config.alternate:
        raws = measure_alternating(jobs, on_progress)
    else:
        raws = {job.key: _measure_alone(job, config.isolate, on_progress) for job in jobs}
    on_progress("measuring the machine's matmul peak again", 0, 0)
    peaks.append(measure_peak(config.threads, gpu=gpu, precision=scenario.precision, size=config.peak_matmul_size))
    peak = max(peaks, key=lambda p: p.flops_per_second)  # another process busy during one probe only lowers it
    backends = {name: summarize(raw, per_image, peak.flops_per_second, scenario.batch) for name, raw in raws.items()}
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "scenario": scenario.as_dict(),
        "config": {"warmup": config.warmup, "runs": config.runs, "threads": config.threads,
                   "isolate": config.isolate and not config.interleave, "interleave": config.interleave,
                   "alternate": config.alternate,
                   "workdir": str(config.workdir)},
        "model": {"engine_dir": str(paths.engine_dir), "source_dir": str(paths.source_dir) if paths.source_dir else None,
                  "latent": [latent_hw[0], latent_hw[1]]},
        "machine": machine_info(),
        "conditions": {"load_average_before": load_before, "load_average_after": _load_average()},
        "versions": versions(),
        "peak": {**peak.as_dict(), "probes_flops_per_second": [p.flops_per_second for p in peaks]},
        "flops": {"method": METHOD, "per_image": per_image},
        "backends": backends,
        "quality_psnr_db_vs_diffusers": quality(backends)
        if scenario.vae == "tiny" or scenario.cache_interval > 1 else {},
        "warnings": warnings_about(backends),
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: a busy machine (another job) shows here."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def warnings_about(backends: dict) -> list[str]:
    out = []
    for name, b in backends.items():
        over = [stage for stage, a in b.get("achieved", {}).items() if (a["fraction_of_peak"] or 0) > 1.0]
        if over:
            fewer = "" if name in DIFFUSERS_BACKENDS else \
                " or the exported graph executes fewer FLOPs than the model's count (sub-pixel upsamplers),"
            out.append(f"{name}: {', '.join(over)} ran above the measured matmul peak: the peak probes caught a slow "
                       f"moment of the machine,{fewer} so read these fractions of peak as effective rates")
        if b.get("status") != "ok":
            out.append(f"{name} failed: {b.get('error', '')}")
    return out


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
