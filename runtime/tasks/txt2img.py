"""Text to image: the initial latents are noise at the schedule's first sigma."""

from __future__ import annotations

from sdrt.runtime.samplers import classic
from sdrt.runtime.tasks.base import Common, Prepared

NAME = "txt2img"


def applies(job, model_dir) -> bool:
    return job.init_image is None


def prepare(parts, job, common: Common) -> Prepared:
    return Prepared.of(classic.initial_latents(parts.randn(common.shape, common.generator), common.schedule), common)


def finish(job, images: list) -> list:
    return images
