"""The parity gate: each exported component, run by ONNX Runtime (CPU), against the torch module.

Bounds, per precision of the ONNX graph (the torch reference always runs in fp32):
- fp32: relative L∞ error (max |onnx − torch| / max |torch|) ≤ 1e-4. The same arithmetic in a different
  operator order (fused kernels, other GEMM blocking) differs by a few ulps per op; over the ~100 layers
  of a UNet that accumulates to 1e-6…1e-5 relative (tiny models measure ~1e-6). 1e-4 leaves an order of
  magnitude for depth and still catches any real mistake (a wrong layer, a dropped bias: ≥1e-2).
- fp16: PSNR ≥ 35 dB, with the peak taken as the reference's range (apple/ml-stable-diffusion's
  ABSOLUTE_MIN_PSNR): fp16 carries an 11-bit mantissa, so single ops sit near 60-70 dB and a deep network
  near 40-60 dB; below 35 dB an image changes visibly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FP32_MAX_REL_ERROR = 1e-4
FP16_MIN_PSNR_DB = 35.0


@dataclass(frozen=True)
class OutputFigures:
    name: str
    max_abs_error: float
    rel_error: float
    psnr_db: float


def compare(name: str, got: np.ndarray, ref: np.ndarray) -> OutputFigures:
    got = got.astype(np.float64)
    ref = ref.astype(np.float64)
    err = np.abs(got - ref)
    scale = max(float(np.abs(ref).max()), 1e-12)
    mse = float((err**2).mean())
    peak = max(float(ref.max() - ref.min()), 1e-12)
    if not np.isfinite(mse):
        psnr = float("-inf")
    else:
        psnr = float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)
    return OutputFigures(name, float(err.max()), float(err.max()) / scale, min(psnr, 999.0))


def passes(precision: str, figures: list[OutputFigures]) -> bool:
    if any(not np.isfinite(f.max_abs_error) for f in figures):
        return False
    if precision == "fp32":
        return all(f.rel_error <= FP32_MAX_REL_ERROR for f in figures)
    return all(f.psnr_db >= FP16_MIN_PSNR_DB for f in figures)


def bound_text(precision: str) -> str:
    return f"relative error <= {FP32_MAX_REL_ERROR:g}" if precision == "fp32" else f"PSNR >= {FP16_MIN_PSNR_DB:g} dB"


def reference_outputs(module: torch.nn.Module, inputs: tuple) -> list[np.ndarray]:
    """The fp32 torch module's outputs (inputs upcast: an fp16 export is compared with the fp32 model)."""
    with torch.no_grad():
        out = module(*[x.float() if x.is_floating_point() else x for x in inputs])
    return [o.float().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


def cpu_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_outputs(session, inputs: tuple, references: list[np.ndarray], input_names, output_names) -> list[OutputFigures]:
    """Run ORT on the same inputs (cast to the graph's declared dtypes); figures per output."""
    declared = {i.name: i.type for i in session.get_inputs()}
    feed = {}
    for name, x in zip(input_names, inputs):
        arr = x.numpy()
        feed[name] = arr.astype(np.float16) if declared[name] == "tensor(float16)" else arr
    got = session.run(list(output_names), feed)
    return [compare(n, g, r) for n, g, r in zip(output_names, got, references)]
