"""Prometheus metrics of one `sdrt serve` app, in its own CollectorRegistry (two apps in one process never mix).

    sdrt_http_requests_total{route,method,status}   every answer, 4xx/5xx included (route "unmatched" for 404s)
    sdrt_http_request_duration_seconds{route}       end to end, as the server saw it
    sdrt_http_inflight_requests                     requests being answered now
    sdrt_generations_total{outcome}                 ok | invalid | queue_full | deadline | cancelled | closed | error
    sdrt_queue_depth                                requests waiting for a batch (read at scrape time)
    sdrt_queue_wait_seconds                         submit → batch start, per request
    sdrt_generation_seconds                         queue wait + encode + steps + decode, per request
    sdrt_batch_images / sdrt_batch_requests          per engine batch (the service's on_batch hook)
    sdrt_stage_seconds{stage}                       encode | steps | decode, per batch
    sdrt_batches_total{failed}, sdrt_images_total   batches run, images answered
    sdrt_ready                                      1 once the engines are loaded and warmed
    process_resident_memory_bytes, …                prometheus-client's process collector (Linux)
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)

from sdrt.runtime.service import BatchReport

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sdrt_http_requests", "HTTP answers by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.duration = Histogram("sdrt_http_request_duration_seconds", "HTTP request duration, end to end",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("sdrt_http_inflight_requests", "HTTP requests being answered", registry=r)
        self.outcomes = Counter("sdrt_generations", "generation requests by outcome", ["outcome"], registry=r)
        self.queue_depth = Gauge("sdrt_queue_depth", "requests waiting for a batch", registry=r)
        self.queue_wait = Histogram("sdrt_queue_wait_seconds", "time from submit to the start of its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.generation = Histogram("sdrt_generation_seconds", "queue wait + encode + steps + decode of a request",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("sdrt_batch_images", "images per engine batch", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram("sdrt_batch_requests", "requests per engine batch", buckets=BATCH_BUCKETS,
                                        registry=r)
        self.stage = Histogram("sdrt_stage_seconds", "seconds per batch and stage", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.batches = Counter("sdrt_batches", "engine batches run", ["failed"], registry=r)
        self.images = Counter("sdrt_images", "images answered", registry=r)
        self.ready = Gauge("sdrt_ready", "1 when the engines are loaded and warmed", registry=r)
        ProcessCollector(registry=r)

    def bind(self, queue_depth: Callable[[], int], ready: Callable[[], bool]) -> None:
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)

    def on_batch(self, report: BatchReport) -> None:
        """The service's hook (called on its worker thread; prometheus-client is thread-safe)."""
        self.batch_images.observe(report.images)
        self.batch_requests.observe(report.requests)
        for stage in ("encode", "steps", "decode"):
            self.stage.labels(stage).observe(getattr(report, stage))
        self.batches.labels("true" if report.failed else "false").inc()

    def on_result(self, result) -> None:
        self.queue_wait.observe(result.timings.queue_wait)
        self.generation.observe(result.timings.total)
        self.images.inc(len(result.images))

    def outcome(self, name: str) -> None:
        self.outcomes.labels(name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
