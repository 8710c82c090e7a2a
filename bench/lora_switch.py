"""What applying a LoRA at load costs, and that it costs nothing per step afterwards.

    python -m sdrt.bench.lora_switch ENGINE_DIR|sd15 [--rank 16] [--resolution 256] [--steps 5] [-o OUT]

Makes a random-weight LoRA (kohya format, rank 16, alpha 8, on every attention projection of the UNet:
to_q/to_k/to_v/to_out.0 of attn1 and attn2), then on ONNX Runtime (CPU unless --backend ort-cuda):
- times the rebuild with the LoRA (deltas from the file, merged with the stored base weights, new session with
  replaced initializers), split into the merge and the session creation, and a plain session created at the
  same point for comparison,
- times UNet steps (one UNet call at the given resolution, guidance batch 2) of the base and the adapted
  engine, interleaved, on the same feed: the graph is the same, so the step time should be too,
- times a switch back to the base (the resident engine: no rebuild) and a second LoRA (a rebuild again).
`sd15` builds the random-weight full-size SD 1.5 via sdrt.bench.fullsize and exports it once (fp32) into
--workdir. Writes result.json and result.md into OUT when given; prints the figures either way.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def make_lora(engine_dir: Path, path: Path, rank: int = 16, alpha: float = 8.0, seed: int = 0) -> int:
    """A kohya-format LoRA on every UNet attention projection, random (small) values; returns its module count."""
    from safetensors.numpy import save_file

    from sdrt.runtime.lora.weights import read_weights_maps

    weights = read_weights_maps(engine_dir)["unet"]["weights"]
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, entry in weights.items():
        if not any(module.endswith(f".{a}") for a in ATTENTION) or ".attn" not in module:
            continue
        out, inp = entry["shape"][:2]
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, inp)) / np.sqrt(inp)).astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = (rng.standard_normal((out, rank)) * 0.02).astype(np.float32)
        tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file(tensors, str(path))
    return len(tensors) // 3


def _feed(engine, resolution: int, vae_factor: int) -> dict:
    g = torch.Generator().manual_seed(0)
    side = resolution // vae_factor
    feed = {}
    for name, spec in engine.inputs.items():
        dtype = getattr(torch, spec.dtype)
        if name == "timestep":
            feed[name] = torch.tensor(500.0, dtype=dtype).reshape([1] * len(spec.shape))
            continue
        shape = [2 if d in ("batch_size", "batch") or (isinstance(d, str) and "batch" in d) else d for d in spec.shape]
        shape = [side if (isinstance(d, str) and d in ("height", "width")) else d for d in shape]
        shape = [77 if isinstance(d, str) and "sequence" in d else d for d in shape]
        shape = [1 if isinstance(d, str) or d == -1 else d for d in shape]
        if name == "time_ids":
            feed[name] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * shape[0], dtype=dtype)
        else:
            feed[name] = torch.randn(shape, generator=g).to(dtype)
    return feed


def _steps(engine, feed: dict, count: int) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        engine(feed)
        out.append(time.perf_counter() - t0)
    return out


def measure(engine_dir: Path, rank: int, resolution: int, steps: int, backend: str, lora_dir: Path) -> dict:
    from sdrt.runtime.lora.files import normalize_entries
    from sdrt.runtime.lora.refs import resolve
    from sdrt.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(engine_dir, backend=backend, components=("unet",))
    load_s = time.perf_counter() - t0
    adapters = pipe.adapters
    files = [lora_dir / "bench_lora_a.safetensors", lora_dir / "bench_lora_b.safetensors"]
    modules = [make_lora(engine_dir, f, rank, seed=i) for i, f in enumerate(files)]
    refs = [resolve(normalize_entries([(str(f), 1.0)]), adapters.model, None) for f in files]
    feed = _feed(pipe.engines["unet"], resolution, pipe.dir.vae_scale_factor)

    _steps(pipe.engines["unet"], feed, 1)  # warm-up
    t0 = time.perf_counter()
    plain = type(pipe.engines["unet"])(pipe.dir.onnx_path("unet"), pipe.engines["unet"].config)  # same conditions
    plain_s = time.perf_counter() - t0
    del plain
    t0 = time.perf_counter()
    merged = adapters.merged("unet", refs[0])
    merge_s = time.perf_counter() - t0
    del merged
    t0 = time.perf_counter()
    adapted = adapters.engine("unet", refs[0])
    rebuild_s = time.perf_counter() - t0
    _steps(adapted, feed, 1)  # warm-up
    base_steps, lora_steps = [], []
    for _ in range(steps):  # interleaved, so that other load on the machine weighs on both alike
        base_steps += _steps(pipe.engines["unet"], feed, 1)
        lora_steps += _steps(adapted, feed, 1)
    base_out = pipe.engines["unet"](feed)["out_sample"]
    lora_out = adapted(feed)["out_sample"]
    t0 = time.perf_counter()
    back = adapters.engine("unet", ())
    back_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapters.engine("unet", refs[1])
    second_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = adapters.engine("unet", refs[0])
    cached_s = time.perf_counter() - t0
    return {
        "engine_dir": str(engine_dir), "backend": backend, "resolution": resolution, "rank": rank,
        "lora_modules": modules[0], "load_seconds": load_s,
        "rebuild_seconds": rebuild_s, "merge_seconds": merge_s, "session_seconds": rebuild_s - merge_s,
        "plain_session_seconds": plain_s,
        "switch_back_to_base_seconds": back_s, "second_lora_rebuild_seconds": second_s,
        "cached_switch_seconds": cached_s, "cached_is_same_engine": again is adapted, "back_is_base": back is pipe.engines["unet"],
        "base_step_seconds": base_steps, "lora_step_seconds": lora_steps,
        "base_step_median": statistics.median(base_steps), "lora_step_median": statistics.median(lora_steps),
        "step_ratio_median": statistics.median(l / b for b, l in zip(base_steps, lora_steps)),
        "output_change_max_abs": float((lora_out - base_out).abs().max()),
    }


def markdown(result: dict) -> str:
    from sdrt.bench.report import machine_line

    r = result["figures"]
    overhead = (r["step_ratio_median"] - 1) * 100
    lines = [
        "# sdrt LoRA switch — session rebuild cost and per-step time",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {machine_line(result)}",
        f"- model: `{r['engine_dir']}`, backend {r['backend']}, UNet only, {r['resolution']}x{r['resolution']}, "
        "batch 2 (guidance)",
        f"- LoRA: random weights, kohya format, rank {r['rank']}, alpha 8, on {r['lora_modules']} UNet attention "
        "projections (to_q/to_k/to_v/to_out.0 of every attn1/attn2)",
        f"- load average (1, 5, 15 min) before / after: {[round(v, 2) for v in result['load_average_before_after'][0]]}"
        f" / {[round(v, 2) for v in result['load_average_before_after'][1]]} (other work on the machine inflates "
        "every figure alike)",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- created: {result['created']}",
        "",
        "| what | seconds |",
        "|---|---:|",
        f"| load (base UNet session) | {r['load_seconds']:.2f} |",
        f"| apply the LoRA: rebuild the UNet session | {r['rebuild_seconds']:.2f} |",
        f"| … of which merging deltas into the stored base weights | {r['merge_seconds']:.2f} |",
        f"| … of which creating the session with replaced initializers | {r['session_seconds']:.2f} |",
        f"| for comparison: creating a plain base UNet session at the same point | {r['plain_session_seconds']:.2f} |",
        f"| switch back to the base (resident engine, no rebuild) | {r['switch_back_to_base_seconds']:.4f} |",
        f"| switch to a second LoRA (rebuild) | {r['second_lora_rebuild_seconds']:.2f} |",
        f"| switch back to the first LoRA (cached engine) | {r['cached_switch_seconds']:.4f} |",
        "",
        "| UNet step | median s | all s |",
        "|---|---:|---|",
        f"| base | {r['base_step_median']:.3f} | {', '.join(f'{v:.3f}' for v in r['base_step_seconds'])} |",
        f"| with the LoRA | {r['lora_step_median']:.3f} | {', '.join(f'{v:.3f}' for v in r['lora_step_seconds'])} |",
        "",
        f"Step time with the LoRA vs base (median of the ratios of interleaved pairs): {overhead:+.1f}% (the adapted "
        "session runs the same graph with other weight values, so any difference is run-to-run noise). The LoRA "
        f"changed the UNet output by up to "
        f"{r['output_change_max_abs']:.3g} (so it was applied).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    import datetime

    from sdrt.bench.machine import machine_info, versions

    parser = argparse.ArgumentParser(prog="python -m sdrt.bench.lora_switch", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an engine directory, or sd15 (random-weight full-size SD 1.5, exported once)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed UNet calls per engine (after one warm-up each)")
    parser.add_argument("--backend", default="ort-cpu", choices=("ort-cpu", "ort-cuda"))
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"), help="where `sd15` is built")
    parser.add_argument("-o", "--output", type=Path, default=None, help="folder for result.json and result.md")
    args = parser.parse_args(argv)

    engine_dir = Path(args.model)
    if args.model == "sd15":
        engine_dir = _fullsize_sd15(args.workdir)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        figures = measure(engine_dir, args.rank, args.resolution, args.steps, args.backend, Path(scratch))
    result = {"command": command or "python -m sdrt.bench.lora_switch " + shlex.join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "versions": versions(), "figures": figures,
              "load_average_before_after": [list(load_before), list(os.getloadavg())],
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    text = markdown(result)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "result.json").write_text(json.dumps(result, indent=2))
        (args.output / "result.md").write_text(text)
    print(text)
    return 0


def _fullsize_sd15(workdir: Path) -> Path:
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.runtime.lora.weights import read_weights_maps

    from sdrt.bench.models import prepare_architecture

    def progress(what, done, total):
        print(what, file=sys.stderr)

    paths = prepare_architecture("sd15", "fp32", Path(workdir), progress)
    if "unet" not in read_weights_maps(paths.engine_dir):  # exported before weights maps: export again (resumes)
        export(ExportConfig(model=str(paths.source_dir), output=paths.engine_dir, precision="fp32"),
               lambda name, status: progress(f"export {name}: {status}", 0, 0))
    return paths.engine_dir


if __name__ == "__main__":
    raise SystemExit(main())
