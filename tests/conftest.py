"""Shared fixtures: tiny pipelines of every family and their exports, built once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here; tests never reach for it


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_root):
    """tiny_pipeline(family) → folder of a saved tiny diffusers pipeline (built once)."""
    from sdrt.export.models.tiny import write_tiny_pipeline

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


@pytest.fixture(scope="session")
def conditioned(tiny_root, tiny_pipeline, exported):
    """conditioned(family, ip=family == "sd15") → (engine dir, {"controlnets": {name: folder}, "ip": (image encoder,
    adapter file) or None}): the session's plain fp32 export, hard-linked, with tiny ControlNets (sd15: canny and
    depth; sdxl: xl), for sd15 a T2I-Adapter (sketch), and with `ip` an IP-Adapter, added by `sdrt export DIR
    --controlnet … --ip-adapter … --t2i-adapter …`
    (export/exporter.add_controlnets; a later call with ip=True adds the adapter alone, reusing the rest)."""
    import shutil

    from sdrt.export.exporter import add_controlnets
    from sdrt.export.models.tiny import write_tiny_controlnet, write_tiny_ip_adapter, write_tiny_t2i_adapter

    nets = {"sd15": (("canny", 1), ("depth", 2)), "sdxl": (("xl", 3),)}
    cache = {}

    def make(family: str, ip: bool | None = None):
        ip = family == "sd15" if ip is None else ip
        if family in cache and ip and cache[family][1]["ip"] is None:
            engine, parts = cache[family]
            encoder, adapter = write_tiny_ip_adapter(tiny_pipeline(family), engine.parent / f"{family}-ip-src", seed=4)
            add_controlnets(engine, (), ip_adapter=str(adapter), image_encoder=str(encoder))
            cache[family] = (engine, parts | {"ip": (encoder, adapter)})
        if family not in cache:
            root = tiny_root / "conditioned"
            engine = root / family
            shutil.copytree(exported(family, "fp32"), engine, copy_function=os.link)
            folders = {name: write_tiny_controlnet(tiny_pipeline(family), root / f"{family}-{name}-src", seed)
                       for name, seed in nets[family]}
            encoder, adapter = write_tiny_ip_adapter(tiny_pipeline(family), root / f"{family}-ip-src", seed=4) \
                if ip else (None, None)
            t2i = write_tiny_t2i_adapter(root / f"{family}-sketch-src", seed=5) if family == "sd15" else None
            add_controlnets(engine, tuple(f"{f}={name}" for name, f in folders.items()),
                            ip_adapter=str(adapter) if ip else None, image_encoder=str(encoder) if ip else None,
                            t2i_adapters=(f"{t2i}=sketch",) if t2i else ())
            cache[family] = (engine, {"controlnets": folders, "ip": (encoder, adapter) if ip else None, "t2i": t2i})
        return cache[family]

    return make


class LoopbackServer:
    """`create_app` under uvicorn on 127.0.0.1 in a thread, with a Pipeline loaded once."""

    def __init__(self, engine: Path, pipeline, api_key: str | None = None, **config):
        import httpx
        import uvicorn

        from sdrt.serve.app import create_app
        from sdrt.serve.edge import ServeConfig

        app = create_app(ServeConfig(engine_dir=engine, api_key=api_key, max_batch=1, max_wait_ms=0, **config), pipeline)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become ready in 60 s")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
