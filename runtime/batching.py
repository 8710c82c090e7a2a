"""Running several validated Jobs as one batch (DESIGN.md §4a): what may share a UNet batch, and how.

Jobs are compatible when every field of the Job is equal but those that may differ per image (prompts, negative
prompts and seeds); the key is derived from the Job's fields, not listed by hand. The merged
Job lists one prompt per image (images_per_prompt 1) and keeps each image's own seed, so with per-image
generators each image is the one its own Job would give (within the engines' batch rounding, ≤ 1/255).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Sequence

from sdrt.runtime.job import Job

# Fields that may differ between the jobs of one batch (a negative prompt's presence may not: see below), and
# fields derived from others that are compared already (the scheduler config and schedule follow from the model,
# sampler, steps, schedule, spacing and prediction type).
PER_IMAGE = ("prompt", "negative_prompt", "images_per_prompt", "seeds", "estimated_bytes")
DERIVED = ("scheduler_config", "full_schedule")


def _comparable(value):
    """A value two jobs share a batch by: plain values themselves, groups element by element, feature records by
    their key() (ControlNets, IP-Adapter, T2I-Adapter) or key (LoRAs), anything else (images, latents, loaded
    embeddings) by identity: the same object, as a request's own images are."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, tuple):
        return tuple(_comparable(v) for v in value)
    key = getattr(value, "key", None)
    if key is not None:
        return key() if callable(key) else key
    return ("id", id(value))


_KEYED = tuple(f.name for f in fields(Job) if f.name not in PER_IMAGE + DERIVED)


def compatibility_key(job: Job) -> tuple:
    """Equal keys ⇔ the jobs can share text-encoder, UNet and VAE batches: every field of the Job but the
    per-image ones is equal (a new Job field joins the key by itself)."""
    return (job.negative_prompt is None, *(_comparable(getattr(job, name)) for name in _KEYED))


def _per_image(job: Job, values: tuple | None) -> tuple | None:
    return None if values is None else tuple(v for v in values for _ in range(job.images_per_prompt))


def merge(jobs: Sequence[Job]) -> Job:
    """One Job for all images of `jobs` (all compatible), in order: job 0's images first."""
    if not jobs:
        raise ValueError("nothing to merge")
    keys = {compatibility_key(j) for j in jobs}
    if len(keys) != 1:
        raise ValueError("these jobs differ in more than prompts and seeds; run them in separate batches")
    first = jobs[0]
    if len(jobs) == 1:
        return first
    prompts = tuple(p for j in jobs for p in _per_image(j, j.prompt))
    negatives = None if first.negative_prompt is None else tuple(
        n for j in jobs for n in _per_image(j, j.negative_prompt))
    return replace(first, prompt=prompts, negative_prompt=negatives, images_per_prompt=1,
                   seeds=tuple(s for j in jobs for s in j.seeds),
                   estimated_bytes=sum(j.estimated_bytes for j in jobs))


def split(images: Sequence, jobs: Sequence[Job]) -> list[list]:
    """The merged batch's images (or latents) back to their jobs."""
    out, start = [], 0
    for job in jobs:
        out.append(list(images[start:start + job.count]))
        start += job.count
    return out


def group(jobs: Sequence[Job], max_images: int) -> list[list[int]]:
    """Indices of `jobs` in batches of compatible jobs of at most max_images images, in first-come order."""
    batches: list[tuple[tuple, list[int], int]] = []
    for i, job in enumerate(jobs):
        key = compatibility_key(job)
        for b, (k, members, count) in enumerate(batches):
            if k == key and count + job.count <= max_images:
                batches[b] = (k, members + [i], count + job.count)
                break
        else:
            batches.append((key, [i], job.count))
    return [members for _, members, _ in batches]
