"""Running several validated Jobs as one batch (DESIGN.md §4a): what may share a UNet batch, and how.

Jobs are compatible when everything that shapes the batch's computation is equal (model settings, size, steps,
sampler, schedule, guidance, image inputs); they may differ in prompts, negative prompts and seeds. The merged
Job lists one prompt per image (images_per_prompt 1) and keeps each image's own seed, so with per-image
generators each image is the one its own Job would give (within the engines' batch rounding, ≤ 1/255).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from sdrt.runtime.job import Job

# Fields that may differ between jobs of one batch; every other field must be equal.
_PER_IMAGE = ("prompt", "negative_prompt", "images_per_prompt", "seeds", "estimated_bytes")


def compatibility_key(job: Job) -> tuple:
    """Equal keys ⇔ the jobs can share text-encoder, UNet and VAE batches."""
    images = (id(job.init_image) if job.init_image is not None else None,
              id(job.mask) if job.mask is not None else None,
              id(job.init_latents) if job.init_latents is not None else None,
              id(job.low_res_image) if job.low_res_image is not None else None, job.noise_level,
              id(job.depth_map) if job.depth_map is not None else None,
              id(job.variation_image) if job.variation_image is not None else None)
    return (job.sampler, job.schedule, job.steps, job.guidance, job.guidance_rescale, job.timestep_spacing,
            job.prediction_type, job.width, job.height, job.strength, job.denoising_start, job.denoising_end,
            job.aesthetic_score, job.negative_aesthetic_score, job.negative_prompt is None, images,
            job.syntax, job.clip_skip, job.text_chunks,  # equal chunk counts: no prompt padded beyond its own run
            tuple(id(e) for e in job.embeddings),  # one set of textual inversions (loaded once per file version)
            tuple(r.key for r in job.loras),  # one LoRA set (files and scales) per batch: one set of engines
            job.vae, job.tile_vae,  # one VAE, tiled or not, decodes (and encodes) the batch
            job.cache_interval,  # one step-caching schedule
            job.controls.key() if job.controls is not None else None,  # the same ControlNets, images and window
            job.image_prompt.key() if job.image_prompt is not None else None,  # the same IP-Adapter image, scale
            job.t2i_adapter.key() if job.t2i_adapter is not None else None)


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
