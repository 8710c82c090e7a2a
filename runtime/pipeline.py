"""The lean generator: the step loop over one engine directory's components (runtime/components.py).

Load once, generate many times. A Request (runtime/request.py) is validated once into a Job (runtime/validate.py),
which names its task (runtime/tasks/: txt2img, img2img, inpaint, outpaint, depth, upscale, unCLIP, refine) and the
conditioning kinds it uses (runtime/conditioning/: ControlNet, IP-Adapter, T2I-Adapter). `prepare` encodes the
prompts and lets the task make the first latents and the kinds add their UNet-call contributors; `steps` runs the
sampler; `Generation` is the one sequence prepare → steps → decode → finish that `generate`, the batching service,
the CLI and the bench share. Images equal diffusers' (pipelines in diffusers/pipelines/stable_diffusion{,_xl}/).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from sdrt.runtime.components import Components
from sdrt.runtime.conditioning import graphs, kinds
from sdrt.runtime.denoiser import flux, sd3, step_cache
from sdrt.runtime.denoiser.call import TextContributor, UnetCall
from sdrt.runtime.denoiser.guidance import Guidance, GuidanceEmbedding, guidance_scale_embedding
from sdrt.runtime.denoiser.x0 import make_denoiser
from sdrt.runtime.errors import UserError
from sdrt.runtime.job import Job
from sdrt.runtime.limits import Limits
from sdrt.runtime.loader import EngineDir, open_dir
from sdrt.runtime.lora import refs as lora_refs
from sdrt.runtime.prompts.encode import TextOptions, TextSetup
from sdrt.runtime.prompts.text_conditioning import SdxlSizes, TextEncoder, condition
from sdrt.runtime.prompts.t5_tokenizer import T5Tokenizer
from sdrt.runtime.prompts.tokenizer import ClipTokenizer
from sdrt.runtime.request import Request
from sdrt.runtime.samplers import noise, registry as sampler_registry, schedules
from sdrt.runtime.tasks import img2img, table as tasks
from sdrt.runtime.tasks.base import Common, Prepared
from sdrt.runtime.validate import validate

class Pipeline(Components):
    @classmethod
    def load(cls, path: str | Path | EngineDir, backend: str = "auto", ort_config=None,
             components: tuple[str, ...] | None = None, limits: Limits = Limits(), loras=(),
             lora_dir: str | Path | None = None, embeddings_dir: str | Path | None = None,
             embeddings=(), face_models: str | Path | None = None) -> "Pipeline":
        """`path`: an engine directory, or one already opened (runtime/loader.open_dir). `loras` ((file or name,
        scale) pairs, or "FILE:SCALE"): applied to every request (each request's own come on top); names are
        looked up in `lora_dir`, which also serves `<lora:NAME:SCALE>` prompt tags. `embeddings_dir` (all its
        files) and `embeddings` (files): textual inversions every prompt may use. `face_models`: the folder of
        insightface models that reads faces from photos (runtime/conditioning/faces.py) for requests that name none."""
        from sdrt.engines.select import open_engine

        d = path if isinstance(path, EngineDir) else open_dir(path)
        base_loras = lora_refs.resolve_at_load(d, loras, lora_dir)  # bad LoRAs fail before any engine loads
        text = TextSetup(embeddings_dir, embeddings, lambda p: open_engine(p, backend, ort_config))
        text.check(d)  # so do bad embeddings
        # what txt2img uses; the VAE encoder, tiny VAEs, depth estimator, image encoders, ControlNets… are opened
        # by `component` on first use, so a run pays only for the sessions its path needs
        layout = d.info.layout  # the family's components (runtime/family.py)
        names = components or tuple(d.text_encoder_names) + (layout.denoiser, "vae_decoder")
        engines = {n: open_engine(d.onnx_path(n), backend, ort_config) for n in names}
        tokenizers = {}
        for enc in d.text_encoder_names:
            folder = d.path / layout.tokenizers[layout.text_encoders.index(enc)]
            t5 = (folder.parent / enc / "config.json").is_file() and \
                json.loads((folder.parent / enc / "config.json").read_text()).get("model_type") == "t5"
            tokenizers[enc] = (T5Tokenizer if t5 else ClipTokenizer).from_folder(folder)
        pipe = cls(d, engines, tokenizers, limits)
        pipe.adapters.use(base_loras, lora_dir)
        pipe.text = text
        pipe.open_engine = lambda p: open_engine(p, backend, ort_config)
        pipe.face_models = str(face_models) if face_models is not None else None
        return pipe

    def validate(self, request: Request | Job) -> Job:
        """The request checked against this model and the pipeline's limits (InvalidRequest otherwise)."""
        if isinstance(request, Job):
            return request
        return validate(self.with_face_models(request), self.dir, self.limits, self.adapters.lora_dir,
                        **self.text.validate_args())

    def with_face_models(self, request: Request) -> Request:
        """The request with the pipeline's face-model folder where it names none."""
        folder = getattr(self, "face_models", None)
        if folder is None or request.adapters.face_models is not None:
            return request
        return replace(request, adapters=replace(request.adapters, face_models=folder))

    # ---- the loop -----------------------------------------------------------------------------------
    def denoise(self, request: Request | Job) -> Iterator[torch.Tensor]:
        """Yield the latents (sigma space, fp32 [N, 4, h, w]) after each step."""
        job = self.validate(request)
        return self.steps(job, self.prepare(job))

    def prepare(self, job: Job) -> Prepared:
        """Text encoding, the task's first latents and contributors, then each conditioning kind's."""
        prep = tasks.BY_NAME[job.task].prepare(self, job, self._common(job))
        for kind in kinds.KINDS:
            prep = kind.attach(self, job, prep)
        return prep

    def steps(self, job: Job, prep: Prepared) -> Iterator[torch.Tensor]:
        """The sampler loop over a prepared job: yields the latents after each step (send() replaces them)."""
        unet = self.engine(graphs.graph_for(job.uses) if job.uses else self.dir.info.layout.denoiser, job)
        text = TextContributor(prep.cond, "text_embeds" in unet.inputs)
        parts = [text, *prep.contributors, *flux.contributors(self.dir, job.guidance, job.count, prep.cond),
                 *sd3.contributors(self.dir, prep.cond)]
        if "timestep_cond" in unet.inputs:
            parts.append(GuidanceEmbedding(guidance_scale_embedding(job.guidance, job.count,
                                                                    self.dir.unet_config["time_cond_proj_dim"])))
        unet, parts = step_cache.setup(self.lazy_engine, job.cache_interval, unet, parts)
        model = UnetCall(unet, prep.guidance, parts, prep.schedule.timesteps, self.dir.info.layout.output)
        denoise_fn = make_denoiser(model, prep.schedule, job.scheduler_config.prediction_type)
        run = sampler_registry.get_sampler(prep.sampler)(denoise_fn, prep.x, prep.schedule, prep.generator)
        x = next(run, None)
        for i in range(prep.steps_to_run):
            if x is None:
                return
            if prep.after_step is not None:  # the task's change goes back into the sampler's state
                x = prep.after_step(x, i)
            replaced = yield x  # a caller may send the latents back changed (sdrt.compat's step callbacks)
            if replaced is not None:
                x = replaced
            if i + 1 < prep.steps_to_run:
                try:
                    x = run.send(x)
                except StopIteration:
                    return

    def steps_to_run(self, request: Request | Job) -> int:
        """How many latents `denoise(request)` yields (model evaluations after img2img/hand-off windows)."""
        return self._window(self.validate(request))[1]

    def generate(self, request: Request | Job) -> list[Image.Image]:
        return Generation(self, self.validate(request)).run()

    def finish(self, job: Job, images: list[Image.Image]) -> list[Image.Image]:
        """What follows decoding for the job's task (outpainting's soft-border overlay)."""
        return tasks.BY_NAME[job.task].finish(job, images)

    # ---- preparation --------------------------------------------------------------------------------
    def _common(self, job: Job) -> Common:
        width, height = job.width, job.height
        # LCM-distilled UNets and FLUX.1 (Layout.guidance_batch) never batch for classifier-free guidance
        embedded = self.dir.unet_config.get("time_cond_proj_dim") is not None or not self.dir.info.layout.guidance_batch
        guidance = Guidance(job.guidance, job.guidance_rescale, embedded)
        negative = list(job.negative_prompt) if job.negative_prompt is not None else None
        sizes = SdxlSizes(original=(height, width), crop=(0, 0), target=(height, width),
                          aesthetic_score=job.aesthetic_score, negative_aesthetic_score=job.negative_aesthetic_score)
        loras = lora_refs.combine(self.adapters.base, job.loras)
        encoders = [TextEncoder(self.tokenizers[n], self.engine(n, job), self.dir.path / n,
                                self.text.variant(self.dir, n, lora_refs.touching(loras, n)))
                    for n in self.dir.text_encoder_names]
        cond = condition(self.dir.info.family, encoders, list(job.prompt), negative, job.images_per_prompt,
                         guidance.enabled, bool(self.dir.model_index.get("force_zeros_for_empty_prompt", True)),
                         sizes, TextOptions(job.syntax, job.clip_skip, job.text_chunks, job.embeddings,
                                            job.max_sequence_length))
        start, steps_to_run = self._window(job)
        f = self.dir.vae_scale_factor
        return Common(schedule=schedules.from_index(job.full_schedule, start), sampler=job.sampler,
                      steps_to_run=steps_to_run, cond=cond, guidance=guidance,
                      generator=noise.generators(job.seeds),
                      shape=(job.count, int(self.dir.vae_config.get("latent_channels", 4)), height // f, width // f))

    def _window(self, job: Job) -> tuple[int, int]:
        """(first schedule index, number of steps to run) for img2img strength and base/refiner hand-off."""
        schedule, cfg = job.full_schedule, job.scheduler_config
        total = schedules.num_steps(schedule)
        start = 0
        if job.denoising_start is not None:
            start = schedules.denoising_start_index(schedule, job.denoising_start, cfg)
        elif job.init_image is not None:
            strength = job.strength if job.strength is not None else \
                img2img.default_strength(self.dir.info.family, job.mask is not None)  # the pipelines' defaults
            start = schedules.strength_start_index(schedule, job.steps, strength)
        end = total
        if job.denoising_end is not None:
            end = schedules.denoising_end_count(schedule, job.denoising_end, cfg)
        return start, max(end - start, 0)


class Generation:
    """One generate sequence for a validated job: prepare → steps → decode → finish (DESIGN.md §2a). `run()` does
    it all; the batching service, the CLI and the bench drive the phases themselves to time them, report progress
    or stop between steps."""

    def __init__(self, pipe: Pipeline, job: Job):
        self.pipe, self.job = pipe, job
        self.prepared: Prepared | None = None
        self.latents: torch.Tensor | None = None

    @property
    def total(self) -> int:
        """How many latents `steps()` yields (preparing the job if it is not yet)."""
        return (self.prepared or self.prepare()).steps_to_run

    def prepare(self) -> Prepared:
        self.prepared = self.pipe.prepare(self.job)
        return self.prepared

    def steps(self) -> Iterator[torch.Tensor]:
        """The latents after each step (the last one is kept for `decode`)."""
        for self.latents in self.pipe.steps(self.job, self.prepared or self.prepare()):
            yield self.latents

    def final_latents(self) -> torch.Tensor:
        """The last step's latents (what a base hands to a refiner)."""
        if self.latents is None:  # as diffusers, which needs int(steps * strength) >= 1
            raise UserError(f"{self.job.steps} steps at this strength leave no denoising step; raise the steps or "
                            "the strength")
        return self.latents

    def decode(self) -> list[Image.Image]:
        """The last step's latents as images, before `finish` (one per image of the job)."""
        return self.pipe.decode(self.final_latents(), self.job.vae, self.job.tile_vae)

    def finish(self, images: list[Image.Image], job: Job | None = None) -> list[Image.Image]:
        """The task's finish for `job` (a batch's own job, when several ran merged)."""
        return self.pipe.finish(job or self.job, images)

    def run(self) -> list[Image.Image]:
        for _ in self.steps():
            pass
        return self.finish(self.decode())
