"""Clocks and call recorders: how long each engine call of one run took, and the stages those calls add up to.

Every engine is wrapped in a proxy (TimedEngine, or timed_function around a torch module's forward) that records
each call's duration; a run then splits into text encoding, each UNet step, VAE decode, and the runtime's own
overhead (end to end minus engine time: tokenizer, conditioning, sampler math, image conversion). On a GPU every
clock reading synchronizes the device first, which covers work on any stream (ONNX Runtime's, TensorRT's, torch's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# "unet" is the denoiser's stage in every family (SD3 / FLUX.1: the transformer)
STAGE_OF = {"text_encoder": "text_encoding", "text_encoder_2": "text_encoding", "text_encoder_3": "text_encoding",
            "unet": "unet", "transformer": "unet",
            "vae_decoder": "vae_decode", "vae_decoder_tiny": "vae_decode",
            "unet_deepcache": "unet", "unet_deepcache_shallow": "unet"}  # step caching: both graphs are UNet time
STAGES = ("text_encoding", "unet", "vae_decode", "runtime_overhead", "end_to_end")


# ---- clocks and recorders ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clock:
    cuda: bool = False

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass(frozen=True)
class EngineCall:
    component: str  # text_encoder | text_encoder_2 | unet | vae_decoder
    batch: int  # leading dimension of the call's main input (input_ids, sample, latent_sample)
    seconds: float


@dataclass
class CallRecorder:
    calls: list[EngineCall] = field(default_factory=list)

    def count(self, component: str) -> int:
        """Calls of a stage's components (\"unet\": the UNet and the step-caching graphs)."""
        return sum(1 for c in self.calls if STAGE_OF.get(c.component, c.component) == component)


def _batch_of(values) -> int:
    """Leading dimension of the first tensor argument of rank ≥ 1."""
    for v in values:
        shape = getattr(v, "shape", None)
        if shape is not None and len(shape) >= 1:
            return int(shape[0])
    return 1


class TimedEngine:
    """An Engine that records the duration of each call; everything else is the wrapped engine's."""

    def __init__(self, engine, component: str, recorder: CallRecorder, clock: Clock):
        self._engine, self._component, self._recorder, self._clock = engine, component, recorder, clock

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __call__(self, feed):
        start = self._clock.now()
        out = self._engine(feed)
        seconds = self._clock.now() - start
        self._recorder.calls.append(EngineCall(self._component, _batch_of(feed.values()), seconds))
        return out


def timed_function(fn, component: str, recorder: CallRecorder, clock: Clock):
    """The same for a torch module's forward (or vae.decode) in the diffusers pipeline."""

    def wrapper(*args, **kwargs):
        start = clock.now()
        out = fn(*args, **kwargs)
        seconds = clock.now() - start
        recorder.calls.append(EngineCall(component, _batch_of(list(args) + list(kwargs.values())), seconds))
        return out

    return wrapper


# ---- one run and its stages ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    end_to_end: float
    calls: tuple[EngineCall, ...]
    step_marks: tuple[int, ...]  # UNet calls made by the end of each step
    image: object = field(default=None, compare=False)  # the first image, uint8 [H, W, 3], for quality comparisons


def stage_times(s: Sample) -> dict:
    """Seconds per stage of one run; runtime_overhead = end to end − time inside engines."""
    totals = {"text_encoding": 0.0, "unet": 0.0, "vae_decode": 0.0}
    for call in s.calls:
        totals[STAGE_OF[call.component]] += call.seconds
    unet = [c.seconds for c in s.calls if STAGE_OF[c.component] == "unet"]
    bounds = (0,) + s.step_marks
    steps = [sum(unet[a:b]) for a, b in zip(bounds, bounds[1:])]
    engines = sum(c.seconds for c in s.calls)
    return {**totals, "unet_steps": steps, "engines": engines, "runtime_overhead": s.end_to_end - engines,
            "end_to_end": s.end_to_end}


def sample_record(s: Sample) -> dict:
    return {**stage_times(s), "calls": [[c.component, c.batch, c.seconds] for c in s.calls]}

