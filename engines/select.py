"""Backend choice: `--backend auto|tensorrt|ort-cuda|ort-cpu|torch` → an Engine for one component."""

from __future__ import annotations

from pathlib import Path

import torch

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


_TRT_SHARED = None


def open_engine(onnx_path: Path, backend: str = "auto", ort_config=None, cuda_graph: bool = False):
    from sdrt.engines.ort import OrtConfig, OrtEngine, available_backends

    # `auto` takes TensorRT only for a directory that holds plans for this component.
    available = available_backends()
    if backend == "auto" and not _has_plans(Path(onnx_path)):
        available = [b for b in available if b != "tensorrt"]
    chosen = resolve_backend(backend, available)
    if chosen in ("ort-cpu", "ort-cuda"):
        base = ort_config or OrtConfig()
        config = OrtConfig(**{**base.__dict__, "provider": "cuda" if chosen == "ort-cuda" else "cpu"})
        return OrtEngine(onnx_path, config)
    if chosen == "torch":
        from sdrt.engines.torch_ref import open_torch_engine

        return open_torch_engine(*locate(onnx_path))
    from sdrt.runtime.loader import read_manifest

    from sdrt.engines.tensorrt import SharedScratch, TensorRTComponent

    global _TRT_SHARED
    if _TRT_SHARED is None:  # one scratch buffer and one stream for every plan of the process
        _TRT_SHARED = (SharedScratch(), torch.cuda.Stream())
    engine_dir, component = locate(onnx_path)
    return TensorRTComponent(engine_dir, component, read_manifest(engine_dir), *_TRT_SHARED, cuda_graph=cuda_graph)


def locate(onnx_path: Path) -> tuple[Path, str]:
    """(engine directory, component) of DIR/<component>/model.onnx; ControlNets are two levels deep
    (DIR/controlnet/NAME/model.onnx → component controlnet/NAME)."""
    folder = Path(onnx_path).parent
    if folder.parent.name == "controlnet" and not (folder.parent / "model.onnx").exists():
        return folder.parent.parent, f"controlnet/{folder.name}"
    return folder.parent, folder.name


def _has_plans(onnx_path: Path) -> bool:
    from sdrt.engines.trt_profiles import plan_prefix

    engine_dir, component = locate(onnx_path)
    return any((engine_dir / "trt").glob(f"{plan_prefix(component)}__*.plan"))
