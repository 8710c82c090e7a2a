"""The benchmark harness behind `sdrt bench`: sdrt's backends and diffusers on one scenario, stage by stage.

Timing happens in bench/, never in runtime/: every engine is wrapped in a proxy that records each call's duration
(sdrt.bench.measure.timing), so a run splits into text encoding, each UNet step, VAE decode, and the runtime's own
overhead; diffusers is timed the same way (sdrt.bench.measure.sessions).

`run` takes one scenario from end to end: the model (sdrt.bench.models: an engine directory, or a random-weight
architecture exported once), FLOP counts and the machine's matmul peak (sdrt.bench.flops), every backend's warm-up
and timed runs (sdrt.bench.measure.jobs: each backend in a child process by default, or all interleaved in this
one, or alternating child processes), the statistics per stage (sdrt.bench.measure.stats) and what the machine
is and how busy it was (sdrt.bench.machine).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from sdrt.runtime.errors import UserError

from sdrt.bench.machine import load_average, machine_info, versions
from sdrt.bench.measure.jobs import Job, measure_alone, measure_alternating, measure_interleaved
from sdrt.bench.measure.stats import quality, summarize
from sdrt.bench.models import check_size, prepare_model, size_multiple, size_multiple_of_architecture
from sdrt.bench.scenarios import (DIFFUSERS_BACKENDS, HarnessConfig, Progress, Scenario, check_config, gpu_present,
                                  silent, with_threads)

SCHEMA = "sdrt-bench/1"


def run(scenario: Scenario, config: HarnessConfig, on_progress: Progress = silent, command: str = "") -> dict:
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

    denoiser = "transformer" if (paths.engine_dir / "transformer").is_dir() else "unet"
    if "tensorrt" in scenario.backends and not any((paths.engine_dir / "trt").glob(f"{denoiser}__*.plan")):
        raise UserError(f"backend tensorrt needs TensorRT plans in {paths.engine_dir / 'trt'}; build them first: sdrt "
                        f"build {paths.engine_dir} --resolution {scenario.width}x{scenario.height}"
                        f"{'' if scenario.guidance > 1 else ' --no-guidance'} --batch {scenario.batch}")
    on_progress("counting FLOPs per component", 0, 0)
    configs = ModelConfigs.from_engine_dir(paths.engine_dir)
    latent_hw = (scenario.height // configs.vae_scale_factor, scenario.width // configs.vae_scale_factor)
    per_image = per_image_flops(configs, latent_hw, Path(config.workdir) / "flops_cache.json")
    load_before = load_average()
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
        raws = {job.key: measure_alone(job, config.isolate, on_progress) for job in jobs}
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
                  "latent": [latent_hw[0], latent_hw[1]], "denoiser": configs.denoiser},
        "machine": machine_info(),
        "conditions": {"load_average_before": load_before, "load_average_after": load_average()},
        "versions": versions(),
        "peak": {**peak.as_dict(), "probes_flops_per_second": [p.flops_per_second for p in peaks]},
        "flops": {"method": METHOD, "per_image": per_image},
        "backends": backends,
        "quality_psnr_db_vs_diffusers": quality(backends)
        if scenario.vae == "tiny" or scenario.cache_interval > 1 else {},
        "warnings": warnings_about(backends),
    }


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

