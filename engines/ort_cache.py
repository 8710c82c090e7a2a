"""ONNX Runtime's optimized graph, saved on the first load and loaded by later ones (opt-in: OrtConfig.cache_optimized).

ONNX Runtime optimizes every graph when a session is created (constant folding, fusions, the CPU provider's NCHWc
layout); `SessionOptions.optimized_model_filepath` writes the result. A later session loads that file with
optimizations off and skips the work: the full-size SD 1.5 VAE decoder (fp32, 198 MB) loads in 0.57 s instead of
1.05 s on this project's CPU, with identical outputs (max |Δ| 0). The file is only valid for the ONNX Runtime build,
optimization level and CPU that wrote it (NCHWc kernels), so its name is a key over those and over the source file's
size and modification time. Files live in `<component>/ort-optimized/` beside the model: KEY.onnx plus KEY.onnx_data
(weights as external data, so graphs over 2 GB can be written); the .onnx appears last, by rename, so a killed
first load leaves no file a later one would trust. A directory that cannot be written simply goes uncached.
CPU provider only, and never for sessions with replaced initializers (LoRA: runtime/lora/adapters.py).
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

FOLDER = "ort-optimized"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def key(model: Path, ort_version: str, level: str) -> str:
    stat = Path(model).stat()
    text = "|".join([ort_version, level, platform.machine(), _cpu_flags(), str(stat.st_size), str(stat.st_mtime_ns)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_model(model: Path, ort_version: str, level: str) -> Path:
    """Where the optimized graph of `model` for this ONNX Runtime, level and CPU is (or would be) kept."""
    return Path(model).parent / FOLDER / f"{key(model, ort_version, level)}.onnx"


def prepare_save(options, target: Path) -> Path | None:
    """Ask ONNX Runtime to write the optimized graph beside `target` (a temporary name, renamed by `commit`);
    None when the folder cannot be written."""
    try:
        target.parent.mkdir(exist_ok=True)
    except OSError:
        return None
    if not os.access(target.parent, os.W_OK):
        return None
    temporary = target.with_name(f".{target.stem}.{os.getpid()}.tmp.onnx")
    options.optimized_model_filepath = str(temporary)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     f"{target.stem}.onnx_data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return temporary


def commit(temporary: Path | None, target: Path) -> None:
    if temporary is None:
        return
    try:
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)


def discard(target: Path) -> None:
    """A cached file ONNX Runtime refused: removed, so the next load rebuilds it."""
    for path in (target, target.with_suffix(".onnx_data")):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
