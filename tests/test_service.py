"""The batching service: concurrent submissions share batches, images equal their standalone runs, cancellation,
deadlines, a full queue and engine errors fail one request (or one batch) and never the worker."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import Request
from sdrt.runtime.service import Cancelled, CancelToken, DeadlineExceeded, QueueFull, Service, ServiceClosed
from sdrt.runtime.fields import InvalidRequest

COMMON = dict(steps=3, guidance=5.0, sampler="euler_a", width=32, height=32)


@pytest.fixture(scope="module")
def pipe(exported):
    return Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu")


def _max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def test_concurrent_compatible_requests_share_a_batch_and_keep_their_images(pipe):
    requests = [Request.of(prompt=p, seed=s, **COMMON) for p, s in (("a cat", 1), ("a dog", 20), ("a house", 300))]
    batches = []
    with Service(pipe, max_batch=4, max_wait_ms=300, on_batch=batches.append) as service:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(service.generate, requests))
    assert [r.batch_size for r in results] == [3, 3, 3]
    assert [b.images for b in batches] == [3]
    for request, result in zip(requests, results):
        assert result.seeds == (request.seeds.seed,)
        assert _max_diff(result.images[0], pipe.generate(request)[0]) <= 1
        t = result.timings
        assert t.queue_wait >= 0 and t.encode > 0 and t.steps > 0 and t.decode > 0


def test_incompatible_requests_run_in_turn(pipe):
    with Service(pipe, max_batch=4, max_wait_ms=100) as service:
        a = service.submit(Request.of(prompt="a", seed=1, **COMMON))
        b = service.submit(Request.of(prompt="b", seed=1, **{**COMMON, "steps": 2}))
        assert a.result().batch_size == 1 and b.result().batch_size == 1


def test_a_request_larger_than_max_batch_runs_alone(pipe):
    with Service(pipe, max_batch=2) as service:
        result = service.generate(Request.of(prompt="a", seed=5, batch=3, **COMMON))
        assert len(result.images) == 3 and result.seeds == (5, 6, 7)


def test_cancel_token_fails_one_request_and_spares_its_batch_mate(pipe):
    token = CancelToken()
    with Service(pipe, max_batch=4, max_wait_ms=300) as service:
        doomed = service.submit(Request.of(prompt="a", seed=1, **COMMON), cancel=token,
                                on_progress=lambda done, total: token.cancel())
        mate = service.submit(Request.of(prompt="b", seed=2, **COMMON))
        with pytest.raises(Cancelled):
            doomed.result(timeout=60)
        result = mate.result(timeout=60)
    assert result.batch_size == 2 and len(result.images) == 1
    assert _max_diff(result.images[0], pipe.generate(Request.of(prompt="b", seed=2, **COMMON))[0]) <= 1


def test_future_cancel_before_it_runs_and_deadlines(pipe):
    gate = threading.Event()
    with Service(pipe, max_batch=1, max_wait_ms=0) as service:
        blocker = service.submit(Request.of(prompt="a", seed=1, **COMMON), on_progress=lambda d, t: gate.wait(30))
        queued = service.submit(Request.of(prompt="b", seed=1, **COMMON))
        late = service.submit(Request.of(prompt="c", seed=1, **COMMON), timeout=0.05)
        assert queued.cancel()
        time.sleep(0.2)
        gate.set()
        assert blocker.result(timeout=60).images
        with pytest.raises(DeadlineExceeded):
            late.result(timeout=60)
        assert queued.cancelled()


def test_full_queue_is_refused_and_the_worker_goes_on(pipe):
    gate = threading.Event()
    with Service(pipe, max_batch=1, max_wait_ms=0, queue_size=1) as service:
        running = service.submit(Request.of(prompt="a", seed=1, **COMMON), on_progress=lambda d, t: gate.wait(30))
        time.sleep(0.3)  # the worker has taken it
        waiting = service.submit(Request.of(prompt="b", seed=1, **COMMON))
        with pytest.raises(QueueFull):
            service.submit(Request.of(prompt="c", seed=1, **COMMON))
        gate.set()
        assert running.result(timeout=60).images and waiting.result(timeout=60).images


def test_invalid_request_is_refused_at_submit(pipe):
    with Service(pipe) as service:
        with pytest.raises(InvalidRequest) as info:
            service.submit(Request.of(prompt="a", steps=0))
        assert info.value.field == "steps"


class _Failing:
    """A UNet engine that raises while `armed`, as an engine would on a driver or shape error."""

    def __init__(self, engine):
        self.engine, self.armed = engine, False
        self.inputs, self.outputs = engine.inputs, engine.outputs

    def __call__(self, feed):
        if self.armed:
            raise RuntimeError("engine failure (injected)")
        return self.engine(feed)


def test_an_engine_error_fails_its_batch_and_the_worker_survives(exported):
    pipe = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu")
    failing = _Failing(pipe.engines["unet"])
    pipe.engines["unet"] = failing
    with Service(pipe, max_batch=4, max_wait_ms=200) as service:
        failing.armed = True
        a = service.submit(Request.of(prompt="a", seed=1, **COMMON))
        b = service.submit(Request.of(prompt="b", seed=2, **COMMON))
        for f in (a, b):
            with pytest.raises(RuntimeError, match="injected"):
                f.result(timeout=60)
        failing.armed = False
        assert service.generate(Request.of(prompt="c", seed=3, **COMMON)).images


def test_close_drains_then_refuses(pipe):
    service = Service(pipe, max_batch=1, max_wait_ms=0)
    futures = [service.submit(Request.of(prompt=str(i), seed=i, **COMMON)) for i in range(3)]
    service.close()
    assert all(f.result(timeout=1).images for f in futures)
    with pytest.raises(ServiceClosed):
        service.submit(Request.of(prompt="late", **COMMON))
