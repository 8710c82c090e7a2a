"""The batching service (DESIGN.md §4a): the one way to generate concurrently.

    service = Service("engine-dir", max_batch=4, max_wait_ms=10, queue_size=64)
    future = service.submit(Request.of(prompt="a cat", seed=7))      # from any thread
    result = future.result()                                         # images, seeds, timings, batch size
    service.close()                                                  # drains what is queued

Callers submit requests from any thread and get futures. One worker thread owns the pipeline and its engines
(no engine is ever called from two threads). It waits up to `max_wait_ms` after the first queued request for
compatible ones (runtime/batching.py: same size, steps, sampler, guidance, … ; prompts and seeds may differ)
and runs them as one text-encoder, UNet and VAE batch of at most `max_batch` images; incompatible requests
wait for their own batch, first come first served. Per-image seeds make each image the one its request would
give alone.

Cancellation (`future.cancel()` before the batch starts, a CancelToken at any time) and deadlines are checked
between steps: the request fails with Cancelled / DeadlineExceeded at once and its batch-mates go on (its rows
are computed to the end and dropped). An exception from an engine fails the requests of that batch; the worker
goes on with the next. Validation happens in `submit` (InvalidRequest), as does admission (QueueFull).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from sdrt.runtime import batching, image_io
from sdrt.runtime.errors import UserError
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.limits import Limits, memory_budget
from sdrt.runtime.pipeline import Generation, Pipeline
from sdrt.runtime.request import Request
from sdrt.runtime.job import Job
from sdrt.runtime.validate import validate

Progress = Callable[[int, int], None]  # (steps done, total)
Preview = Callable[[int, int, list], None]  # (steps done, total, this request's images decoded by the tiny VAE)
Latents = Callable[[int, int, object], None]  # (steps done, total, this request's latents after that step: a tensor)


def preview_steps(total: int, previews: int) -> frozenset[int]:
    """The steps after which `previews` progress images are decoded: evenly spaced, never the last (the finished
    image is the result), at most one per step."""
    return frozenset(s for i in range(previews) if 0 < (s := math.ceil(total * (i + 1) / (previews + 1))) < total)


class QueueFull(UserError):
    """The queue holds `queue_size` requests; retry later."""


class DeadlineExceeded(UserError):
    """The request's deadline passed before it finished."""


class Cancelled(UserError):
    """The request was cancelled (by its caller, or because its client went away)."""


class ServiceClosed(UserError):
    """The service is closing or closed and takes no new requests."""


class CancelToken:
    """Set from any thread; the worker checks it between steps. `cancel()` fails the request (Cancelled);
    `finish()` ends it after the current step with the images of the latents it has (AUTOMATIC1111's interrupt)."""

    def __init__(self):
        self._event = threading.Event()
        self._finish = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def finish(self) -> None:
        self._finish.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def finishing(self) -> bool:
        return self._finish.is_set()


@dataclass(frozen=True)
class Timings:
    """Seconds. Encode, steps and decode are those of the batch the request ran in."""

    queue_wait: float
    encode: float
    steps: float
    decode: float

    @property
    def total(self) -> float:
        return self.queue_wait + self.encode + self.steps + self.decode


@dataclass(frozen=True)
class Result:
    images: list[Image.Image]
    seeds: tuple[int, ...]  # one per image
    timings: Timings
    batch_size: int  # images in the batch this request ran in
    job: Job = field(repr=False)

    def parameters(self, index: int, model: str) -> image_io.GenerationParameters:
        """The PNG `parameters` of image `index`, as `sdrt run` writes them."""
        return self.job.parameters(index, model, seed=self.seeds[index])


@dataclass(frozen=True)
class BatchReport:
    """What the worker tells an observer (metrics) after each batch."""

    images: int
    requests: int
    encode: float
    steps: float
    decode: float
    failed: bool


@dataclass(eq=False)
class _Pending:
    job: Job
    future: Future
    enqueued: float
    deadline: float | None
    token: CancelToken | None
    progress: Progress | None
    preview: Preview | None = None
    previews: int = 0
    latents: Latents | None = None
    started: float = 0.0
    done: bool = False

    def stop_reason(self, now: float) -> UserError | None:
        if self.future.cancelled() or (self.token is not None and self.token.cancelled):
            return Cancelled("the request was cancelled")
        if self.deadline is not None and now > self.deadline:
            return DeadlineExceeded("the request's deadline passed before it finished")
        return None


