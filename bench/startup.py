"""Time to first image: `sdrt run` as a whole fresh process against a fresh diffusers process making the same image.

    sdrt bench ENGINE_DIR --startup --runs 5 [--resolution 32 --steps 4]
    python -m sdrt.bench.startup ENGINE_DIR --runs 5

Each run starts a new Python process and times it from spawn to exit: imports, loading, text encoding, the steps,
decoding, writing the PNG, exit. `sdrt run` exits without the interpreter's teardown (cli/main.py); so that this
is not what the ratio measures, diffusers also runs a second time ending the same way (its exit handlers, then
os._exit), and both ratios are reported. The commands alternate (sdrt, diffusers, sdrt, …) so that a
machine whose speed drifts slows both alike; medians are compared. diffusers runs the folder the engine directory
was exported from (its manifest's source), with the scheduler class sdrt's sampler equals and one CPU generator
seeded like sdrt's image 0; the two PNGs are compared (max |Δ| in uint8 levels) so the ratio is for the same image.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from sdrt.runtime.errors import UserError

SCHEMA = "sdrt-bench-startup/1"
CACHE_FIRST = "sdrt --ort-cache, first start (writes the cache)"
CACHED = "sdrt --ort-cache, later starts"
FAST_EXIT = "diffusers, exiting as sdrt run does"

# The diffusers side: a standalone script (only diffusers, torch and PIL), its arguments as one JSON string.
_DIFFUSERS_SCRIPT = """
import json, sys
a = json.loads(sys.argv[1])
import diffusers, torch
diffusers.utils.logging.set_verbosity_error()
pipe = diffusers.DiffusionPipeline.from_pretrained(a["source"])
pipe.set_progress_bar_config(disable=True)
pipe.scheduler = getattr(diffusers, a["scheduler"]).from_config(pipe.scheduler.config, **a["scheduler_config"])
image = pipe(a["prompt"], num_inference_steps=a["steps"], guidance_scale=a["guidance"], height=a["height"],
             width=a["width"], generator=[torch.Generator().manual_seed(a["seed"])]).images[0]
image.save(a["out"])
"""
# appended for FAST_EXIT: what cli/main.py's _exit_without_teardown does
_FAST_EXIT_TAIL = """
import atexit, os
atexit._run_exitfuncs()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""


@dataclass(frozen=True)
class StartupScenario:
    engine_dir: str
    source_dir: str
    prompt: str = "a photograph of an astronaut riding a horse"
    steps: int = 4
    guidance: float = 7.5
    sampler: str = "euler"
    width: int | None = None  # None: the model's default size
    height: int | None = None
    seed: int = 0
    runs: int = 5
    ort_cache: bool = False  # also time `sdrt run --ort-cache` after one start that wrote the cache


def source_of(engine_dir: Path) -> Path:
    """The diffusers folder an engine directory was exported from (its manifest), which must exist here."""
    manifest = Path(engine_dir) / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"{engine_dir} has no manifest.json naming the diffusers folder it came from; --startup "
                        "compares against that folder")
    location = json.loads(manifest.read_text()).get("source", {}).get("location")
    if not location or not Path(location).is_dir():
        raise UserError(f"--startup runs diffusers on the folder {engine_dir} was exported from ({location}), and "
                        "it does not exist here; export from a local folder")
    return Path(location)


def commands(s: StartupScenario, sdrt_png: Path, diffusers_png: Path) -> tuple[list[str], list[str]]:
    from sdrt.runtime.loader import open_dir
    from sdrt.runtime.samplers.registry import get

    size = open_dir(s.engine_dir).default_size
    width, height = s.width or size, s.height or size
    ours = [sys.executable, "-m", "sdrt.cli.main", "run", s.engine_dir, s.prompt, "--steps", str(s.steps),
            "--guidance", str(s.guidance), "--sampler", s.sampler, "--seed", str(s.seed), "--width", str(width),
            "--height", str(height), "--backend", "ort-cpu", "-o", str(sdrt_png)]
    spec = get(s.sampler)
    args = {"source": s.source_dir, "scheduler": spec.diffusers_class, "scheduler_config": dict(spec.diffusers_config),
            "prompt": s.prompt, "steps": s.steps, "guidance": s.guidance, "width": width, "height": height,
            "seed": s.seed, "out": str(diffusers_png)}
    theirs = [sys.executable, "-c", _DIFFUSERS_SCRIPT, json.dumps(args)]
    return ours, theirs


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise UserError(f"{shlex.join(command[:4])} … exited with {done.returncode}: {tail}")
    return seconds


def _max_diff(a: Path, b: Path) -> int:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (a, b))
    return int(np.abs(x - y).max()) if x.shape == y.shape else 255


