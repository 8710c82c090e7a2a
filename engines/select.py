"""Backend choice: `--backend auto|tensorrt|ort-cuda|ort-cpu|torch` → an Engine for one component."""

from __future__ import annotations

from pathlib import Path

from sdrt.runtime.errors import UserError

BACKENDS = ("auto", "tensorrt", "ort-cuda", "ort-cpu", "torch")
# Fastest first; `auto` takes the first one this machine can run.
_PREFERENCE = ("tensorrt", "ort-cuda", "ort-cpu")


def resolve_backend(requested: str, available: list[str]) -> str:
    if requested not in BACKENDS:
        raise UserError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return next(b for b in _PREFERENCE if b in available)
    if requested not in available:
        raise UserError(f"backend {requested} cannot run on this machine; available here: {', '.join(available)}")
    return requested


def open_engine(onnx_path: Path, backend: str = "auto", ort_config=None):
    from .ort import OrtConfig, OrtEngine, available_backends

    # TensorRT plans are selected per shape by the TensorRT backend; until a directory holds plans,
    # `auto` runs the ONNX graphs with ONNX Runtime.
    available = [b for b in available_backends() if b != "tensorrt"] if backend == "auto" else available_backends()
    chosen = resolve_backend(backend, available)
    if chosen in ("ort-cpu", "ort-cuda"):
        base = ort_config or OrtConfig()
        config = OrtConfig(**{**base.__dict__, "provider": "cuda" if chosen == "ort-cuda" else "cpu"})
        return OrtEngine(onnx_path, config)
    raise UserError(f"backend {chosen} is not wired into `sdrt run` yet; use ort-cpu or ort-cuda")
