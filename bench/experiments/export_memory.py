"""Peak RSS and wall time of `sdrt export` on a full-size architecture with random weights.

Usage: python -m sdrt.bench.experiments.export_memory sd15|sdxl|sd35m|flux-schnell [--precision fp16] [--workdir DIR]
       [--pulid]
(sd35m and flux-schnell: full width, reduced depth where bench/configs/*.json say; bench/fullsize_flow.py; --pulid:
SDXL with a full-size random PuLID v1 file, bench/fullsize.py write_pulid)
The export runs in a child process (the real CLI); its peak RSS is the kernel's ru_maxrss for children.
Writes bench/results/export_memory_<arch>_<precision>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("arch", choices=["sd15", "sdxl", "sd35m", "flux-schnell"])
    parser.add_argument("--precision", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--workdir", type=Path, default=Path("build/fullsize"))
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--pulid", action="store_true", help="export with --pulid (SDXL)")
    args = parser.parse_args()

    from sdrt.bench.fullsize import write, write_pulid
    from sdrt.export.exporter import versions

    model = args.workdir / f"{args.arch}-random"
    if not (model / "model_index.json").exists():
        started = time.perf_counter()
        write(args.arch, model)
        print(f"wrote {model} in {time.perf_counter() - started:.0f} s", flush=True)
    suffix = "_pulid" if args.pulid else ""
    out = args.workdir / f"{args.arch}-{args.precision}{suffix}-engine"
    shutil.rmtree(out, ignore_errors=True)
    extra = []
    if args.pulid:
        pulid_file = args.workdir / f"{args.arch}-pulid_v1.bin"
        if not pulid_file.exists():
            print(write_pulid(model, pulid_file), flush=True)
        extra = ["--pulid", str(pulid_file)]
    command = [sys.executable, "-m", "sdrt.cli.main", "export", str(model), "-o", str(out),
               "--precision", args.precision, "--json", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"export failed:\n{result.stderr}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads(result.stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    record = {
        "command": " ".join(["python -m sdrt.bench.experiments.export_memory", args.arch, "--precision", args.precision,
                             *(["--pulid"] if args.pulid else [])]),
        "export_command": "sdrt export <random-weight folder> -o <dir> --precision " + args.precision + " --json" +
                          (" --pulid <random full-size pulid_v1.bin>" if args.pulid else ""),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": __import__("os").cpu_count(),
                    "memory_gib": round(__import__("os").sysconf("SC_PAGE_SIZE") * __import__("os").sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "versions": versions(),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "parameters": _parameters(args.arch),
        "wall_seconds": round(wall, 1),
        "components": {name: {"precision": c["precision"], "export_seconds": c["export_seconds"],
                              "files_mib": round(sum((out / name / f).stat().st_size for f in c["files"]) / 2**20, 1),
                              "gate": summary["components"][name]["gate_bound"],
                              "worst_rel_error": summary["components"][name]["worst_rel_error"],
                              "worst_psnr_db": summary["components"][name]["worst_psnr_db"]}
                       for name, c in manifest["components"].items()},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"export_memory_{args.arch}_{args.precision}{suffix}.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


def _parameters(arch: str) -> dict | None:
    """Parameters per component of what was exported, and of the full-depth model (flow architectures)."""
    from sdrt.bench import fullsize_flow

    if arch not in fullsize_flow.FLOW_ARCHITECTURES:
        return None
    return {"exported": fullsize_flow.parameters(arch), "full_depth": fullsize_flow.parameters(arch, full_depth=True),
            "reduced": fullsize_flow.config(arch).get("_reduced")}


if __name__ == "__main__":
    main()
