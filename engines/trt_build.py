"""Building TensorRT plans from the export stage's ONNX, one component and profile at a time.

TensorRT ≥ 10 builds strongly typed networks: precision comes from the ONNX (fp16 baked in at export),
which is also the only mode TensorRT 11 has. For TensorRT < 10 the fp16 builder flag is set instead.
Written against the documented Python API (trt.Builder, OnnxParser, optimization profiles, timing cache);
it has not run where sdrt is developed (no TensorRT there).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import UserError

from sdrt.engines.tensorrt import import_tensorrt


@dataclass(frozen=True)
class BuildOptions:
    optimization_level: int = 3
    refittable: bool = False
    timing_cache: Path | None = None
    workspace_gib: float | None = None


def build_plan(onnx_path: Path, plan_path: Path, shapes: dict[str, tuple], label: str, options: BuildOptions) -> dict:
    """Build one plan; shapes = {input: (min, opt, max)}. Returns build seconds and plan size."""
    trt = import_tensorrt()
    major = int(trt.__version__.split(".")[0])
    logger = trt.Logger(trt.Logger.WARNING)
    started = time.perf_counter()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major >= 10 else \
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves model.onnx_data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path} ({label}): {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if major < 10:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        if lo:  # rank-0 inputs (timestep) need no profile
            profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build {label} (often out of GPU memory: try a smaller profile, "
                        "--dynamic with a narrower range, or a lower --optimization-level)")
    _write_atomic(plan_path, bytes(serialized))
    if options.timing_cache:
        _write_atomic(options.timing_cache, bytes(cache.serialize()))
    size = plan_path.stat().st_size
    del serialized, config, parser, network, builder
    gc.collect()
    return {"build_seconds": round(time.perf_counter() - started, 1), "size_bytes": size}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
