"""The validated job: a Request checked once against one model (runtime/validate.py), every value typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdrt.runtime import image_io
from sdrt.runtime.samplers import registry as sampler_registry


TINY_VAE = {"decode": "vae_decoder_tiny", "encode": "vae_encoder_tiny"}  # export/extras/tiny_vae.py


@dataclass(frozen=True, eq=False)
class Job:
    """A validated request: every value typed, defaulted and resolved for one model."""

    prompt: tuple[str, ...]
    negative_prompt: tuple[str, ...] | None
    steps: int
    guidance: float
    guidance_rescale: float
    sampler: str  # a registry name
    schedule: str  # one of SIGMA_SCHEDULES
    timestep_spacing: str | None
    prediction_type: str | None
    width: int
    height: int
    images_per_prompt: int
    seeds: tuple[int, ...]  # one per image, in batch order (prompt-major)
    init_image: Image.Image | None
    strength: float | None
    mask: Image.Image | None
    init_latents: Any
    denoising_start: float | None
    denoising_end: float | None
    aesthetic_score: float
    negative_aesthetic_score: float
    estimated_bytes: int = 0
    syntax: str = "a1111"  # prompt syntax (runtime/prompts/encode.py)
    clip_skip: int = 0
    text_chunks: int = 1  # 77-token chunks every prompt of the job is padded to
    embeddings: tuple = ()  # runtime/prompts/embeddings.Embedding: the textual inversions its prompts may use
    max_sequence_length: int = 256  # SD3's T5 sequence (runtime/prompts/text_conditioning.py)
    loras: tuple = ()  # runtime/lora/files.LoraRef, the request's own (prompt tags included); the pipeline's come on top
    vae: str = "full"  # full | tiny (decode, and encode init images, with the tiny VAE)
    tile_vae: bool = False  # the full VAE decodes and encodes in tiles (runtime/vae_tiling.py)
    cache_interval: int = 1  # step caching (runtime/denoiser/step_cache.py); 1 = off
    overlay: tuple | None = None  # outpainting's soft border: (padded original, soft mask) laid over the output
    a1111_inpaint: Any = None  # runtime/tasks/inpaint_a1111.Finish: AUTOMATIC1111 inpainting's latent fill and overlay
    low_res_image: Image.Image | None = None  # the ×4 upscaler's input (width, height: 4× its size)
    noise_level: int | None = None  # the ×4 upscaler's (low-resolution image) or unCLIP's (image embedding)
    depth_map: Image.Image | None = None  # depth-to-image's given depth ("F"); None: the estimator runs
    variation_image: Image.Image | None = None  # unCLIP's image to vary (its noise level: noise_level)
    controls: Any = None  # runtime/conditioning/controlnet.Controls, or None
    image_prompt: Any = None  # runtime/conditioning/ip_adapter.ImagePromptJob, or None
    t2i_adapter: Any = None  # runtime/conditioning/t2i_adapter.AdapterJob, or None
    instantid: Any = None  # runtime/conditioning/instantid.InstantIdUse, or None
    pulid: Any = None  # runtime/conditioning/pulid.PulidUse, or None
    photomaker: Any = None  # runtime/conditioning/photomaker.PhotoMakerUse, or None
    uses: tuple[str, ...] = ()  # the conditioning kinds in use (runtime/conditioning/graphs.py names)
    task: str = "txt2img"  # the runtime/tasks/ module that runs it (tasks/table.py)
    scheduler_config: Any = None  # runtime/samplers/schedules.SchedulerConfig: the model's, with the overrides
    full_schedule: Any = None  # the sampler's whole schedule for `steps`, built once (validation checks it)

    @property
    def count(self) -> int:
        return len(self.prompt) * self.images_per_prompt

    @property
    def seed(self) -> int:
        return self.seeds[0]

    def parameters(self, index: int, model: str, size: tuple[int, int] | None = None,
                   seed: int | None = None) -> image_io.GenerationParameters:
        """The PNG `parameters` of image `index` (AUTOMATIC1111's text): its prompt, negative prompt and seed;
        `size` (width, height) when the image is not the job's size (after ×4 upscaling)."""
        row = index // self.images_per_prompt
        width, height = size or (self.width, self.height)
        return image_io.GenerationParameters(
            prompt=self.prompt[row], negative_prompt=(self.negative_prompt or ("",) * len(self.prompt))[row],
            steps=self.steps, sampler=self.sampler_label, cfg_scale=self.guidance,
            seed=self.seeds[index] if seed is None else seed, width=width, height=height, model=model)

    @property
    def sampler_label(self) -> str:
        """What AUTOMATIC1111 would show: its display name with the schedule suffix, else sdrt's name."""
        spec = sampler_registry.get(self.sampler)
        base = spec.a1111[0] if spec.a1111 else spec.name
        return base if self.schedule == "default" else f"{base} {self.schedule.replace('_', ' ').title()}"
