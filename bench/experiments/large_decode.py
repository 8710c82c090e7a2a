"""A large image through the tiled VAE decoder: peak memory and time, against the untiled estimate.

    python -m sdrt.bench.experiments.large_decode --arch sdxl --size 2048 [-o bench/results/NAME]

Builds the architecture's full-size VAE from its published config (bench/configs, random weights: memory and time
do not depend on the values), exports its decoder as `sdrt export` does (export/components.py's vae_decoder spec,
fp32, one ONNX file), then decodes one SIZE² image's latents in a fresh process with the runtime's own tiled
decode (runtime/vae_tiling.tiled_decode over an ORT engine, the call Pipeline.decode makes) and reports that
process's peak RSS (getrusage ru_maxrss), the wall time, the tile count and runtime/limits.py's estimates for the
tiled and the untiled decode.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = "sdrt-bench-large-decode/1"

_DECODE = """
import json, resource, sys, time
import torch
from sdrt.engines.ort import OrtConfig, OrtEngine
from sdrt.runtime import feed, vae_tiling
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
engine = OrtEngine(a["onnx"], OrtConfig(intra_op_threads=a["threads"]))
tiles = vae_tiling.Tiles.of_vae(a["vae_config"])
z = torch.randn(1, 4, a["size"] // 8, a["size"] // 8, generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
image = vae_tiling.tiled_decode(lambda x: feed.run(engine, latent_sample=x)["sample"], z, tiles)
seconds = time.perf_counter() - t0
print(json.dumps({"shape": list(image.shape), "seconds": seconds, "finite": bool(torch.isfinite(image).all()),
                  "tiles": tiles.count(*z.shape[-2:]), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def export_decoder(arch: str, folder: Path) -> tuple[Path, dict]:
    import diffusers
    import torch

    from sdrt.bench.fullsize import config
    from sdrt.export.components import _VaeDecoder
    from sdrt.export.onnx_export import torch_to_onnx

    vae_config = config(arch)["vae"]
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**vae_config).eval()
    path = folder / "vae_decoder.onnx"
    axes = {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
            "sample": {0: "batch_size", 2: "height", 3: "width"}}
    torch_to_onnx(_VaeDecoder(vae), (torch.randn(1, 4, 16, 16),), path, ["latent_sample"], ["sample"], axes)
    return path, dict(vae.config)


def measure(arch: str, size: int, threads: int) -> dict:
    from sdrt.bench.machine import versions
    from sdrt.runtime import limits, vae_tiling

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, vae_config = export_decoder(arch, Path(tmp))
        vae_config = {k: v for k, v in vae_config.items() if not k.startswith("_")}
        args = {"onnx": str(onnx_path), "vae_config": vae_config, "size": size, "threads": threads}
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _DECODE, json.dumps(args)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "decode failed")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    latent = size // 8
    tile = vae_tiling.Tiles.of_vae(vae_config).latent_size
    return {
        "schema": SCHEMA, "arch": arch, "size": size, "threads": threads, **result,
        "process_seconds": round(wall, 1),
        "estimate_untiled_bytes": limits.vae_decoder_bytes(vae_config, 1, latent, latent, 8),
        "estimate_tiled_bytes": limits.tiled_vae_decoder_bytes(vae_config, 1, latent, latent, 8, tile),
        "machine": f"{platform.processor() or platform.machine()}, {_cores()} logical cores, {_ram_gib()} GiB",
        "versions": versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def _ram_gib() -> float:
    import os

    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def markdown(r: dict, command: str) -> str:
    gib = 2**30
    return "\n".join([
        f"# Tiled VAE decode: {r['arch']} {r['size']}×{r['size']}",
        "",
        f"- command: `{command}`",
        f"- machine: {r['machine']}; {r['threads']} thread(s); versions: " +
        ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"- created: {r['created']}",
        "",
        "| | |",
        "|---|---:|",
        f"| output | {'×'.join(map(str, r['shape']))}, finite: {r['finite']} |",
        f"| tiles | {r['tiles']} |",
        f"| decode time | {r['seconds']:.1f} s |",
        f"| peak RSS of the decoding process | {r['peak_rss_bytes'] / gib:.2f} GiB |",
        f"| runtime/limits.py estimate, tiled | {r['estimate_tiled_bytes'] / gib:.2f} GiB |",
        f"| runtime/limits.py estimate, untiled | {r['estimate_untiled_bytes'] / gib:.2f} GiB |",
        "",
        "Random weights (the architecture from its published config): the pixels mean nothing, the memory and time do.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdrt.bench.experiments.large_decode", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="sdxl")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.size % 8:
        print(f"error: --size must be a multiple of 8, got {a.size}", file=sys.stderr)
        return 2
    result = measure(a.arch, a.size, a.threads)
    command = "python -m sdrt.bench.experiments.large_decode " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(result, command))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        (a.out / "result.md").write_text(markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
