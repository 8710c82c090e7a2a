"""Where ONNX Runtime's CPU time goes inside one component: per node group, milliseconds and GFLOP/s.

Usage: python -m sdrt.bench.experiments.op_profile ENGINE_DIR [--resolution 512] [--components unet,vae_decoder]
       [--threads 2] [--warmup 2] [-o bench/results/NAME]
Runs each component's ONNX file in an ONNX Runtime CPU session with profiling on, warm-up runs first (the
first runs grow the memory arena), then one profiled run, and reads ONNX Runtime's own per-node kernel times
(https://onnxruntime.ai/docs/performance/tune-performance/profiling-tools.html). FLOPs are computed from each
node's shapes as recorded by the profiler: Conv 2·out·(Cin/groups)·kh·kw, MatMul/FusedMatMul/Gemm 2·out·K
(K read from A, which ONNX Runtime's fusions may hand over transposed).
These are the FLOPs the graph executes (after sdrt's export rewrites), not the diffusers model's. It also
measures the best dense matmul this machine gives ONNX Runtime (MLAS) and torch, as in `sdrt bench`.
Writes profile.json (every node) and profile.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

GEMM_OPS = ("Conv", "MatMul", "FusedMatMul", "Gemm")
# (substring of the node name, group) — first match wins; names are the exporter's module paths
GROUPS = (("/attn1/", "self-attention"), ("/attn2/", "cross-attention"), ("/attentions.0/to_", "self-attention"),
          ("/mid_block/attentions", "self-attention"), ("/ff/", "feed-forward"), ("upsamplers", "upsampling"),
          ("downsamplers", "downsampling"), ("/resnets.", "resnet"), ("/proj_in", "transformer in/out"),
          ("/proj_out", "transformer in/out"), ("/norm", "transformer in/out"))
SYMBOLIC = {"batch_size": 1, "sequence_length": 77}


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> int:
    """FLOPs (2 per multiply-add) of one Conv/MatMul/FusedMatMul/Gemm from its profiled shapes; 0 otherwise."""
    if op == "Conv" and len(inputs) > 1:  # weight [O, I/groups, kh, kw]; NCHWc outputs count the same elements
        return 2 * math.prod(outputs[0]) * math.prod(inputs[1][1:])
    if op in ("MatMul", "FusedMatMul", "Gemm") and inputs:  # A [..., M, K], or [..., K, M] when transposed (transA)
        a, out = inputs[0], outputs[0]
        k = a[-1] if len(a) < 2 or a[-2] == out[-2] else a[-2]
        return 2 * math.prod(out) * k
    return 0


def group_of(node: str, op: str) -> str:
    for key, group in GROUPS:
        if key in node:
            return f"{group} ({'GEMM' if op in GEMM_OPS else 'other'})"
    return f"rest ({'GEMM' if op in GEMM_OPS else 'other'})"


def vae_factor(engine: Path) -> int:
    """Pixels per latent: 2^(VAE levels - 1), from the engine directory's vae_decoder/config.json."""
    config = json.loads((engine / "vae_decoder" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def _feed(session, latent: int, factor: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = latent * factor
    dims = {**SYMBOLIC, "height": latent, "width": latent, "latent_height": latent, "latent_width": latent,
            "sample_height": pixels, "sample_width": pixels}
    feed = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else dims[d] for d in arg.shape]
        if arg.type == "tensor(int64)" or arg.type == "tensor(int32)":
            feed[arg.name] = rng.integers(0, 49407, shape).astype(np.int64 if "64" in arg.type else np.int32)
        elif arg.name == "timestep":
            feed[arg.name] = np.array(999.0, np.float32)
        elif arg.name == "time_ids":
            feed[arg.name] = np.array([[pixels, pixels, 0, 0, pixels, pixels][: shape[-1]]], np.float32)
        else:
            dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
            feed[arg.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def profile_component(path: Path, latent: int, factor: int, threads: int, warmup: int) -> dict:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = _feed(session, latent, factor)
        for _ in range(warmup):
            session.run(None, feed)
        started = time.perf_counter()
        session.run(None, feed)
        wall = time.perf_counter() - started
        events = json.loads(Path(session.end_profiling()).read_text())
    run_start = [e for e in events if e.get("name") == "model_run"][-1]["ts"]
    nodes = []
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < run_start:
            continue
        args = e["args"]
        shapes = lambda key: [next(iter(d.values())) for d in args.get(key, [])]  # noqa: E731
        op = args["op_name"]
        nodes.append({"name": e["name"][: -len("_kernel_time")], "op": op, "ms": e["dur"] / 1e3,
                      "flops": node_flops(op, shapes("input_type_shape"), shapes("output_type_shape"))})
    return {"wall_ms": wall * 1e3, "nodes": nodes, "groups": summarize(nodes)}


def summarize(nodes: list[dict]) -> list[dict]:
    """Per group: ms, share of the kernel time, GFLOP and GFLOP/s; largest first."""
    total = sum(n["ms"] for n in nodes) or 1.0
    acc: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "flops": 0})
    for n in nodes:
        g = acc[group_of(n["name"], n["op"])]
        g["ms"] += n["ms"]
        g["flops"] += n["flops"]
    rows = [{"group": name, "ms": v["ms"], "share": v["ms"] / total, "gflop": v["flops"] / 1e9,
             "gflop_per_s": v["flops"] / v["ms"] / 1e6 if v["flops"] and v["ms"] else None} for name, v in acc.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def floor_ms(nodes: list[dict], rate_gflop_per_s: float) -> float:
    """The component's time if every GEMM ran at `rate` and everything else stayed as measured."""
    gemm = sum(n["flops"] for n in nodes) / 1e9 / rate_gflop_per_s * 1e3
    return gemm + sum(n["ms"] for n in nodes if not n["flops"])


def markdown(result: dict) -> str:
    lines = [f"# ONNX Runtime CPU profile — {result['engine']}", "",
             f"- command: `{result['command']}`", f"- machine: {result['machine']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
             f"- matmul peak: {result['peak']['gflop_per_s']:.1f} GFLOP/s ({result['peak']['what']})", ""]
    for name, comp in result["components"].items():
        gemm = [n for n in comp["nodes"] if n["flops"]]
        gemm_ms, gemm_gf = sum(n["ms"] for n in gemm), sum(n["flops"] for n in gemm) / 1e9
        lines += [f"## {name} ({result['resolution']}², batch 1)", "",
                  f"wall {comp['wall_ms']:,.0f} ms; kernels {sum(n['ms'] for n in comp['nodes']):,.0f} ms, of which "
                  f"GEMM (Conv/MatMul/Gemm) {gemm_ms:,.0f} ms for {gemm_gf:,.1f} GFLOP = {gemm_gf / gemm_ms * 1e3:.1f} "
                  f"GFLOP/s; everything else {sum(n['ms'] for n in comp['nodes']) - gemm_ms:,.0f} ms. "
                  f"At the matmul peak for every GEMM: {floor_ms(comp['nodes'], result['peak']['gflop_per_s']):,.0f} ms.",
                  "", "| group | ms | share | GFLOP | GFLOP/s |", "|---|---:|---:|---:|---:|"]
        for r in comp["groups"]:
            rate = f"{r['gflop_per_s']:.1f}" if r["gflop_per_s"] else ""
            lines.append(f"| {r['group']} | {r['ms']:,.1f} | {100 * r['share']:.1f}% | {r['gflop']:,.1f} | {rate} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import onnxruntime as ort
    import torch

    from sdrt.bench.flops import measure_peak
    from sdrt.bench.machine import cpu_model

    parser = argparse.ArgumentParser(prog="python -m sdrt.bench.experiments.op_profile")
    parser.add_argument("engine", type=Path)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--components", default="unet,vae_decoder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("-o", "--out", type=Path)
    args = parser.parse_args(argv)
    factor = vae_factor(args.engine)
    latent = args.resolution // factor
    peak = measure_peak(args.threads)
    result = {
        "engine": args.engine.name, "resolution": args.resolution, "threads": args.threads,
        "command": "python -m sdrt.bench.experiments.op_profile " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu_model()}, {os.cpu_count()} logical cores, {args.threads} threads",
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__},
        "peak": {"gflop_per_s": peak.flops_per_second / 1e9, "what": peak.what},
        "components": {},
    }
    for name in args.components.split(","):
        result["components"][name] = profile_component(args.engine / name / "model.onnx", latent, factor,
                                                       args.threads, args.warmup)
        print(f"{name}: {result['components'][name]['wall_ms']:,.0f} ms", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.json").write_text(json.dumps(result, indent=1))
        (args.out / "profile.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
