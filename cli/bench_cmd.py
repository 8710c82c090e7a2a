"""`sdrt bench`: options → Scenario + HarnessConfig → sdrt.bench.harness; the harness is imported when it runs."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer


def bench(
    model: Optional[str] = typer.Argument(None, help="engine directory, or a full-size architecture built with random "
                                                     "weights: sd15, sd21, sdxl, sd35m, flux-schnell (the last two at full "
                                                     "width, reduced depth where bench/configs says; default: the preset's)"),
    preset: str = typer.Option("lightning-4step", help="lightning-4step | lightning-1step | turbo | sd15-classic | "
                                                                 "flux-schnell | sd35-turbo"),
    backend: list[str] = typer.Option([], help="ort-cpu, ort-cuda, tensorrt, diffusers, diffusers-compile (repeatable "
                                               "or comma-separated) (default: all that run here; tensorrt only when named)"),
    resolution: Optional[str] = typer.Option(None, help="N or WIDTHxHEIGHT (default: the preset's, for Lightning 1024 on "
                                                        "a GPU, 512 on a CPU)"),
    steps: Optional[int] = typer.Option(None, help="denoising steps (default: the preset's)"),
    sampler: Optional[str] = typer.Option(None, help="euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde, ddim, lcm; "
                                                                    "flow_euler… on SD3 / FLUX.1"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale; <= 1 turns it off"),
    batch: int = typer.Option(1, help="images per run"),
    precision: Optional[str] = typer.Option(None, help="fp32 | fp16 (default: fp16 on a GPU, fp32 on a CPU)"),
    warmup: int = typer.Option(1, help="warm-up runs per backend, not counted"),
    runs: int = typer.Option(5, help="timed runs per backend"),
    threads: int = typer.Option(0, help="ONNX Runtime intra-op threads = torch threads (0: physical cores)"),
    prompt: Optional[str] = typer.Option(None, help="prompt (default: a fixed one)"),
    seed: int = typer.Option(0, help="seed"),
    vae: str = typer.Option("full", help="full | tiny: decode with the tiny VAE (TAESD; an engine directory needs "
                                         "one exported with --tiny-vae, architectures get a random-weight one); "
                                         "diffusers runs with the same tiny VAE and, for comparison, with the full one"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="results folder (default: "
                                                                 "bench/results/<preset>-<timestamp>/)"),
    workdir: Path = typer.Option(Path("build/bench"), help="where random-weight models, their exports and the "
                                                           "FLOP-count cache are kept between runs"),
    isolate: bool = typer.Option(True, help="run each backend in its own process (own peak RSS); --no-isolate "
                                            "runs them in this one"),
    interleave: bool = typer.Option(False, help="load every backend in this process and alternate their timed "
                                                "runs, so that a machine whose speed drifts slows all alike "
                                                "(peak RSS is then the process's)"),
    alternate: bool = typer.Option(False, help="alternate the backends' timed runs like --interleave, each run in a "
                                               "fresh process after its own load and warm-up: for models the "
                                               "backends cannot hold in memory together"),
    lora_switch: bool = typer.Option(False, "--lora-switch", help="instead: the cost of applying a LoRA at load "
                                     "(seconds to rebuild the UNet session, back to the base, to a cached set) and "
                                     "its per-step overhead, for MODEL (an engine directory or sd15)"),
    conditioning: bool = typer.Option(False, "--conditioning", help="instead: the per-step cost of each ControlNet, "
                                      "the residual UNet, the IP-Adapter UNet and PuLID's UNet against the plain "
                                      "UNet, and PuLID's ID encoder once per identity, for MODEL (an engine directory "
                                      "exported with them); with --alternate each graph in a fresh process, "
                                      "--rounds rounds of --runs calls, and --backend ort-cpu,diffusers adds diffusers' UNet, "
                                      "plain and with PuLID's processors"),
    rounds: int = typer.Option(2, min=1, help="with --conditioning --alternate: rounds of fresh processes (each graph "
                                            "loaded again per round, every other round in reverse order)"),
    lora_rank: int = typer.Option(16, help="with --lora-switch: the rank of the random LoRA on every attention "
                                           "projection"),
    cache_interval: int = typer.Option(1, help="step caching (DeepCache, branch 0) every N steps in every backend "
                                               "(diffusers: DeepCacheSDHelper; an engine directory needs `sdrt export "
                                               "--deepcache`); the uncached diffusers run is added for the quality "
                                               "cost (PSNR)"),
    startup: bool = typer.Option(False, "--startup", help="time to first image instead: `sdrt run` and a diffusers "
                                            "script making the same image, each a fresh process, alternating "
                                            "(--runs of each; MODEL must be an engine directory exported from a "
                                            "local folder)"),
    shapes_accuracy: bool = typer.Option(False, "--shapes-accuracy", help="the embedded shapes model's caption "
                                         "accuracy beside seconds per image for fp32, fp16, step caching and torch "
                                         "(bench/shapes_eval.py; results in --out)"),
    ort_cache: bool = typer.Option(False, "--ort-cache", help="with --startup: also time `sdrt run --ort-cache` "
                                   "starts after one that saved ONNX Runtime's optimized graphs"),
) -> None:
    """Latency benchmark stage by stage (text encoding, each UNet step, VAE decode), side by side with diffusers."""
    if conditioning:
        from sdrt.bench import conditioning as cond

        if model is None or not Path(model).is_dir():
            raise typer.BadParameter("--conditioning needs MODEL: an engine directory with ControlNets or an IP-Adapter")
        from sdrt.bench.scenarios import DIFFUSERS_BACKENDS, split_backends

        wanted = split_backends(tuple(backend or ()))
        ours = [b for b in wanted if b not in DIFFUSERS_BACKENDS]
        argv = [model, "--calls", str(runs), "--backend", ours[0] if ours else "ort-cpu",
                "--out", str(out or Path("bench/results") / "conditioning")]
        if alternate:  # full-size graphs that do not fit in memory together: each in a fresh process, --rounds rounds
            argv += ["--rounds", str(rounds)] + (["--with-diffusers"] if "diffusers" in wanted else [])
        elif "diffusers" in wanted:
            raise typer.BadParameter("--conditioning times diffusers' UNet beside sdrt's graphs with --alternate only "
                                     "(each in a process of its own)")
        if resolution is not None:
            argv += ["--resolution", resolution]
        cond.main(argv)
        return
    if lora_switch:
        from sdrt.bench import lora_switch as switch

        argv = [model or "sd15", "--rank", str(lora_rank), "--steps", str(runs), "--workdir", str(workdir),
                "--output", str(out or Path("bench/results") / "lora-switch")]
        if resolution is not None:
            argv += ["--resolution", resolution]
        if backend:
            argv += ["--backend", backend[0]]
        code = switch.main(argv, " ".join(["sdrt", "bench"] + [shlex.quote(a) for a in sys.argv[2:]]))
        if code:
            raise typer.Exit(code)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if startup:
        _startup(model, runs, steps, resolution, seed, out, guidance, ort_cache)
        return
    if shapes_accuracy:
        from sdrt.bench import shapes_eval

        shapes_eval.main(["--compare", str(out or Path("bench/results") / "cpu-shapes-accuracy"),
                          "--steps", str(steps or 20), "--guidance", str(7.5 if guidance is None else guidance)])
        return
    from sdrt.bench import report
    from sdrt.bench.harness import run
    from sdrt.bench.scenarios import DEFAULT_PROMPT, HarnessConfig, Overrides, check_config, resolve

    scenario = resolve(preset, Overrides(model=model, resolution=resolution, steps=steps, sampler=sampler,
                                         guidance=guidance, batch=batch, precision=precision,
                                         backends=tuple(backend), prompt=prompt or DEFAULT_PROMPT, seed=seed,
                                         vae=vae, cache_interval=cache_interval))
    config = check_config(HarnessConfig(warmup=warmup, runs=runs, threads=threads, workdir=workdir, isolate=isolate,
                                        interleave=interleave, alternate=alternate))
    folder = out or report.default_folder(scenario.name)
    command = " ".join(["sdrt", "bench"] + [shlex.quote(a) for a in sys.argv[sys.argv.index("bench") + 1:]]) \
        if "bench" in sys.argv else ""

    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_progress(what: str, done: int, total: int) -> None:
            if total == 0:
                bar.console.print(what, highlight=False)
                return
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done)

        result = run(scenario, config, on_progress, command)
    paths = report.write_all(result, folder)
    Console().print(report.rich_table(result))
    for warning in result["warnings"]:
        err.print(f"warning: {warning}", highlight=False)
    print(f"results: {paths['json'].parent}")
    if report.failed_backends(result):
        raise typer.Exit(1)


def _startup(model, runs, steps, resolution, seed, out, guidance, ort_cache=False) -> None:
    from sdrt.bench import startup
    from sdrt.bench.scenarios import parse_resolution
    from sdrt.runtime.errors import UserError

    if model is None or not Path(model).is_dir():
        raise UserError("--startup needs an engine directory (exported from a local diffusers folder) as MODEL")
    width, height = parse_resolution(resolution) if resolution else (None, None)
    scenario = startup.StartupScenario(str(model), str(startup.source_of(Path(model))), steps=steps or 4,
                                       width=width, height=height, seed=seed, runs=runs,
                                       guidance=7.5 if guidance is None else guidance, ort_cache=ort_cache)
    result = startup.measure(scenario, lambda what, done, total: print(f"{what} {done}/{total}", file=sys.stderr))
    folder = out or Path("bench/results") / f"startup-{Path(model).name}"
    command = " ".join(["sdrt", "bench"] + [shlex.quote(a) for a in sys.argv[sys.argv.index("bench") + 1:]]) \
        if "bench" in sys.argv else ""
    startup.write(result, folder, command)
    print(startup.markdown(result, command))
    print(f"results: {folder}")
