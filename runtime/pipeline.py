"""The lean generator: txt2img, img2img, inpaint and SDXL base → refiner, around the engines.

Load once, generate many times. `denoise(request)` is a generator yielding the latents after every
step (the CLI draws its progress bar from it, the bench times it); `generate(request)` runs it and
decodes. A Request (runtime/request.py) is validated once into a Job (runtime/validate.py). Randomness is
drawn per image (DESIGN.md §4a): image i of a request seeded s has its own CPU torch.Generator seeded s + i,
used in the order and shapes diffusers uses with a list of generators, so an image is the same alone or
batched and equals diffusers' (pipelines in diffusers/pipelines/stable_diffusion{,_xl}/).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from sdrt.runtime.conditioning import controlnet_call, ip_adapter, t2i_adapter
from sdrt.runtime.tasks import depth, outpaint, unclip, upscale
from sdrt.runtime.denoiser import feed, step_cache
from sdrt.runtime import image_io, vae_tiling
from sdrt.runtime.lora import adapters as lora
from sdrt.runtime.samplers import noise, registry as sampler_registry, classic as samplers, schedules
from sdrt.runtime.prompts.text_conditioning import Conditioning, SdxlSizes, TextEncoder, condition
from sdrt.runtime.prompts.encode import TextOptions, TextSetup
from sdrt.runtime.denoiser.x0 import make_denoiser
from sdrt.runtime.errors import UserError
from sdrt.runtime.family import Family
from sdrt.runtime.denoiser.guidance import Guidance
from sdrt.runtime.limits import Limits
from sdrt.runtime.loader import EngineDir, open_dir
from sdrt.runtime.request import Request
from sdrt.runtime.prompts.tokenizer import ClipTokenizer
from sdrt.runtime.denoiser.call import ClassLabels, ExtraChannels, TextContributor, UnetCall
from sdrt.runtime.job import Job, TINY_VAE
from sdrt.runtime.validate import validate

@dataclass
class _Prepared:
    x: torch.Tensor  # sigma-space latents [N, 4, h, w]
    schedule: object
    sampler: str
    steps_to_run: int
    cond: Conditioning
    guidance: Guidance
    blend: tuple | None = None  # 4-channel inpaint: (mask [N,1,h,w], image latents, noise)
    generator: list | None = None  # one CPU torch.Generator per image
    contributors: list = field(default_factory=list)  # the UNet feed's parts besides text (runtime/denoiser/call.py)
    unet: str = "unet"  # the UNet graph the contributors feed (unet_controlnet takes ControlNet residuals)


class Pipeline:
    def __init__(self, engine_dir: EngineDir, engines: dict, tokenizers: dict, limits: Limits = Limits()):
        self.dir = engine_dir
        self.engines = engines
        self.tokenizers = tokenizers
        self.limits = limits
        self.device = getattr(engines["unet"], "device", "cpu")  # where latents live during the loop
        self.adapters = lora.Adapters(engine_dir, lambda: self.engines)  # engines per LoRA set, from base weights
        self.text = TextSetup()  # embeddings and the text encoders' inputs_embeds variants (runtime/prompts/encode.py)
        self.vae_tiles = vae_tiling.Tiles.of_vae(engine_dir.vae_config)  # diffusers' defaults for this VAE
        self.open_engine = None  # path → engine, for components opened on first use (set by load)

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", ort_config=None,
             components: tuple[str, ...] | None = None, limits: Limits = Limits(), loras=(),
             lora_dir: str | Path | None = None, embeddings_dir: str | Path | None = None,
             embeddings=()) -> "Pipeline":
        """`loras` ((file or name, scale) pairs, or "FILE:SCALE"): applied to every request (each request's own
        come on top); names are looked up in `lora_dir`, which also serves `<lora:NAME:SCALE>` prompt tags.
        `embeddings_dir` (all its files) and `embeddings` (files): textual inversions every prompt may use."""
        from sdrt.engines.select import open_engine

        d = open_dir(path)
        base_loras = lora.resolve_at_load(d, loras, lora_dir)  # bad LoRAs fail before any engine loads
        text = TextSetup(embeddings_dir, embeddings, lambda p: open_engine(p, backend, ort_config))
        text.check(d)  # so do bad embeddings
        # what txt2img uses; the VAE encoder, tiny VAEs, depth estimator, image encoders, ControlNets… are opened
        # by `component` on first use, so a run pays only for the sessions its path needs
        names = components or tuple(d.text_encoder_names) + ("unet", "vae_decoder")
        engines = {n: open_engine(d.onnx_path(n), backend, ort_config) for n in names}
        tokenizers = {}
        for enc in d.text_encoder_names:
            tok = "tokenizer" if enc == "text_encoder" else "tokenizer_2"
            tokenizers[enc] = ClipTokenizer.from_folder(d.path / tok)
        pipe = cls(d, engines, tokenizers, limits)
        pipe.adapters.use(base_loras, lora_dir)
        pipe.text = text
        pipe.open_engine = lambda p: open_engine(p, backend, ort_config)
        return pipe

    # ---- request validation -------------------------------------------------------------------------
    def validate(self, request: Request | Job) -> Job:
        """The request checked against this model and the pipeline's limits (InvalidRequest otherwise)."""
        return request if isinstance(request, Job) else validate(request, self.dir, self.limits,
                                                                 self.adapters.lora_dir, **self.text.validate_args())

    def engine(self, name: str, job: Job | None = None):
        """Component `name`'s engine for this job's LoRA set (runtime/lora/adapters.py: rebuilt, never accumulated)."""
        self.component(name)
        return self.adapters.engine(name, job.loras if job is not None else ())

    def lazy_engine(self, name: str):
        """Step caching's graphs, opened on first use (only runs that use them pay); they carry no LoRA weights."""
        if name not in self.engines and self.adapters.base:
            raise UserError("step caching's graphs carry no LoRA weights; this pipeline was loaded with LoRAs")
        return self.component(name)

    def scheduler_config(self, job: Job):
        overrides = {}
        if job.timestep_spacing:
            overrides["timestep_spacing"] = job.timestep_spacing
        if job.prediction_type:
            overrides["prediction_type"] = job.prediction_type
        return schedules.SchedulerConfig.from_diffusers_json({**self.dir.scheduler_config, **overrides})

    def _schedule(self, job: Job):
        return sampler_registry.make_schedule(self.scheduler_config(job), job.sampler, job.steps, job.schedule)

    # ---- the loop -----------------------------------------------------------------------------------
    def denoise(self, request: Request | Job) -> Iterator[torch.Tensor]:
        """Yield the latents (sigma space, fp32 [N, 4, h, w]) after each step."""
        job = self.validate(request)
        return self.steps(job, self.prepare(job))

    def prepare(self, job: Job) -> "_Prepared":
        """Text encoding, initial latents and schedule for a validated job (what `steps` then runs)."""
        prep = ip_adapter.attach(self, job, controlnet_call.attach(self, job, self._prepare(job)))
        return t2i_adapter.attach(self, job, prep)

    def component(self, name: str):
        """The engine of `name`, opened on first use (components plain runs never need, such as ControlNets)."""
        if name not in self.engines:
            if self.open_engine is None:
                raise UserError(f"this pipeline was built without {name} and cannot open it")
            self.engines[name] = self.open_engine(self.dir.onnx_path(name))
        return self.engines[name]

    def steps(self, job: Job, prep: "_Prepared") -> Iterator[torch.Tensor]:
        """The sampler loop over a prepared job: yields the latents after each step."""
        cfg = self.scheduler_config(job)
        unet = self.engine(prep.unet, job)
        text = TextContributor(prep.cond, "text_embeds" in unet.inputs)
        unet, parts = step_cache.setup(self.lazy_engine, job.cache_interval, unet, [text, *prep.contributors])
        model = UnetCall(unet, prep.guidance, parts, prep.schedule.timesteps)
        denoise_fn = make_denoiser(model, prep.schedule, cfg.prediction_type)
        run = sampler_registry.get_sampler(prep.sampler)(denoise_fn, prep.x, prep.schedule, prep.generator)
        x = next(run, None)
        for i in range(prep.steps_to_run):
            if x is None:
                return
            if prep.blend is not None:  # the blended latent goes back into the sampler's state
                x = self._blend(x, i, prep)
            yield x
            if i + 1 < prep.steps_to_run:
                try:
                    x = run.send(x)
                except StopIteration:
                    return

    def _blend(self, x: torch.Tensor, i: int, prep: _Prepared) -> torch.Tensor:
        """Ordinary (4-channel) UNets inpaint by re-imposing the noised original outside the mask each step."""
        mask, image_latents, noise = prep.blend
        next_sigma = float(prep.schedule.sigmas[i + 1]) if i + 1 < len(prep.schedule.sigmas) else 0.0
        proper = image_latents + noise * next_sigma
        return (1 - mask) * proper + mask * x

    def steps_to_run(self, request: Request | Job) -> int:
        """How many latents `denoise(request)` yields (model evaluations after img2img/hand-off windows)."""
        job = self.validate(request)
        return self._window(job, self._schedule(job))[1]

    def generate(self, request: Request | Job) -> list[Image.Image]:
        job = self.validate(request)
        latents = None
        for latents in self.denoise(job):
            pass
        if latents is None:  # as diffusers, which needs int(steps * strength) >= 1
            raise UserError(f"{job.steps} steps at this strength leave no denoising step; raise the steps or "
                            "the strength")
        return self.finish(job, self.decode(latents, job.vae, job.tile_vae))

    def finish(self, job: Job, images: list[Image.Image]) -> list[Image.Image]:
        """What follows decoding for some jobs: outpainting's soft-border overlay (runtime/tasks/outpaint.py)."""
        if job.overlay is None:
            return images
        original, soft = job.overlay
        return [outpaint.overlay(image, original, soft) for image in images]

    def decode(self, latents: torch.Tensor, vae: str = "full", tiled: bool = False) -> list[Image.Image]:
        """Latents → images with the full VAE or the tiny one (vae="tiny": export/extras/tiny_vae.py, whose
        scaling_factor 1.0 makes this diffusers' `vae.decode(latents / vae.config.scaling_factor)` as well);
        `tiled`: the full VAE in tiles, as diffusers after vae.enable_tiling() (runtime/vae_tiling.py)."""
        name = TINY_VAE["decode"] if vae == "tiny" else "vae_decoder"
        engine = self.component(name)
        scaled = latents / self._scaling_factor(name)
        if tiled and vae != "tiny" and self.vae_tiles.decode_tiles(*scaled.shape[-2:]):
            out = vae_tiling.tiled_decode(lambda z: feed.run(engine, latent_sample=z)["sample"], scaled,
                                          self.vae_tiles)
        else:
            out = feed.run(engine, latent_sample=scaled)["sample"]
        return image_io.to_pil(out, fp16_vae=engine.inputs["latent_sample"].dtype == "float16")

    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Progress images: a step's latents decoded by the tiny VAE (needs vae_decoder_tiny)."""
        return self.decode(latents, "tiny")

    def _scaling_factor(self, name: str) -> float:
        config = self.dir.vae_config if name in ("vae_decoder", "vae_encoder") else \
            json.loads((self.dir.path / name / "config.json").read_text())
        return float(config.get("scaling_factor", 0.18215))

    # ---- preparation --------------------------------------------------------------------------------
    def _randn(self, shape: tuple, generators: list) -> torch.Tensor:
        """diffusers' randn_tensor with a list of CPU generators: one draw per image, then moved to the device."""
        return noise.randn(shape, generators, self.device)

    def _encode_image(self, image: torch.Tensor, generators: list, vae: str = "full",
                      tiled: bool = False) -> torch.Tensor:
        """[1, 3, H, W] in [-1, 1] → scaled latents [N, 4, h, w]: the posterior sampled once per image, each with
        its own generator (diffusers' img2img with a list of generators: retrieve_latents(..., generator[i])).
        The tiny VAE's encoder gives latents, not a distribution: retrieve_latents draws nothing for it."""
        if vae == "tiny":
            latents = feed.run(self.component(TINY_VAE["encode"]), sample=image)["latents"]
            return latents.repeat_interleave(len(generators), dim=0) * self._scaling_factor(TINY_VAE["encode"])
        encoder = self.component("vae_encoder")
        if tiled and self.vae_tiles.encode_tiles(*image.shape[-2:]):  # AutoencoderKL._tiled_encode
            params = vae_tiling.tiled_encode(lambda x: feed.run(encoder, sample=x)["latent_parameters"], image,
                                             self.vae_tiles)
        else:
            params = feed.run(encoder, sample=image)["latent_parameters"]
        mean, logvar = params.chunk(2, dim=1)  # diffusers DiagonalGaussianDistribution
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = noise.randn((len(generators), *mean.shape[1:]), generators, mean.device, mean.dtype)
        return (mean + std * eps) * float(self.dir.vae_config.get("scaling_factor", 0.18215))

    def _prepare(self, request: Job) -> _Prepared:
        family = self.dir.info.family
        width, height = request.width, request.height
        generator = noise.generators(request.seeds)
        guidance = Guidance(request.guidance, request.guidance_rescale)
        prompts = list(request.prompt)
        negative = list(request.negative_prompt) if request.negative_prompt is not None else None
        sizes = SdxlSizes(original=(height, width), crop=(0, 0), target=(height, width),
                          aesthetic_score=request.aesthetic_score,
                          negative_aesthetic_score=request.negative_aesthetic_score)
        loras = lora.combine(self.adapters.base, request.loras)
        encoders = [TextEncoder(self.tokenizers[n], self.engine(n, request), self.dir.path / n,
                                self.text.variant(self.dir, n, lora.touching(loras, n)))
                    for n in self.dir.text_encoder_names]
        cond = condition(family, encoders, prompts, negative, request.images_per_prompt, guidance.enabled,
                         bool(self.dir.model_index.get("force_zeros_for_empty_prompt", True)), sizes,
                         TextOptions(request.syntax, request.clip_skip, request.text_chunks, request.embeddings))

        sampler = request.sampler
        schedule = self._schedule(request)
        n = request.count
        f = self.dir.vae_scale_factor
        shape = (n, 4, height // f, width // f)
        start, steps_to_run = self._window(request, schedule)
        schedule = schedules.from_index(schedule, start)
        common = dict(schedule=schedule, sampler=sampler, steps_to_run=steps_to_run, cond=cond, guidance=guidance,
                      generator=generator)

        if request.init_latents is not None:  # refiner after a base: continue from the base's latents
            x = request.init_latents.to(self.device, torch.float32).repeat_interleave(n // request.init_latents.shape[0], dim=0)
            return _Prepared(x, **common)
        if request.low_res_image is not None:
            return self._prepare_upscale(request, shape, common)
        if request.variation_image is not None:
            return self._prepare_unclip(request, shape, common)
        if request.init_image is None:
            return _Prepared(samplers.initial_latents(self._randn(shape, generator), schedule), **common)

        image = image_io.to_tensor(request.init_image, width, height).to(self.device)
        sigma0 = float(schedule.sigmas[0])
        if request.mask is None:  # img2img: encode (posterior sample), then noise to the first sigma
            image_latents = self._encode_image(image, generator, request.vae, request.tile_vae)
            drawn = self._randn(shape, generator)
            return _Prepared(image_latents + drawn * sigma0, **common, contributors=self._depth(request, shape, guidance))
        return self._prepare_inpaint(request, image, shape, common)

    def _depth(self, request: Job, shape: tuple, guidance: Guidance) -> list:
        """Depth-to-image's channel (runtime/tasks/depth.py): the given map, or the estimator on the init image."""
        if not self.dir.info.depth:
            return []
        n, _, h, w = shape
        if request.depth_map is not None:
            raw = depth.map_tensor(request.depth_map)  # [1, H, W]
        else:
            folder = self.dir.path / "depth_estimator"
            pixels = depth.EstimatorInput.of(folder).tensor(request.init_image)
            raw = feed.run(self.component("depth_estimator"), pixel_values=pixels)["predicted_depth"]
        d = depth.normalised(raw.cpu(), h, w).repeat(n, 1, 1, 1).to(self.device)  # [N, 1, h, w]
        return [ExtraChannels(guidance.batch(d))]

    def _prepare_inpaint(self, request: Job, image: torch.Tensor, shape: tuple, common: dict) -> _Prepared:
        # diffusers StableDiffusionInpaintPipeline: prepare_latents, then prepare_mask_latents (both draw RNG).
        # Each image samples its own posteriors with its own generator: for one image that is diffusers' draw;
        # diffusers' batches sample the shared encodings with generator[0] only, which would tie image i to seed s.
        n, _, h, w = shape
        schedule, guidance, generator = common["schedule"], common["guidance"], common["generator"]
        mask = image_io.mask_to_tensor(request.mask, image.shape[-1], image.shape[-2]).to(self.device)
        masked_image = image * (mask < 0.5)
        strength = 1.0 if request.strength is None else request.strength
        nine_channel = self.dir.info.inpaint
        image_latents = None
        if not nine_channel or strength < 1.0:
            image_latents = self._encode_image(image, generator, request.vae, request.tile_vae)
        drawn = self._randn(shape, generator)
        if strength >= 1.0:
            x = samplers.initial_latents(drawn, schedule)
        else:
            x = image_latents + drawn * float(schedule.sigmas[0])
        latent_mask = torch.nn.functional.interpolate(mask, size=(h, w)).repeat(n, 1, 1, 1)
        masked_latents = self._encode_image(masked_image, generator, request.vae, request.tile_vae)
        if nine_channel:
            extra = guidance.batch(torch.cat([latent_mask, masked_latents], dim=1))
            return _Prepared(x, **common, contributors=[ExtraChannels(extra)])
        return _Prepared(x, **common, blend=(latent_mask, image_latents, drawn))

    def _prepare_upscale(self, request: Job, shape: tuple, common: dict) -> _Prepared:
        # diffusers StableDiffusionUpscalePipeline.__call__: the low-resolution image noised by low_res_scheduler
        # at noise_level (one draw), then prepare_latents (one draw); each image draws both with its own generator
        # (diffusers' batches noise the shared image with generator[0] only, which would tie image i to seed s).
        n = shape[0]
        guidance, generator = common["guidance"], common["generator"]
        low = request.low_res_image
        image = image_io.to_tensor(low, low.width, low.height).to(self.device)  # [1, 3, h, w] in [-1, 1]
        drawn = self._randn((n, *image.shape[1:]), generator)
        noised = upscale.LowResNoise.of(self.dir).add_noise(image, drawn, request.noise_level)  # [N, 3, h, w]
        x = samplers.initial_latents(self._randn(shape, generator), common["schedule"])
        extra = guidance.batch(noised)
        labels = upscale.class_labels(request.noise_level, extra.shape[0])
        return _Prepared(x, **common, contributors=[ExtraChannels(extra), ClassLabels(labels)])

    def _prepare_unclip(self, request: Job, shape: tuple, common: dict) -> _Prepared:
        # diffusers StableUnCLIPImg2ImgPipeline: _encode_image → noise_image_embeddings (one draw), then
        # prepare_latents (one draw); each image draws both with its own generator (diffusers' batches noise the
        # one embedding with generator[0] only). Unconditional class labels are zeros, as diffusers.
        n = shape[0]
        guidance, generator = common["guidance"], common["generator"]
        pixels = unclip.EncoderInput.of(self.dir.path / "image_encoder").tensor(request.variation_image)
        embeds = feed.run(self.component("image_encoder"), pixel_values=pixels)["image_embeds"].cpu()  # [1, D]
        drawn = noise.randn((n, embeds.shape[-1]), generator)  # [N, D], CPU as diffusers' generators
        labels = unclip.EmbeddingNoise.of(self.dir.path).noised(embeds, drawn, request.noise_level)  # [N, 2D]
        if guidance.enabled:
            labels = torch.cat([torch.zeros_like(labels), labels])
        x = samplers.initial_latents(self._randn(shape, generator), common["schedule"])
        return _Prepared(x, **common, contributors=[ClassLabels(labels.to(self.device))])

    def _window(self, request: Job, schedule) -> tuple[int, int]:
        """(first schedule index, number of steps to run) for img2img strength and base/refiner hand-off."""
        total = schedules.num_steps(schedule)
        start = 0
        if request.denoising_start is not None:
            start = schedules.denoising_start_index(schedule, request.denoising_start, self.scheduler_config(request))
        elif request.init_image is not None:
            default = 1.0 if request.mask is not None else (0.3 if self.dir.info.family == Family.SDXL_REFINER else 0.8)
            strength = request.strength if request.strength is not None else default
            start = schedules.strength_start_index(schedule, request.steps, strength)
        end = total
        if request.denoising_end is not None:
            end = schedules.denoising_end_count(schedule, request.denoising_end, self.scheduler_config(request))
        return start, max(end - start, 0)
