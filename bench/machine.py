"""The machine a benchmark ran on: CPU, memory, GPU, package versions, and how busy it was (load averages).

Every result file of bench/ records these beside its figures.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    try:
        import psutil

        physical, memory = psutil.cpu_count(logical=False), psutil.virtual_memory().total
    except ImportError:
        physical, memory = None, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
               "compute_capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count(),
               "cuda": torch.version.cuda}
    return {"cpu": cpu_model(), "architecture": platform.machine(), "cores_logical": os.cpu_count(),
            "cores_physical": physical, "memory_gib": round(memory / 2**30, 1), "os": platform.platform(),
            "python": platform.python_version(), "gpu": gpu}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("sdrt", "torch", "onnxruntime", "onnxruntime-gpu", "diffusers", "transformers", "tensorrt"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: a busy machine (another job) shows here."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None
