"""`sdrt serve` under faults: an engine that raises, a full queue, a deadline, a client killed while it waits,
SIGTERM with requests in flight, and a short load run with nothing lost. The last three run the real `sdrt serve`
in a subprocess on 127.0.0.1 and a free port."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from sdrt.bench.serve_load import ServerProcess, parse_metrics, run_load
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import Request
from sdrt.serve.app import create_app
from sdrt.serve.edge import ServeConfig

GEN = "/v1/images/generations"
SMALL = {"size": "32x32", "steps": 3, "guidance_scale": 5.0, "sampler": "euler_a"}


@pytest.fixture(scope="module")
def engine(exported):
    return exported("sd15", "fp32")


@pytest.fixture(scope="module")
def pipe(engine):
    return Pipeline.load(engine, backend="ort-cpu")


def _app(engine, pipe, **config):
    fault = config.pop("test_fault_prompt", None)
    config = {"max_batch": 4, "max_wait_ms": 20, "warmup": False, "backend": "ort-cpu", **config}
    return create_app(ServeConfig(engine_dir=engine, **config), pipeline=pipe, test_fault_prompt=fault)


def _blocked(service, gate: threading.Event):
    """Occupy the service's worker until `gate` is set."""
    future = service.submit(Request.of(prompt="blocker", steps=2, width=32, height=32),
                            on_progress=lambda done, total: gate.wait(60))
    deadline = time.monotonic() + 30
    while not future.running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert future.running()
    return future


# ---- in process -----------------------------------------------------------------------------------------------

def test_an_engine_error_is_a_500_for_that_request_and_the_server_goes_on(engine, pipe):
    with TestClient(_app(engine, pipe, test_fault_prompt="<<explode>>")) as client:
        response = client.post(GEN, json={"prompt": "a <<explode>> cat", **SMALL})
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "engine_error" and "injected" in error["message"]
        assert client.post(GEN, json={"prompt": "a calm cat", **SMALL}).status_code == 200
        metrics = parse_metrics(client.get("/metrics").text)
        assert metrics['sdrt_batches_total{failed="true"}'] == 1 and metrics['sdrt_generations_total{outcome="error"}'] == 1
    assert "unet" in pipe.engines and type(pipe.engines["unet"]).__name__ != "_FaultyUnet"  # the original is untouched


def test_a_full_queue_is_429_with_retry_after(engine, pipe):
    gate = threading.Event()
    with TestClient(_app(engine, pipe, max_batch=1, max_wait_ms=0, queue_size=1)) as client:
        service = client.app.state.sdrt.service
        try:
            blocker = _blocked(service, gate)
            queued = service.submit(Request.of(prompt="queued", steps=2, width=32, height=32))
            response = client.post(GEN, json={"prompt": "one too many", **SMALL})
            assert response.status_code == 429, response.text
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == "queue_full"
        finally:
            gate.set()
        assert blocker.result(60).images and queued.result(60).images
        assert client.post(GEN, json={"prompt": "room again", **SMALL}).status_code == 200


def test_past_the_deadline_is_504(engine, pipe):
    gate = threading.Event()
    with TestClient(_app(engine, pipe, max_batch=1, max_wait_ms=0, timeout_s=0.3)) as client:
        try:
            _blocked(client.app.state.sdrt.service, gate)
            started = time.monotonic()
            response = client.post(GEN, json={"prompt": "too late", **SMALL})
            assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
            assert time.monotonic() - started < 10
        finally:
            gate.set()
        assert client.post(GEN, json={"prompt": "in time", **SMALL}).status_code == 200


# ---- a real server ---------------------------------------------------------------------------------------------

def _metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    return parse_metrics(httpx.get(url + "/metrics", headers=headers, timeout=10).text)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def server(engine, tmp_path):
    servers = []

    def start(max_batch: int = 1, extra: tuple[str, ...] = ()) -> ServerProcess:
        s = ServerProcess(engine, tmp_path / f"server-{len(servers)}.log", max_batch=max_batch, max_wait_ms=0,
                          queue_size=16, extra=extra)
        servers.append(s)
        s.wait_ready(120)
        return s

    yield start
    for s in servers:
        s.kill()


def test_a_killed_client_cancels_its_request_and_the_server_goes_on(server):
    s = server()
    code = ("import httpx, sys\n"
            "httpx.post(sys.argv[1] + '/v1/images/generations', json={'prompt': 'a very long one', 'steps': 500, "
            "'size': '64x64', 'sampler': 'euler'}, timeout=300)\n")
    client = subprocess.Popen([sys.executable, "-c", code, s.url])
    try:
        # in flight (its request and this scrape), then a moment inside the sampler loop
        _wait_for(lambda: _metrics(s.url).get("sdrt_http_inflight_requests", 0) >= 2, 30, "the request in flight")
        time.sleep(1.0)
    finally:
        client.kill()
        client.wait(30)
    killed = time.monotonic()
    _wait_for(lambda: _metrics(s.url).get('sdrt_generations_total{outcome="cancelled"}', 0) == 1, 20,
              "the request to be cancelled")
    response = httpx.post(s.url + GEN, json={"prompt": "next", **SMALL}, timeout=60)
    assert response.status_code == 200
    # 500 steps at 64x64 take far longer than this: the worker stopped the cancelled request between steps
    assert time.monotonic() - killed < 15
    assert _metrics(s.url).get('sdrt_generations_total{outcome="ok"}', 0) == 1
    assert s.stop(60) == 0


def test_sigterm_drains_in_flight_requests_and_exits_0(server, monkeypatch):
    monkeypatch.setenv("SDRT_TEST_SERVE_KEY", "k3y")  # and the API key read from the variable --api-key-env names
    s = server(max_batch=1, extra=("--api-key-env", "SDRT_TEST_SERVE_KEY"))
    auth = {"Authorization": "Bearer k3y"}
    assert httpx.post(s.url + GEN, json={"prompt": "x", **SMALL}, timeout=30).status_code == 401
    answers: list = [None] * 3

    def send(i: int):
        try:
            answers[i] = httpx.post(s.url + GEN, json={"prompt": f"in flight {i}", "seed": i, "size": "32x32",
                                                        "steps": 60, "sampler": "euler"}, headers=auth, timeout=120)
        except httpx.HTTPError as e:
            answers[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    _wait_for(lambda: _metrics(s.url, auth).get("sdrt_http_inflight_requests", 0) >= 4, 30, "three requests in flight")
    s.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:  # the listening socket is closed (connection refused) or the request is answered 503
        late = httpx.post(s.url + GEN, json={"prompt": "late", **SMALL}, headers=auth, timeout=30)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    except httpx.TransportError:
        pass
    for t in threads:
        t.join(120)
    assert [getattr(a, "status_code", a) for a in answers] == [200, 200, 200]
    assert [a.json()["data"][0]["seed"] for a in answers] == [0, 1, 2]
    assert s.process.wait(60) == 0
    log = s.log_path.read_text()
    assert "Traceback" not in log, log


def test_short_load_run_loses_nothing(engine, tmp_path):
    result = run_load(engine, clients=8, seconds=6, max_batch=4, log_dir=tmp_path)
    r = result["requests"]
    assert r["sent"] > 8 and r["lost"] == 0 and r["failed"] == 0, r
    assert r["answered"] == r["sent"] and result["images"] == r["answered"]
    assert result["server"]["exit_code"] == 0
    assert result["batches"]["count"] > 0 and max(map(int, result["batches"]["by_images"])) <= 4
    assert result["rss_bytes"]["end"] and result["latency_s"]["p99"] is not None
