"""Shared fixtures: tiny pipelines of every family and their exports, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here; tests never reach for it


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_root):
    """tiny_pipeline(family) → folder of a saved tiny diffusers pipeline (built once)."""
    from sdrt.export.tiny import write_tiny_pipeline

    def make(family: str) -> Path:
        folder = tiny_root / "models" / family
        if not folder.exists():
            write_tiny_pipeline(family, folder)
        return folder

    return make


@pytest.fixture(scope="session")
def exported(tiny_root, tiny_pipeline):
    """exported(family, precision) → engine directory of that tiny family (exported once)."""
    from sdrt.export.exporter import ExportConfig, export

    def make(family: str, precision: str = "fp32") -> Path:
        out = tiny_root / "engines" / f"{family}-{precision}"
        if not out.exists():
            out.parent.mkdir(exist_ok=True)
            export(ExportConfig(model=str(tiny_pipeline(family)), output=out, precision=precision))
        return out

    return make


@pytest.fixture(scope="module")
def ort_pipelines(exported):
    """ort_pipelines(family) → sdrt Pipeline on ORT CPU over that family's fp32 export (loaded once per module)."""
    from sdrt.runtime.pipeline import Pipeline

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = Pipeline.load(exported(family, "fp32"), backend="ort-cpu")
        return cache[family]

    return get


def run_sdrt(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `sdrt` console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "sdrt.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
