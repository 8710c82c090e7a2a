"""One backend, all its runs: a Job's load, warm-up and timed runs, in this process or in a child process.

By default each backend runs in a child process (`python -m sdrt.bench.measure.jobs SPEC`): its peak RSS is its
own, and thread pools and allocator caches of one backend do not leak into the next. On a machine whose speed
drifts, backends measured one after the other see different machines: `measure_interleaved` loads all of them in
this process and alternates their timed runs; `measure_alternating` does the same with a fresh child process per
run, for models two backends cannot hold in memory together.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sdrt.runtime.errors import UserError

from sdrt.bench.measure.memory import gpu_memory, peak_rss_bytes, reset_peak_rss
from sdrt.bench.measure.sessions import Session, open_diffusers, open_sdrt
from sdrt.bench.measure.timing import Sample, sample_record
from sdrt.bench.scenarios import DIFFUSERS_BACKENDS, Progress, Scenario, silent

_PREFIX = "SDRT-BENCH "  # marks the worker's protocol lines on its stdout


@dataclass(frozen=True)
class Job:
    """Everything a worker needs: JSON-serializable."""

    scenario: Scenario
    backend: str
    engine_dir: str
    source_dir: str | None
    warmup: int
    runs: int
    threads: int
    tiny_dir: str | None = None  # the AutoencoderTiny folder, for diffusers with --vae tiny

    @property
    def key(self) -> str:
        """The backend's name in the results: "+tiny-vae" marks runs that decode with the tiny VAE."""
        return self.backend + ("+tiny-vae" if self.scenario.vae == "tiny" else "") + \
            (f"+cache{self.scenario.cache_interval}" if self.scenario.cache_interval > 1 else "")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "scenario": self.scenario.as_dict()})

    @classmethod
    def from_json(cls, text: str) -> "Job":
        d = json.loads(text)
        s = d.pop("scenario")
        return cls(scenario=Scenario(**{**s, "backends": tuple(s["backends"])}), **d)


def measure_backend(job: Job, on_progress: Progress = silent, peak_reset: bool = True) -> dict:
    """Load the backend, run warm-up runs, then timed runs; raw samples and memory."""
    reset = reset_peak_rss() if peak_reset else False
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except ImportError:
        pass
    session = open_backend(job, on_progress)
    warmup = [_warm_up(session, job, i, on_progress) for i in range(job.warmup)]
    samples = [_timed_run(session, job, i, on_progress) for i in range(job.runs)]
    scope = "this backend's process" if not peak_reset else \
        ("since this backend started (VmHWM reset)" if reset else "whole process so far")
    return backend_record(job, session, warmup, samples, scope)


def open_backend(job: Job, on_progress: Progress = silent) -> Session:
    on_progress(f"{job.backend}: loading", 0, 0)
    if job.backend in DIFFUSERS_BACKENDS:
        if job.source_dir is None:
            raise UserError(f"backend {job.backend} needs the diffusers folder the engine directory was exported "
                            "from, and its manifest names none that exists here")
        return open_diffusers(job.scenario, Path(job.source_dir), job.threads, job.backend == "diffusers-compile",
                              Path(job.tiny_dir) if job.tiny_dir else None)
    return open_sdrt(job.scenario, job.backend, Path(job.engine_dir), job.threads)


def _warm_up(session: Session, job: Job, i: int, on_progress: Progress) -> Sample:
    sample = session.run_once()
    on_progress(f"{job.backend}: warm-up", i + 1, job.warmup)
    return sample


def _timed_run(session: Session, job: Job, i: int, on_progress: Progress) -> Sample:
    gc.collect()
    sample = session.run_once()
    on_progress(f"{job.backend}: runs", i + 1, job.runs)
    return sample


def _png_b64(image) -> str | None:
    if image is None:
        return None
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def backend_record(job: Job, session: Session, warmup: list[Sample], samples: list[Sample], rss_scope: str) -> dict:
    return {
        "image_png_b64": _png_b64(samples[0].image) if samples else None,
        "backend": job.backend,
        "status": "ok",
        "device": session.device,
        "notes": session.notes,
        "load_seconds": session.load_seconds,
        "warmup": [sample_record(s) for s in warmup],
        "samples": [sample_record(s) for s in samples],
        "memory": {"peak_rss_gib": peak_rss_bytes() / 2**30, "peak_rss_scope": rss_scope, **gpu_memory()},
    }


def measure_alone(job: Job, isolate: bool, on_progress: Progress) -> dict:
    try:
        return run_isolated(job, on_progress) if isolate else measure_backend(job, on_progress)
    except Exception as e:  # a backend that cannot run this is reported, and the others still run
        return _failure(job.backend, e)


