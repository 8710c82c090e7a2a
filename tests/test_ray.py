"""The Ray Serve deployment (sdrt.serve.ray) on a local Ray instance: `python -m sdrt.serve.ray ENGINE --port P`,
concurrent HTTP requests share a batch and equal `sdrt run`'s images, a bad request fails alone with 422.

Slow (a local Ray instance takes tens of seconds to start) and optional: skipped where Ray Serve is not installed,
and unless SDRT_RAY_TESTS=1. Ray 2.60's own services (GCS, raylet, workers) listen on the node's address, not only
on loopback, and cannot be told otherwise; run this only on a machine where that is acceptable.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("SDRT_RAY_TESTS") != "1",
                                 reason="Ray binds non-loopback addresses; opt in with SDRT_RAY_TESTS=1")]
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'sdrt[ray]')")

GOOD = dict(steps=2, width=32, height=32, sampler="euler_a")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body=None, accept: str = "application/json", timeout: float = 120):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", "Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except OSError:
        return 0, {}, b""


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the runner alone first (it shuts Serve and Ray down in order), then its whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):  # whatever Ray left in our process group
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(2)
    if proc.poll() is None:
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_server(exported, tmp_path_factory):
    engine = exported("sd15", "fp32")
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "ray.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sdrt.serve.ray", str(engine), "--port", str(port),
                                 "--backend", "ort-cpu", "--max-batch", "4", "--max-wait-ms", "300",
                                 "--num-cpus", "0"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"sdrt.serve.ray exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            status, _, body = _call(url, timeout=5)
            if status == 200 and json.loads(body).get("ready"):
                break
            time.sleep(1)
        else:
            pytest.fail(f"sdrt.serve.ray not ready in 240 s:\n{log.read_text(errors='replace')[-3000:]}")
        yield url, engine
    finally:
        _stop(proc)


def test_concurrent_requests_share_a_batch_and_equal_sdrt_run(ray_server):
    from PIL import Image

    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.request import Request

    url, engine = ray_server
    cases = [dict(prompt=f"a cat {i}", seed=40 + i, **GOOD) for i in range(3)]
    bad = dict(prompt="bad", seed=1, **{**GOOD, "width": 31})
    results = [None] * 4
    barrier = threading.Barrier(4)

    def work(i, body):
        barrier.wait(timeout=30)
        results[i] = _call(url, body)

    threads = [threading.Thread(target=work, args=(i, b), daemon=True) for i, b in enumerate(cases + [bad])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    pipe = Pipeline.load(engine, backend="ort-cpu")
    for case, (status, _, body) in zip(cases, results):
        assert status == 200, body
        answer = json.loads(body)
        assert [d["seed"] for d in answer["data"]] == [case["seed"]]
        assert answer["batch_size"] == 3  # the three compatible requests ran as one batch
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))).convert("RGB"))
        reference = np.asarray(pipe.generate(Request.of(**case))[0].convert("RGB"))
        assert int(np.abs(image.astype(int) - reference.astype(int)).max()) <= 1
    status, _, body = results[3]
    assert status == 422 and json.loads(body)["error"]["field"] == "width"


def test_png_answer_and_errors(ray_server):
    url, _ = ray_server
    status, headers, body = _call(url, dict(prompt="a png", seed=3, **GOOD), accept="image/png")
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n" and headers.get("x-seed", headers.get("X-Seed")) == "3"
    status, _, body = _call(url, dict(prompt="x", colour="red"))
    assert status == 422 and json.loads(body)["error"]["field"] == "colour"
