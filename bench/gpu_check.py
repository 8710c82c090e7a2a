"""One command for a GPU host: TensorRT and ONNX Runtime CUDA against ONNX Runtime CPU on the tiny models.

Usage: python -m sdrt.bench.gpu_check [--workdir build/gpu_check]
Exports each tiny family in fp16, builds static 64x64 TensorRT plans where TensorRT is importable, generates
the same image with every available backend and prints PSNR against ORT CPU (≥ 35 dB passes) and the
time per image. Backends that cannot run here are listed with the reason, not hidden.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

from sdrt.bench.measure.stats import psnr

FAMILIES = {"sd15": 7.5, "sdxl": 5.0, "sdxl-lightning": 0.0}
SIZE = 64
MIN_PSNR_DB = 35.0


def availability() -> dict[str, str | None]:
    """backend → None when it can run here, else the reason it cannot."""
    import onnxruntime as ort
    import torch

    gpu = torch.cuda.is_available()
    return {
        "ort-cpu": None,
        "ort-cuda": None if gpu and "CUDAExecutionProvider" in ort.get_available_providers()
        else "needs a CUDA GPU and onnxruntime-gpu",
        "tensorrt": None if gpu and importlib.util.find_spec("tensorrt") else "needs a CUDA GPU and TensorRT",
    }


def build_plans(engine_dir: Path, guidance: bool) -> None:
    from sdrt.engines import trt_dir, trt_profiles
    from sdrt.engines.tensorrt import device_info
    from sdrt.engines.trt_build import BuildOptions

    cc, version = device_info()
    profiles = trt_profiles.profiles([f"{SIZE}x{SIZE}"], None, "1", guidance, 4)
    planned = trt_dir.plan(engine_dir, profiles, None, cc, version)
    trt_dir.build(engine_dir, planned, BuildOptions(timing_cache=engine_dir / "trt" / "timing.cache"), cc, version)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("build/gpu_check"))
    args = parser.parse_args()

    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny import write_tiny_pipeline
    from sdrt.runtime.pipeline import Pipeline, Request

    can_run = availability()
    rows = []
    for family, guidance in FAMILIES.items():
        model = args.workdir / "models" / family
        if not model.exists():
            write_tiny_pipeline(family, model)
        engine_dir = args.workdir / "engines" / family
        if not engine_dir.exists():
            export(ExportConfig(model=str(model), output=engine_dir, precision="fp16"))
        if can_run["tensorrt"] is None:
            build_plans(engine_dir, guidance > 1)
        request = Request.of(prompt=("a photo of a cat",), steps=4, guidance=guidance, seed=1, width=SIZE, height=SIZE)
        images = {}
        for backend, reason in can_run.items():
            if reason:
                rows.append((family, backend, "skipped", reason))
                continue
            pipe = Pipeline.load(engine_dir, backend=backend)
            pipe.generate(request)  # warm-up
            started = time.perf_counter()
            images[backend] = np.asarray(pipe.generate(request)[0])
            ms = (time.perf_counter() - started) * 1000
            if backend == "ort-cpu":
                rows.append((family, backend, f"{ms:.1f} ms", "reference"))
            else:
                value = psnr(images[backend], images["ort-cpu"])
                verdict = "pass" if value >= MIN_PSNR_DB else "FAIL"
                rows.append((family, backend, f"{ms:.1f} ms", f"PSNR {value:.1f} dB vs ort-cpu: {verdict}"))
    print(f"{'family':<16}{'backend':<10}{'time':<12}result")
    for row in rows:
        print(f"{row[0]:<16}{row[1]:<10}{row[2]:<12}{row[3]}")


if __name__ == "__main__":
    main()
