"""The lean generator: txt2img, img2img, inpaint and SDXL base → refiner, around the engines.

Load once, generate many times. `denoise(request)` is a generator yielding the latents after every
step (the CLI draws its progress bar from it, the bench times it); `generate(request)` runs it and
decodes. Randomness is drawn from one CPU torch.Generator in the order and shapes diffusers uses, so a
seed gives diffusers' image (pipelines in diffusers/pipelines/stable_diffusion{,_xl}/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from . import feed, image_io, samplers, schedules
from .conditioning import Conditioning, SdxlSizes, TextEncoder, condition
from .denoiser import make_denoiser
from .errors import UserError
from .family import Family
from .guidance import Guidance
from .loader import EngineDir, open_dir
from .tokenizer import ClipTokenizer

# The sampler diffusers runs for a model's own scheduler class; others (PNDM, LMS, …) fall back to euler.
DEFAULT_SAMPLERS = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DDIMScheduler": "ddim",
    "LCMScheduler": "lcm",
}


@dataclass(frozen=True, eq=False)
class Request:
    prompt: tuple[str, ...]
    negative_prompt: tuple[str, ...] | None = None  # None: diffusers' default ("" or SDXL's zeros)
    steps: int = 30
    guidance: float = 7.5
    guidance_rescale: float = 0.0
    sampler: str | None = None  # None: the sampler matching the model's scheduler config
    karras: bool = False
    timestep_spacing: str | None = None  # override the model's spacing (presets use "trailing")
    prediction_type: str | None = None  # override (SDXL-Lightning 1-step predicts x0: "sample")
    seed: int = 0
    width: int | None = None
    height: int | None = None
    images_per_prompt: int = 1
    init_image: Image.Image | None = None
    strength: float | None = None  # None: diffusers' default (img2img 0.8, SDXL refiner 0.3, inpaint 1.0)
    mask: Image.Image | None = None  # white = repaint
    init_latents: torch.Tensor | None = None  # base → refiner hand-off (with denoising_start)
    denoising_start: float | None = None
    denoising_end: float | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


@dataclass
class _Prepared:
    x: torch.Tensor  # sigma-space latents [N, 4, h, w]
    schedule: object
    sampler: str
    steps_to_run: int
    cond: Conditioning
    guidance: Guidance
    extra_channels: torch.Tensor | None = None  # 9-channel inpaint: mask ‖ masked-image latents, [N(·2), 5, h, w]
    blend: tuple | None = None  # 4-channel inpaint: (mask [N,1,h,w], image latents, noise)
    generator: torch.Generator | None = None


class Pipeline:
    def __init__(self, engine_dir: EngineDir, engines: dict, tokenizers: dict):
        self.dir = engine_dir
        self.engines = engines
        self.tokenizers = tokenizers
        self.device = getattr(engines["unet"], "device", "cpu")  # where latents live during the loop

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", ort_config=None,
             components: tuple[str, ...] | None = None) -> "Pipeline":
        from sdrt.engines.select import open_engine

        d = open_dir(path)
        names = components or tuple(d.text_encoder_names) + ("unet", "vae_decoder") + \
            (("vae_encoder",) if (d.path / "vae_encoder" / "model.onnx").exists() else ())
        engines = {n: open_engine(d.onnx_path(n), backend, ort_config) for n in names}
        tokenizers = {}
        for enc in d.text_encoder_names:
            tok = "tokenizer" if enc == "text_encoder" else "tokenizer_2"
            tokenizers[enc] = ClipTokenizer.from_folder(d.path / tok)
        return cls(d, engines, tokenizers)

    # ---- request validation -------------------------------------------------------------------------
    def _size(self, request: Request) -> tuple[int, int]:
        if request.init_latents is not None:
            h, w = request.init_latents.shape[-2:]
            return h * self.dir.vae_scale_factor, w * self.dir.vae_scale_factor
        if request.init_image is not None and (request.width is None or request.height is None):
            w, h = request.init_image.size
            m = self.dir.vae_scale_factor * self.dir.latent_multiple
            return request.height or h // m * m, request.width or w // m * m
        return request.height or self.dir.default_size, request.width or self.dir.default_size

    def check(self, request: Request) -> None:
        multiple = self.dir.vae_scale_factor * self.dir.latent_multiple
        height, width = self._size(request)
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise UserError(f"width and height must be positive multiples of {multiple} for this model "
                            f"(got {width}x{height})")
        if request.steps < 1:
            raise UserError(f"steps must be at least 1 (got {request.steps})")
        sampler = self.sampler_name(request)
        if sampler not in samplers.SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        if request.strength is not None and not 0 < request.strength <= 1:
            raise UserError(f"strength must be in (0, 1] (got {request.strength})")
        if request.mask is not None and request.init_image is None:
            raise UserError("a mask needs an init image (--init-image) to inpaint")
        if self.dir.info.family == Family.SDXL_REFINER and request.init_image is None and request.init_latents is None:
            raise UserError("the SDXL refiner refines an image: give --init-image, or use it with --refiner after a base")
        if self.dir.info.inpaint and request.mask is None:
            raise UserError("this is an inpainting model: give --init-image and --mask")
        if not request.prompt:
            raise UserError("give at least one prompt")

    def sampler_name(self, request: Request) -> str:
        if request.sampler:
            return request.sampler
        cfg = self.dir.scheduler_config
        if cfg.get("algorithm_type") == "sde-dpmsolver++":
            return "dpmpp_2m_sde"
        return DEFAULT_SAMPLERS.get(cfg.get("_class_name", ""), "euler")

    def scheduler_config(self, request: Request):
        overrides = {}
        if request.timestep_spacing:
            overrides["timestep_spacing"] = request.timestep_spacing
        if request.prediction_type:
            overrides["prediction_type"] = request.prediction_type
        return schedules.SchedulerConfig.from_diffusers_json({**self.dir.scheduler_config, **overrides})

    # ---- the loop -----------------------------------------------------------------------------------
    def denoise(self, request: Request) -> Iterator[torch.Tensor]:
        """Yield the latents (sigma space, fp32 [N, 4, h, w]) after each step."""
        self.check(request)
        prep = self._prepare(request)
        cfg = self.scheduler_config(request)
        unet = self.engines["unet"]
        has_added = "text_embeds" in unet.inputs
        timestep_rank = len(unet.inputs["timestep"].shape)

        def model(scaled_x: torch.Tensor, t: float) -> torch.Tensor:
            x_in = prep.guidance.batch(scaled_x)
            if prep.extra_channels is not None:
                x_in = torch.cat([x_in, prep.extra_channels], dim=1)
            timestep = torch.tensor(float(t), dtype=torch.float32)
            if timestep_rank == 1:  # older exports: [batch]
                timestep = timestep.reshape(1).expand(x_in.shape[0])
            inputs = {"sample": x_in, "timestep": timestep, "encoder_hidden_states": prep.cond.embeds}
            if has_added:
                inputs |= {"text_embeds": prep.cond.pooled, "time_ids": prep.cond.time_ids}
            return prep.guidance.combine(feed.run(unet, **inputs)["out_sample"])

        denoise_fn = make_denoiser(model, prep.schedule, cfg.prediction_type)
        run = samplers.SAMPLERS[prep.sampler](denoise_fn, prep.x, prep.schedule, prep.generator)
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

    def steps_to_run(self, request: Request) -> int:
        """How many latents `denoise(request)` yields (model evaluations after img2img/hand-off windows)."""
        cfg = self.scheduler_config(request)
        schedule = schedules.make_schedule(cfg, self.sampler_name(request), request.steps, request.karras)
        return self._window(request, schedule)[1]

    def generate(self, request: Request) -> list[Image.Image]:
        latents = None
        for latents in self.denoise(request):
            pass
        if latents is None:  # as diffusers, which needs int(steps * strength) >= 1
            raise UserError(f"{request.steps} steps at this strength leave no denoising step; raise --steps or "
                            "--strength")
        return self.decode(latents)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.engines["vae_decoder"]
        scaled = latents / float(self.dir.vae_config.get("scaling_factor", 0.18215))
        out = feed.run(vae, latent_sample=scaled)["sample"]
        return image_io.to_pil(out, fp16_vae=vae.inputs["latent_sample"].dtype == "float16")

    # ---- preparation --------------------------------------------------------------------------------
    def _randn(self, shape: tuple, generator: torch.Generator) -> torch.Tensor:
        """diffusers' randn_tensor with a CPU generator: drawn on the CPU, then moved to the latents' device."""
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def _encode_image(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[1, 3, H, W] in [-1, 1] → scaled latents, sampled from the posterior with the request's generator."""
        params = feed.run(self.engines["vae_encoder"], sample=image)["latent_parameters"]
        mean, logvar = params.chunk(2, dim=1)  # diffusers DiagonalGaussianDistribution
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        sample = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return sample * float(self.dir.vae_config.get("scaling_factor", 0.18215))

    def _prepare(self, request: Request) -> _Prepared:
        family = self.dir.info.family
        height, width = self._size(request)
        generator = torch.Generator().manual_seed(request.seed)
        guidance = Guidance(request.guidance, request.guidance_rescale)
        prompts = list(request.prompt)
        negative = list(request.negative_prompt) if request.negative_prompt is not None else None
        if negative is not None and len(negative) == 1 and len(prompts) > 1:
            negative = negative * len(prompts)
        sizes = SdxlSizes(original=(height, width), crop=(0, 0), target=(height, width),
                          aesthetic_score=request.aesthetic_score,
                          negative_aesthetic_score=request.negative_aesthetic_score)
        encoders = [TextEncoder(self.tokenizers[n], self.engines[n]) for n in self.dir.text_encoder_names]
        cond = condition(family, encoders, prompts, negative, request.images_per_prompt, guidance.enabled,
                         bool(self.dir.model_index.get("force_zeros_for_empty_prompt", True)), sizes)

        sampler = self.sampler_name(request)
        schedule = schedules.make_schedule(self.scheduler_config(request), sampler, request.steps, request.karras)
        n = len(prompts) * request.images_per_prompt
        f = self.dir.vae_scale_factor
        shape = (n, 4, height // f, width // f)
        start, steps_to_run = self._window(request, schedule)
        schedule = schedules.from_index(schedule, start)
        common = dict(schedule=schedule, sampler=sampler, steps_to_run=steps_to_run, cond=cond, guidance=guidance,
                      generator=generator)

        if request.init_latents is not None:  # refiner after a base: continue from the base's latents
            x = request.init_latents.to(self.device, torch.float32).repeat_interleave(n // request.init_latents.shape[0], dim=0)
            return _Prepared(x, **common)
        if request.init_image is None:
            noise = self._randn(shape, generator)
            return _Prepared(samplers.initial_latents(noise, schedule), **common)

        image = image_io.to_tensor(request.init_image, width, height).to(self.device)
        sigma0 = float(schedule.sigmas[0])
        if request.mask is None:  # img2img: encode (posterior sample), then noise to the first sigma
            image_latents = self._encode_image(image, generator).repeat(n, 1, 1, 1)
            noise = self._randn(shape, generator)
            return _Prepared(image_latents + noise * sigma0, **common)
        return self._prepare_inpaint(request, image, shape, common)

    def _prepare_inpaint(self, request: Request, image: torch.Tensor, shape: tuple, common: dict) -> _Prepared:
        # diffusers StableDiffusionInpaintPipeline: prepare_latents, then prepare_mask_latents (both draw RNG)
        n, _, h, w = shape
        schedule, guidance, generator = common["schedule"], common["guidance"], common["generator"]
        mask = image_io.mask_to_tensor(request.mask, image.shape[-1], image.shape[-2]).to(self.device)
        masked_image = image * (mask < 0.5)
        strength = 1.0 if request.strength is None else request.strength
        nine_channel = self.dir.info.inpaint
        image_latents = None
        if not nine_channel or strength < 1.0:
            image_latents = self._encode_image(image, generator).repeat(n, 1, 1, 1)
        noise = self._randn(shape, generator)
        if strength >= 1.0:
            x = samplers.initial_latents(noise, schedule)
        else:
            x = image_latents + noise * float(schedule.sigmas[0])
        latent_mask = torch.nn.functional.interpolate(mask, size=(h, w)).repeat(n, 1, 1, 1)
        masked_latents = self._encode_image(masked_image, generator).repeat(n, 1, 1, 1)
        if nine_channel:
            extra = guidance.batch(torch.cat([latent_mask, masked_latents], dim=1))
            return _Prepared(x, **common, extra_channels=extra)
        return _Prepared(x, **common, blend=(latent_mask, image_latents, noise))

    def _window(self, request: Request, schedule) -> tuple[int, int]:
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
