"""Per-step cost of image conditioning against the plain UNet: each ControlNet, the residual UNet, the IP-Adapter UNet,
PuLID's UNet (its ID attention) and, once per identity, PuLID's ID encoder.

    python -m sdrt.bench.conditioning ENGINE_DIR [--resolution 512] [--calls 5] [--backend ort-cpu] [-o OUT]
                                      [--rounds N]

One "step" is one call at the given resolution with the guidance batch (2 images' worth: uncond + cond), on random
inputs shaped from the manifest's I/O specs (PuLID: fidelity mode, 10 ID tokens + 8 zero rows, scale 0.8; its
encoder: one photo's inputs, batch 1). Calls are interleaved (plain, residual UNet, each ControlNet, IP UNet, then
again) so that load on a shared machine spreads over all of them; the median of --calls is reported. A step with
ControlNets costs unet_controlnet + Σ controlnet/NAME; outside the start/end window only unet_controlnet runs.
--rounds N: each graph in a fresh process instead, one after another, N rounds (graphs that do not fit in memory
together: a full-size SDXL UNet beside unet_pulid); the median over all rounds' calls. --with-diffusers (with
--rounds): the same calls on diffusers' UNet in torch, plain and with PuLID's ID attention processors swapped in (the
module unet_pulid is traced from: PuLID's IDAttnProcessor2_0 re-stated, tests/test_pulid.py), from the folder the
engine directory was exported from: the fair baseline for each step.
Prints JSON; writes result.json into OUT when given.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from sdrt.runtime.errors import UserError


PULID_UNET, PULID_ENCODER = "unet_pulid", "pulid/encoder"  # export/extras/pulid.py
PULID_SCALARS = {"id_scale": 0.8, "id_ortho": 0.0, "id_ortho_v2": 1.0}  # PuLID's app, v1 "fidelity" (ORTHO_v2)


def _feed(entry: dict, latent_h: int, latent_w: int, factor: int, batch: int = 2) -> dict[str, torch.Tensor]:
    dims = {"batch_size": batch, "sequence_length": 77, "height": latent_h, "width": latent_w,
            "sample_height": latent_h * factor, "sample_width": latent_w * factor, "ip_images": 1,
            "id_tokens": 18, "patches": 577}  # PuLID v1 fidelity: 10 ID tokens + 8 zero rows; EVA's 577 tokens
    g = torch.Generator().manual_seed(0)
    feed = {}
    for spec in entry["inputs"]:
        shape = []
        for d in spec["shape"]:
            if isinstance(d, int):
                shape.append(d)
                continue
            m = re.fullmatch(r"(height|width)_div(\d+)", d)
            shape.append(-(-dims[m.group(1)] // int(m.group(2))) if m else dims[d])
        dtype = {"float16": torch.float16, "int64": torch.int64}.get(spec["dtype"], torch.float32)
        if spec["name"] in ("timestep",):
            feed[spec["name"]] = torch.tensor(500.0)
        elif spec["name"] in ("conditioning_scale", "ip_scale_0"):
            feed[spec["name"]] = torch.tensor(1.0)
        elif spec["name"] in PULID_SCALARS:
            feed[spec["name"]] = torch.tensor(PULID_SCALARS[spec["name"]])
        elif dtype == torch.int64:
            feed[spec["name"]] = torch.zeros(shape, dtype=dtype)
        else:
            feed[spec["name"]] = torch.randn(shape, generator=g).to(dtype)
    return feed


def graph_names(manifest: dict) -> list[str]:
    return [n for n in manifest["components"]
            if n in ("unet", "unet_controlnet", "unet_ip", PULID_UNET, PULID_ENCODER) or n.startswith("controlnet/")]


def _feeds(manifest: dict, names: list[str], resolution: int) -> dict:
    factor = manifest["vae_scale_factor"]
    return {n: _feed(manifest["components"][n], resolution // factor, resolution // factor, factor,
                     batch=1 if n == PULID_ENCODER else 2) for n in names}


def _times(engine_dir: Path, names: list[str], resolution: int, calls: int, backend: str) -> dict[str, list]:
    """Open each graph, one warm-up call, then `calls` timed calls interleaved across graphs (seconds)."""
    from sdrt.engines.select import open_engine
    from sdrt.runtime.loader import read_manifest

    manifest = read_manifest(engine_dir)
    engines = {n: open_engine(engine_dir / n / "model.onnx", backend) for n in names}
    feeds = _feeds(manifest, names, resolution)
    for n in names:  # warm-up
        engines[n](feeds[n])
    times = {n: [] for n in names}
    for _ in range(calls):
        for n in names:
            start = time.perf_counter()
            engines[n](feeds[n])
            times[n].append(time.perf_counter() - start)
    return times


TORCH = "diffusers:"  # a graph name's prefix: the torch module it was exported from, run by diffusers


def _torch_module(manifest: dict, name: str):
    """diffusers' UNet from the export's source folder, as unet or (PuLID's processors swapped in) unet_pulid."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from sdrt.export.components import _unet_spec
    from sdrt.export.extras import pulid

    unet = UNet2DConditionModel.from_pretrained(Path(manifest["source"]["location"]) / "unet").eval()
    if name == "unet":  # the module the exporter traces for `unet`
        added = unet.config.addition_embed_type == "text_time"
        return _unet_spec(added).make_module(SimpleNamespace(unet=unet)).eval()
    source = manifest["pulid"]["source"]
    ids = pulid.id_unet(SimpleNamespace(unet=unet), pulid.read(source, source), source)
    return pulid.unet_spec(None, ids, unet.config.cross_attention_dim).make_module(None).eval()


def _torch_times(engine_dir: Path, name: str, resolution: int, calls: int) -> dict[str, list]:
    from sdrt.runtime.loader import read_manifest

    manifest = read_manifest(engine_dir)
    graph = name.removeprefix(TORCH)
    module = _torch_module(manifest, graph)
    feed = _feeds(manifest, [graph], resolution)[graph]
    args = [feed[spec["name"]] for spec in manifest["components"][graph]["inputs"]]
    times = []
    with torch.no_grad():
        module(*args)  # warm-up
        for _ in range(calls):
            start = time.perf_counter()
            module(*args)
            times.append(time.perf_counter() - start)
    return {name: times}


def _times_in_processes(engine_dir: Path, names: list[str], resolution: int, calls: int, backend: str,
                        rounds: int) -> dict[str, list]:
    """Each graph alone in a fresh process (load, warm-up, `calls` calls), graph after graph, `rounds` times, every
    other round in reverse order (a drifting machine then favours no graph); each graph's calls in round order."""
    import subprocess

    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            done = subprocess.run([sys.executable, "-m", "sdrt.bench.conditioning", str(engine_dir), "--only", n,
                                   "--resolution", str(resolution), "--calls", str(calls), "--backend", backend],
                                  capture_output=True, text=True)
            if done.returncode:  # e.g. killed for memory (-9): one line, not the child's traceback
                last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                raise UserError(f"timing {n} in its own process failed: {last}")
            times[n] += json.loads(done.stdout)[n]
    return times


def measure(engine_dir: Path, resolution: int, calls: int, backend: str, rounds: int = 0,
            with_diffusers: bool = False) -> dict:
    from sdrt.runtime.loader import read_manifest

    from sdrt.bench.machine import load_average, machine_info, versions

    manifest = read_manifest(engine_dir)
    names = graph_names(manifest)
    load_before = load_average()
    if with_diffusers:
        if not rounds:
            raise ValueError("--with-diffusers needs --rounds (torch and ONNX Runtime each in a process of its own)")
        names += [TORCH + n for n in ("unet", PULID_UNET) if n in names]
    if rounds:
        times = _times_in_processes(engine_dir, names, resolution, calls, backend, rounds)
    else:
        times = _times(engine_dir, names, resolution, calls, backend)
    ms = {n: round(statistics.median(t) * 1000, 2) for n, t in times.items()}
    out = {"engine_dir": str(engine_dir), "resolution": resolution, "batch": 2, "calls": calls, "backend": backend,
           "rounds_in_fresh_processes": rounds, "median_ms": ms,
           "calls_ms": {n: [round(x * 1000, 1) for x in t] for n, t in times.items()},
           "machine": machine_info(), "versions": versions(),
           "load_average_before_after": [load_before, load_average()]}
    if "unet" in ms:
        plain = ms["unet"]
        nets = [n for n in ms if n.startswith("controlnet/")]
        if "unet_controlnet" in ms:
            out["controlnet_step_ms"] = {n: round(ms["unet_controlnet"] + ms[n], 2) for n in nets}
            out["residual_unet_vs_plain"] = round(ms["unet_controlnet"] / plain, 3)
            out["step_with_all_controlnets_vs_plain"] = round((ms["unet_controlnet"] + sum(ms[n] for n in nets))
                                                              / plain, 3)
        if "unet_ip" in ms:
            out["ip_unet_vs_plain"] = round(ms["unet_ip"] / plain, 3)
        if PULID_UNET in ms:
            out["pulid_unet_vs_plain"] = round(ms[PULID_UNET] / plain, 3)
            if rounds:
                out["pulid_unet_vs_plain_per_round"] = _per_round(times, PULID_UNET, "unet", calls, rounds)
    if TORCH + "unet" in ms and TORCH + PULID_UNET in ms:
        out["diffusers_pulid_unet_vs_plain"] = round(ms[TORCH + PULID_UNET] / ms[TORCH + "unet"], 3)
        out["diffusers_pulid_unet_vs_plain_per_round"] = _per_round(times, TORCH + PULID_UNET, TORCH + "unet", calls,
                                                                    rounds)
        out["diffusers_vs_sdrt_pulid_step"] = round(ms[TORCH + PULID_UNET] / ms[PULID_UNET], 3)
    if PULID_ENCODER in ms:
        out["pulid_encoder_ms_per_identity"] = ms[PULID_ENCODER]  # batch 1; the negative's tokens are constant
    return out


def _per_round(times: dict, name: str, base: str, calls: int, rounds: int) -> list[float]:
    """median(name) / median(base) within each round: the two ran minutes apart, not a whole run apart."""
    def chunk(n, r):
        return statistics.median(times[n][r * calls:(r + 1) * calls])
    return [round(chunk(name, r) / chunk(base, r), 3) for r in range(rounds)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("-o", "--out", type=Path)
    parser.add_argument("--rounds", type=int, default=0, help="each graph in a fresh process, N rounds")
    parser.add_argument("--with-diffusers", action="store_true", help="with --rounds: diffusers' UNet too")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # one graph's call times (s), for --rounds
    args = parser.parse_args(argv)
    if args.with_diffusers and not args.rounds:
        parser.error("--with-diffusers needs --rounds N (torch and ONNX Runtime each in a process of its own)")
    if args.only:
        times = _torch_times(args.engine_dir, args.only, args.resolution, args.calls) if args.only.startswith(TORCH) \
            else _times(args.engine_dir, [args.only], args.resolution, args.calls, args.backend)
        print(json.dumps(times))
        return
    result = measure(args.engine_dir, args.resolution, args.calls, args.backend, args.rounds, args.with_diffusers)
    result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])  # `sdrt bench …` or this module's
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
