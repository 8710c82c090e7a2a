"""Set up the real tritonserver that tests/test_triton.py runs (called by `make test` through `make triton-server`).

1. PyPI's nvidia-pytriton 0.7.0 wheel ships a tritonserver binary, its Python backend and backend stubs per Python
   version; it is unpacked into VENV/pytriton, not installed (the wheel pins numpy<2, sdrt needs numpy 2).
2. That stub is built against numpy 1: under numpy 2 it hands a model BYTES inputs as buffers filled with one byte
   value. Its embedded Python takes its environment from the first `python` on PATH and ignores PYTHONPATH, so
   VENV/pytriton/stub-venv is a venv whose own site-packages hold numpy 1.26.4 and which then reads VENV's
   site-packages (a .pth file): the stub's process gets numpy 1 and everything else from VENV.

Idempotent; on a machine where this cannot be done (not Linux x86-64, no PyPI) it says why on one line and exits 0,
and the real-server tests skip with that reason.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

PYTRITON = "nvidia-pytriton==0.7.0"
STUB_NUMPY = "numpy==1.26.4"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--quiet", *args], check=True)


def unpack_server(root: Path) -> None:
    if (root / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
        return
    wheels = root.parent / "pytriton-wheel"
    _pip("download", "--no-deps", PYTRITON, "-d", str(wheels))
    wheel = next(wheels.glob("nvidia_pytriton-*.whl"))
    partial = root.parent / "pytriton.partial"  # unpacked whole, then moved in: never half a server in root
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.is_dir():
                z.extract(info, partial)
                os.chmod(partial / info.filename, (info.external_attr >> 16) or 0o644)
    root.mkdir(exist_ok=True)
    for entry in partial.iterdir():
        if entry.name in ("pytriton", "nvidia_pytriton.libs"):
            target = root / entry.name
            if target.exists():
                subprocess.run(["rm", "-rf", str(target)], check=True)
            entry.rename(target)
    subprocess.run(["rm", "-rf", str(partial)], check=True)


def stub_venv(root: Path) -> None:
    venv = root / "stub-venv"
    marker = venv / ".sdrt-ready"
    if marker.is_file():
        return
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], check=True)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    _pip("install", "--no-deps", "--target", str(purelib), STUB_NUMPY)
    ours = sysconfig.get_paths()["purelib"]  # this venv's packages (torch, onnxruntime, sdrt), after numpy 1
    (purelib / "zz_sdrt_venv.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    marker.write_text("")


def main() -> int:
    venv = Path(sys.argv[1] if len(sys.argv) > 1 else sys.prefix).absolute()
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        print(f"triton-server: the pytriton wheel's tritonserver is Linux x86-64 only; test_triton.py will skip")
        return 0
    root = venv / "pytriton"
    try:
        unpack_server(root)
        stub_venv(root)
    except (subprocess.CalledProcessError, OSError, StopIteration) as e:
        print(f"triton-server: could not set up tritonserver ({type(e).__name__}: {e}); test_triton.py will skip")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