class Service:
    def __init__(self, pipeline_or_dir, limits: Limits = Limits(), max_batch: int = 4, max_wait_ms: float = 10.0,
                 queue_size: int = 64, backend: str = "auto", warmup: bool = False,
                 on_batch: Callable[[BatchReport], None] | None = None, lora_dir: str | Path | None = None):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be at least 1 and max_wait_ms at least 0")
        if isinstance(pipeline_or_dir, (str, Path)):
            pipeline_or_dir = Pipeline.load(pipeline_or_dir, backend=backend, limits=limits, lora_dir=lora_dir)
        self.pipeline = pipeline_or_dir
        self.limits = limits
        self.max_batch = min(max_batch, limits.max_batch)
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._ready = threading.Event()
        self._worker = threading.Thread(target=self._run, name="sdrt-service-worker", daemon=True)
        self._warmup = warmup
        self._worker.start()

    # ---- callers' side (any thread) ----------------------------------------------------------------------
    def validate(self, request: Request | Job) -> Job:
        """The request checked against the model and the service's limits (InvalidRequest otherwise). A service's
        requests come from clients: the insightface folder is the server's (`sdrt serve --face-models`), never a
        path a request names."""
        if isinstance(request, Job):
            return request
        if request.adapters.face_models is not None:
            raise InvalidRequest("face_models", "is the server's setting (sdrt serve --face-models DIR), not a "
                                                "request's; leave it out")
        return validate(self.pipeline.with_face_models(request), self.pipeline.dir, self.limits,
                        self.pipeline.adapters.lora_dir,  # LoRA names
                        **self.pipeline.text.validate_args())  # embeddings

    def submit(self, request: Request | Job, *, timeout: float | None = None, cancel: CancelToken | None = None,
               on_progress: Progress | None = None, on_preview: Preview | None = None, previews: int = 0,
               on_latents: Latents | None = None) -> Future:
        """Queue a request; the future's result is a Result. Raises InvalidRequest, QueueFull, ServiceClosed.

        `timeout` (seconds from now) is the deadline, checked while queued and between steps. `previews` progress
        images (the request's latents decoded by the tiny VAE at `preview_steps`) go to `on_preview`, called on the
        worker thread; the directory needs vae_decoder_tiny (export --tiny-vae). `on_latents` gets the request's
        latents after every step (worker thread; keep it cheap).
        """
        job = self.validate(request)
        if previews and not self.pipeline.dir.has("vae_decoder_tiny"):
            raise UserError("progress images are decoded by the tiny VAE, which this engine directory does not have "
                            "(export it with --tiny-vae)")
        now = time.monotonic()
        pending = _Pending(job, Future(), now, None if timeout is None else now + timeout, cancel, on_progress,
                           on_preview, previews, on_latents)
        with self._cond:
            if self._closing:
                raise ServiceClosed("the service is shutting down and takes no new requests")
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"the queue holds {self.queue_size} requests; retry later")
            self._queue.append(pending)
            self._cond.notify()
        return pending.future

    def generate(self, request: Request | Job, **kwargs) -> Result:
        """submit() and wait for the result (raises what the future raises)."""
        return self.submit(request, **kwargs).result()

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def ready(self) -> bool:
        """The engines are loaded (and warmed, if asked) and the worker is running."""
        return self._ready.is_set() and self._worker.is_alive()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish the queued ones (drain) or cancel them; wait for the worker."""
        with self._cond:
            self._closing = True
            if not drain:
                while self._queue:
                    self._fail(self._queue.popleft(), ServiceClosed("the service shut down before this request ran"))
            self._cond.notify_all()
        self._worker.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the worker ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self._warmup:
            try:
                self.pipeline.generate(Request.of(prompt="warm-up", steps=1, guidance=0.0,
                                                  width=self.pipeline.dir.default_size // 4 // 8 * 8 or 64,
                                                  height=self.pipeline.dir.default_size // 4 // 8 * 8 or 64))
            except Exception:  # a failing warm-up must not stop the service: requests will report the error
                pass
        self._ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            while True:
                self._drop_stopped()
                if self._queue:
                    break
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue[0]
            wait_until = first.enqueued + self.max_wait
            while not self._closing and time.monotonic() < wait_until and self._images_compatible(first) < self.max_batch:
                self._cond.wait(max(0.0, wait_until - time.monotonic()))
            self._drop_stopped()
            if not self._queue:
                return []
            first = self._queue[0]
            key, chosen, images, nbytes = batching.compatibility_key(first.job), [], 0, 0
            budget = memory_budget(self.limits)  # batch-mates' estimates add up: the batch must fit as a whole
            for p in list(self._queue):
                fits = budget is None or nbytes + p.job.estimated_bytes <= budget
                if batching.compatibility_key(p.job) == key and images + p.job.count <= self.max_batch and fits:
                    chosen.append(p)
                    images += p.job.count
                    nbytes += p.job.estimated_bytes
            if not chosen:  # a request larger than max_batch runs alone
                chosen = [first]
            for p in chosen:
                self._queue.remove(p)
            return chosen

    def _images_compatible(self, first: _Pending) -> int:
        key = batching.compatibility_key(first.job)
        return sum(p.job.count for p in self._queue if batching.compatibility_key(p.job) == key)

    def _drop_stopped(self) -> None:
        now = time.monotonic()
        for p in [p for p in self._queue if p.stop_reason(now) is not None]:
            self._queue.remove(p)
            self._fail(p, p.stop_reason(now))

    @staticmethod
    def _fail(p: _Pending, error: BaseException) -> None:
        if not p.done:
            p.done = True
            if not p.future.cancelled():
                p.future.set_exception(error)

    def _execute(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        started = time.monotonic()
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        for p in live:
            p.started = started
        if not live:
            return
        encode = steps_time = decode = 0.0
        try:
            merged = batching.merge([p.job for p in live])
            run = Generation(self.pipeline, merged)
            t0 = time.monotonic()
            run.prepare()
            encode = time.monotonic() - t0
            total = run.total
            t0 = time.monotonic()
            rows = [sum(q.job.count for q in live[:i]) for i in range(len(live))]  # each request's first row
            count_all = sum(p.job.count for p in live)
            wanted = [preview_steps(total, p.previews) if p.preview is not None else frozenset() for p in live]
            for done, latents in enumerate(run.steps(), start=1):
                now = time.monotonic()
                for p, row, at in zip(live, rows, wanted):
                    if p.done:
                        continue
                    reason = p.stop_reason(now)
                    if reason is not None:
                        self._fail(p, reason)
                        continue
                    own = latents[row:row + p.job.count]
                    try:  # a caller's callback never stops the batch
                        if p.progress is not None:
                            p.progress(done, total)
                        if p.latents is not None:
                            p.latents(done, total, own)
                        if done in at:
                            p.preview(done, total, self.pipeline.preview(own))
                    except Exception:
                        pass
                    if p.token is not None and p.token.finishing and done < total:
                        self._finish_early(p, run, own, encode, time.monotonic() - t0, count_all)
                if all(p.done for p in live):
                    break
            steps_time = time.monotonic() - t0
            if run.latents is not None and all(p.done for p in live):
                self._report(batch, encode, steps_time, decode, failed=False)
                return
            t0 = time.monotonic()
            images = run.decode()
            decode = time.monotonic() - t0
        except Exception as e:  # noqa: BLE001 — an engine error fails this batch, never the worker
            for p in live:
                self._fail(p, e)
            self._report(batch, encode, steps_time, decode, failed=True)
            return
        count = sum(p.job.count for p in live)
        for p, own in zip(live, batching.split(images, [p.job for p in live])):
            if p.done:
                continue
            p.done = True
            own = run.finish(own, p.job)
            timings = Timings(p.started - p.enqueued, encode, steps_time, decode)
            p.future.set_result(Result(own, p.job.seeds, timings, count, p.job))
        self._report(batch, encode, steps_time, decode, failed=False)

    def _finish_early(self, p: _Pending, run: Generation, latents, encode: float, steps_time: float,
                      count: int) -> None:
        """The request's images from the latents it has now (its token's finish()); its batch-mates go on."""
        t0 = time.monotonic()
        try:
            images = run.finish(self.pipeline.decode(latents, p.job.vae, p.job.tile_vae), p.job)
        except Exception as e:  # noqa: BLE001 — fails this request alone
            self._fail(p, e)
            return
        p.done = True
        timings = Timings(p.started - p.enqueued, encode, steps_time, time.monotonic() - t0)
        p.future.set_result(Result(images, p.job.seeds, timings, count, p.job))

    def _report(self, batch, encode, steps_time, decode, failed) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(BatchReport(sum(p.job.count for p in batch), len(batch), encode, steps_time, decode,
                                          failed))
            except Exception:
                pass