def measure(s: StartupScenario, on_progress=lambda what, done, total: None) -> dict:
    """Alternating fresh processes, `runs` of each; seconds per run, medians, ratio, and the images' difference."""
    from sdrt.bench.machine import load_average, machine_info, versions

    if s.runs < 1:
        raise UserError(f"--runs must be at least 1 (got {s.runs})")
    load_before = load_average()
    with tempfile.TemporaryDirectory() as scratch:
        ours_png, theirs_png = Path(scratch) / "sdrt.png", Path(scratch) / "diffusers.png"
        ours, theirs = commands(s, ours_png, theirs_png)
        times: dict[str, list[float]] = {"sdrt": [], "diffusers": [], FAST_EXIT: []}
        contenders = [("sdrt", ours), ("diffusers", theirs),
                      (FAST_EXIT, [theirs[0], theirs[1], _DIFFUSERS_SCRIPT + _FAST_EXIT_TAIL, *theirs[3:]])]
        if s.ort_cache:  # the first --ort-cache start writes ONNX Runtime's optimized graphs; later ones read them
            cached = ours + ["--ort-cache"]
            times[CACHE_FIRST] = [_timed(cached)]
            times[CACHED] = []
            contenders.append((CACHED, cached))
        for i in range(s.runs):
            for name, command in contenders:
                times[name].append(_timed(command))
                on_progress(f"{name}: fresh processes", i + 1, s.runs)
        diff = _max_diff(ours_png, theirs_png)
    medians = {k: statistics.median(v) for k, v in times.items()}
    cache_ratio = {"diffusers_over_sdrt_cached": medians["diffusers"] / medians[CACHED]} if s.ort_cache else {}
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scenario": asdict(s),
        "commands": {"sdrt": shlex.join(ours), "diffusers": shlex.join(theirs[:2]) + " <script> <json>"},
        "seconds": times,
        "median_seconds": medians,
        "diffusers_over_sdrt": medians["diffusers"] / medians["sdrt"],
        "diffusers_fast_exit_over_sdrt": medians[FAST_EXIT] / medians["sdrt"],
        **cache_ratio,
        "image_max_abs_diff_uint8": diff,
        "conditions": {"load_average_before": load_before, "load_average_after": load_average()},
        "machine": machine_info(),
        "versions": versions(),
    }


def markdown(result: dict, command: str = "") -> str:
    s, m = result["scenario"], result["median_seconds"]
    lines = [f"# sdrt bench --startup: {Path(s['engine_dir']).name}", "",
             f"- what: whole fresh processes, spawn to exit, alternating; {s['runs']} of each; {s['steps']} steps "
             f"{s['sampler']}, guidance {s['guidance']:g}, seed {s['seed']}",
             f"- machine: {result['machine']['cpu']}, {result['machine']['cores_logical']} logical cores, "
             f"{result['machine']['memory_gib']} GiB",
             f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
             f"- load average (1, 5, 15 min) before / after: {result['conditions']['load_average_before']} / "
             f"{result['conditions']['load_average_after']}" if result.get("conditions") else "",
             f"- command: `{command}`" if command else "",
             f"- created: {result['created']}", "",
             "| | median s | runs s |", "|---|---:|---|"]
    for name in result["seconds"]:
        lines.append(f"| {name} | {m[name]:.2f} | {', '.join(f'{t:.2f}' for t in result['seconds'][name])} |")
    lines += ["", f"diffusers / sdrt: **{result['diffusers_over_sdrt']:.2f}×**; the two images differ by at most "
                  f"{result['image_max_abs_diff_uint8']}/255." +
              (f" With the cached optimized graphs: **{result['diffusers_over_sdrt_cached']:.2f}×**."
               if "diffusers_over_sdrt_cached" in result else "") +
              (f" Against diffusers also exiting without the interpreter's teardown: "
               f"**{result['diffusers_fast_exit_over_sdrt']:.2f}×**." if "diffusers_fast_exit_over_sdrt" in result
               else ""), ""]
    return "\n".join(line for line in lines if line is not None) + "\n"


def write(result: dict, folder: Path, command: str = "") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps({**result, "command": command}, indent=1) + "\n")
    (folder / "result.md").write_text(markdown(result, command))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ort-cache", action="store_true", help="also time starts that reuse ONNX Runtime's "
                        "optimized graphs (`sdrt run --ort-cache`)")
    a = parser.parse_args(argv)
    try:
        s = StartupScenario(str(a.engine_dir), str(source_of(a.engine_dir)), steps=a.steps, runs=a.runs,
                            width=a.resolution, height=a.resolution, ort_cache=a.ort_cache)
        result = measure(s, lambda what, done, total: print(f"{what} {done}/{total}", file=sys.stderr))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = a.out or Path("bench/results") / f"startup-{a.engine_dir.name}-{datetime.now():%Y%m%d-%H%M%S}"
    write(result, folder, shlex.join(["python", "-m", "sdrt.bench.startup", *(argv or sys.argv[1:])]))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
