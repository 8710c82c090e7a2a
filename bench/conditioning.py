"""Per-step cost of image conditioning against the plain UNet: each ControlNet, the residual UNet, the IP-Adapter UNet.

    python -m sdrt.bench.conditioning ENGINE_DIR [--resolution 512] [--calls 5] [--backend ort-cpu] [-o OUT]

One "step" is one call at the given resolution with the guidance batch (2 images' worth: uncond + cond), on random
inputs shaped from the manifest's I/O specs. Calls are interleaved (plain, residual UNet, each ControlNet, IP UNet,
then again) so that load on a shared machine spreads over all of them; the median of --calls is reported. A step
with ControlNets costs unet_controlnet + Σ controlnet/NAME; outside the start/end window only unet_controlnet runs.
Prints JSON; writes result.json into OUT when given.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch


def _feed(entry: dict, latent_h: int, latent_w: int, factor: int, batch: int = 2) -> dict[str, torch.Tensor]:
    dims = {"batch_size": batch, "sequence_length": 77, "height": latent_h, "width": latent_w,
            "sample_height": latent_h * factor, "sample_width": latent_w * factor, "ip_images": 1}
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
        elif dtype == torch.int64:
            feed[spec["name"]] = torch.zeros(shape, dtype=dtype)
        else:
            feed[spec["name"]] = torch.randn(shape, generator=g).to(dtype)
    return feed


def measure(engine_dir: Path, resolution: int, calls: int, backend: str) -> dict:
    from sdrt.engines.select import open_engine
    from sdrt.runtime.loader import read_manifest

    manifest = read_manifest(engine_dir)
    factor = manifest["vae_scale_factor"]
    names = [n for n in manifest["components"]
             if n in ("unet", "unet_controlnet", "unet_ip") or n.startswith("controlnet/")]
    engines = {n: open_engine(engine_dir / n / "model.onnx", backend) for n in names}
    feeds = {n: _feed(manifest["components"][n], resolution // factor, resolution // factor, factor) for n in names}
    for n in names:  # warm-up
        engines[n](feeds[n])
    times = {n: [] for n in names}
    for _ in range(calls):
        for n in names:
            start = time.perf_counter()
            engines[n](feeds[n])
            times[n].append(time.perf_counter() - start)
    ms = {n: round(statistics.median(t) * 1000, 2) for n, t in times.items()}
    out = {"engine_dir": str(engine_dir), "resolution": resolution, "batch": 2, "calls": calls, "backend": backend,
           "median_ms": ms}
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
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("-o", "--out", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.engine_dir, args.resolution, args.calls, args.backend)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
