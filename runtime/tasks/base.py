"""The task protocol (DESIGN.md §2a): how a kind of generation validates its inputs, prepares the first latents and
finishes its images. Tasks live one per file beside this one; runtime/tasks/table.py lists them in the order they
claim a job. Each receives `Components` (runtime/components.py), never the Pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from sdrt.runtime.denoiser.guidance import Guidance
from sdrt.runtime.prompts.text_conditioning import Conditioning


@dataclass
class Common:
    """What every task's preparation starts from (made once per job by the pipeline)."""

    schedule: object  # runtime/samplers/schedules.Schedule, already cut to the job's window
    sampler: str
    steps_to_run: int
    cond: Conditioning
    guidance: Guidance
    generator: list  # one CPU torch.Generator per image
    shape: tuple[int, int, int, int]  # the latents: [N, 4, h, w]


@dataclass
class Prepared:
    """A job ready for the step loop."""

    x: torch.Tensor  # sigma-space latents [N, 4, h, w]
    schedule: object
    sampler: str
    steps_to_run: int
    cond: Conditioning
    guidance: Guidance
    generator: list | None = None  # one CPU torch.Generator per image
    contributors: list = field(default_factory=list)  # the UNet feed's parts besides text (runtime/denoiser/call.py)
    # a task's change to the latent after step i, fed back into the sampler (4-channel inpainting's blend)
    after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    @classmethod
    def of(cls, x: torch.Tensor, common: Common, **kw) -> "Prepared":
        return cls(x, common.schedule, common.sampler, common.steps_to_run, common.cond, common.guidance,
                   common.generator, **kw)


class Task(Protocol):
    """A module of runtime/tasks/ is a Task: `applies` picks it for a validated job on a model (the first in
    table.TASKS that applies; runtime/validate.py records its NAME as Job.task), `prepare` makes the first latents and the task's contributors, `finish` follows decoding.
    Its request checks (`validate(request, model_dir, limits) -> (request, job fields)`) run in runtime/validate.py
    for every task that defines them."""

    NAME: str

    def applies(self, job, model_dir) -> bool: ...

    def prepare(self, parts, job, common: Common) -> Prepared: ...

    def finish(self, job, images: list) -> list: ...