def _failure(backend: str, error: BaseException) -> dict:
    text = " ".join(str(error).split()) if isinstance(error, UserError) else traceback.format_exc(limit=-4)
    return {"backend": backend, "status": "failed", "error": text}


def measure_interleaved(jobs: list[Job], on_progress: Progress = silent) -> dict[str, dict]:
    """Every backend loaded in this process, each warmed up, then timed runs in turn (A B A B ...): a machine
    whose speed drifts (shared host, clocks) slows every backend alike instead of whichever ran last.
    Peak RSS is then the whole process's, all backends together. A backend that fails leaves the rotation."""
    raws: dict[str, dict] = {}
    live: dict[str, tuple[Job, Session, list[Sample], list[Sample]]] = {}

    def attempt(job: Job, action) -> None:
        try:
            action()
        except Exception as e:  # reported beside the others, which go on
            raws[job.key] = _failure(job.backend, e)
            live.pop(job.key, None)

    for job in jobs:
        attempt(job, lambda: live.__setitem__(job.key, (job, open_backend(job, on_progress), [], [])))
    for job, session, warmup, _ in list(live.values()):
        attempt(job, lambda: warmup.extend(_warm_up(session, job, i, on_progress) for i in range(job.warmup)))
    for i in range(max((job.runs for job in jobs), default=0)):
        for job, session, _, samples in list(live.values()):
            attempt(job, lambda: samples.append(_timed_run(session, job, i, on_progress)))
    for job, session, warmup, samples in live.values():
        raws[job.key] = backend_record(job, session, warmup, samples, "the whole process: all backends, interleaved")
    return {job.key: raws[job.key] for job in jobs}


def measure_alternating(jobs: list[Job], on_progress: Progress = silent) -> dict[str, dict]:
    """Timed runs in turn (A B A B ...) like measure_interleaved, but each run in a fresh child process after
    its own load and warm-up: for a model that two backends cannot hold in memory at once (SDXL in fp32 on a
    24 GiB machine). Peak RSS is the largest of one backend's processes. A backend that fails leaves the turn."""
    runs: dict[str, list[dict]] = {job.key: [] for job in jobs}
    failed: dict[str, dict] = {}
    for i in range(max((job.runs for job in jobs), default=0)):
        for job in jobs:
            if job.key in failed or i >= job.runs:
                continue

            def renumbered(what: str, done: int, total: int, i=i, job=job) -> None:
                if what.endswith(": runs"):
                    done, total = i + 1, job.runs
                on_progress(what, done, total)

            raw = run_isolated(replace(job, runs=1), renumbered)
            if raw["status"] == "ok":
                runs[job.key].append(raw)
            else:
                failed[job.key] = raw
    return {job.key: failed.get(job.key) or merged_runs(runs[job.key]) for job in jobs}


def merged_runs(records: list[dict]) -> dict:
    """One backend's record from several one-run processes: their samples in order, the median load time,
    the largest peak memory."""
    import numpy as np

    largest = max(records, key=lambda r: r["memory"]["peak_rss_gib"])
    return {**records[0],
            "load_seconds": float(np.median([r["load_seconds"] for r in records])),
            "warmup": [w for r in records for w in r["warmup"]],
            "samples": [s for r in records for s in r["samples"]],
            "memory": {**largest["memory"],
                       "peak_rss_scope": f"the largest of this backend's {len(records)} processes, one per timed run"}}


def run_isolated(job: Job, on_progress: Progress = silent) -> dict:
    """measure_backend in a child process; its progress and result come back as marked JSON lines."""
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sdrt.bench.measure.jobs", job.to_json()],
                                stdout=subprocess.PIPE, stderr=err, text=True)
        result, user_error = None, None
        try:
            for line in proc.stdout:
                if not line.startswith(_PREFIX):
                    continue
                kind, _, payload = line[len(_PREFIX):].partition(" ")
                if kind == "progress":
                    on_progress(*json.loads(payload))
                elif kind == "result":
                    result = json.loads(payload)
                elif kind == "user-error":
                    user_error = json.loads(payload)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if user_error is not None:
            return {"backend": job.backend, "status": "failed", "error": user_error}
        if proc.returncode != 0 or result is None:
            err.seek(0)
            tail = err.read().strip().splitlines()[-15:]
            return {"backend": job.backend, "status": "failed",
                    "error": f"worker exited with {proc.returncode}: " + "\n".join(tail)}
        return result


def worker_main(argv: list[str]) -> int:
    def emit(kind: str, payload) -> None:
        print(_PREFIX + kind + " " + json.dumps(payload), flush=True)

    job = Job.from_json(argv[0])
    try:
        result = measure_backend(job, lambda what, done, total: emit("progress", [what, done, total]),
                                 peak_reset=False)
    except UserError as e:
        emit("user-error", " ".join(str(e).split()))
        return 2
    emit("result", result)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
