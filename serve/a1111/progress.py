"""AUTOMATIC1111's progress, interrupt and skip (modules/api/api.py progressapi, interruptapi, skip; modules/shared_state.py)
for `sdrt serve`'s /sdapi/v1 routes (serve/a1111/routes.py).

A1111 runs one job at a time and reports it through a shared `state`; sdrt may run several A1111 requests at once:
`GET /sdapi/v1/progress` reports the one started last, and `/interrupt` and `/skip` act on it. An A1111 request of
n_iter batches is one job of `job_count` = n_iter; `interrupt` ends the running batch after its current step, with
the images of the latents it has (runtime/service.py CancelToken.finish), and the later batches after their first
step; `skip` ends only the running batch that way. `current_image` is the first image's current latents through
A1111's "Approx cheap" linear latent → RGB map (the 4 latent channels times a 4x3 matrix), a PNG at latent size.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from sdrt.runtime.family import Family
from sdrt.runtime.service import CancelToken

# A1111 modules/sd_vae_approx.py cheap_approximation: latent channel → RGB weights (SD 1.x/2.x and SDXL)
_CHEAP_SD = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
_CHEAP_XL = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
             (-0.3730, -0.2499, -0.2088))


def cheap_preview(latents: torch.Tensor, family) -> Image.Image | None:
    """One image's latents [4, h, w] as a small RGB picture (None for latents of another shape)."""
    if latents.ndim != 3 or latents.shape[0] != 4:
        return None
    coefs = torch.tensor(_CHEAP_XL if family in (Family.SDXL, Family.SDXL_REFINER) else _CHEAP_SD)
    rgb = torch.einsum("lxy,lr->rxy", latents.float().cpu(), coefs)
    array = ((rgb.clamp(-1, 1) + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


@dataclass(eq=False)
class Watch:
    """One A1111 request while it runs: a CancelToken per batch (n_iter), its step, its latest latents."""

    count: int
    tokens: list[CancelToken] = field(default_factory=list)
    job_no: int = 0
    step: int = 0
    steps: int = 0
    latents: torch.Tensor | None = None
    interrupted: bool = False
    skipped: bool = False
    started: float = field(default_factory=time.time)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))

    def __post_init__(self):
        self.tokens = [CancelToken() for _ in range(self.count)]
        self._lock = threading.Lock()

    def callbacks(self, i: int) -> dict:
        return {"on_progress": lambda done, total: self._progress(i, done, total),
                "on_latents": lambda done, total, latents: self._latents(i, latents)}

    def _progress(self, i: int, done: int, total: int) -> None:
        with self._lock:
            self.job_no, self.step, self.steps = i, done, total

    def _latents(self, i: int, latents: torch.Tensor) -> None:
        with self._lock:
            self.latents = latents[0].detach().clone()

    def cancel(self) -> None:  # the client went away: every batch fails (jobs.generate)
        for t in self.tokens:
            t.cancel()

    def interrupt(self) -> None:
        self.interrupted = True
        for t in self.tokens:
            t.finish()

    def skip(self) -> None:
        self.skipped = True
        self.tokens[min(self.job_no, self.count - 1)].finish()


class Progress:
    """The server's A1111 `state`: the watches of the requests running, the last started reported."""

    def __init__(self, family):
        self.family = family  # () → the model's Family (read when a preview is drawn)
        self._lock = threading.Lock()
        self._running: list[Watch] = []

    def begin(self, jobs: list) -> Watch:
        watch = Watch(len(jobs))
        with self._lock:
            self._running.append(watch)
        return watch

    def end(self, watch: Watch) -> None:
        with self._lock:
            if watch in self._running:
                self._running.remove(watch)

    def current(self) -> Watch | None:
        with self._lock:
            return self._running[-1] if self._running else None

    def interrupt(self) -> None:
        watch = self.current()
        if watch is not None:
            watch.interrupt()

    def skip(self) -> None:
        watch = self.current()
        if watch is not None:
            watch.skip()

    def answer(self, skip_current_image: bool) -> dict:
        """A1111's ProgressResponse: progress 0..1, eta_relative (s), state, current_image (base64 PNG), textinfo."""
        watch = self.current()
        if watch is None:
            state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                     "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        with watch._lock:
            job_no, step, steps, latents = watch.job_no, watch.step, watch.steps, watch.latents
        progress = 0.01 + job_no / watch.count  # A1111 progressapi's formula
        if steps > 0:
            progress += step / steps / watch.count
        elapsed = time.time() - watch.started
        eta_relative = elapsed / progress - elapsed
        state = {"skipped": watch.skipped, "interrupted": watch.interrupted, "stopping_generation": False,
                 "job": f"Batch {job_no + 1} out of {watch.count}", "job_count": watch.count,
                 "job_timestamp": watch.timestamp, "job_no": job_no, "sampling_step": step, "sampling_steps": steps}
        image = None
        if not skip_current_image and latents is not None:
            picture = cheap_preview(latents, self.family())
            if picture is not None:
                buffer = io.BytesIO()
                picture.save(buffer, format="PNG")
                image = base64.b64encode(buffer.getvalue()).decode("ascii")
        return {"progress": min(progress, 1.0), "eta_relative": eta_relative, "state": state, "current_image": image,
                "textinfo": None}
