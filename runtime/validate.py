"""The one validation of a Request against a model and the Limits: typed `Job` out, or InvalidRequest(field, …).

Every interface (CLI, HTTP, Triton, Python) calls this once and phrases `field` its own way; messages say what
was wrong and what would be right, and never name CLI flags.
"""

from __future__ import annotations

from dataclasses import replace

from PIL import Image

from sdrt.runtime.conditioning import kinds
from sdrt.runtime.lora import refs as lora_refs
from sdrt.runtime.tasks import table as tasks
from sdrt.runtime.prompts import encode as prompt_encode
from sdrt.runtime.samplers import registry as sampler_registry
from sdrt.runtime import fields
from sdrt.runtime.fields import MAX_GUIDANCE, InvalidRequest
from sdrt.runtime.job import TINY_VAE, Job
from sdrt.runtime.family import Family
from sdrt.runtime.limits import GIB, Limits, estimate_bytes, memory_budget
from sdrt.runtime.request import Request
from sdrt.runtime.denoiser import flux
from sdrt.runtime.denoiser.x0 import timestep_lookup
from sdrt.runtime.samplers import flow
from sdrt.runtime.samplers.schedules import SIGMA_SCHEDULES, ScheduleError, scheduler_config
from sdrt.runtime.vae_tiling import Tiles

def _sampler(sampling, model_dir) -> tuple[str, str]:
    schedule = sampling.schedule
    if schedule is not None and schedule not in SIGMA_SCHEDULES:
        raise InvalidRequest("schedule", f"unknown schedule {schedule!r}; choose one of {', '.join(SIGMA_SCHEDULES)}")
    if sampling.sampler is None:
        try:
            return sampler_registry.for_model(None, model_dir.scheduler_config), schedule or "default"
        except ScheduleError as e:
            raise InvalidRequest("sampler", str(e)) from None
    else:
        if not isinstance(sampling.sampler, str):
            raise InvalidRequest("sampler", f"must be a sampler name, not {sampling.sampler!r}")
        try:
            name, implied = sampler_registry.resolve(sampling.sampler)
            name = sampler_registry.for_model(name, model_dir.scheduler_config)
        except ScheduleError as e:
            raise InvalidRequest("sampler", str(e)) from None
    if implied is not None and schedule not in (None, "default", implied):
        raise InvalidRequest("schedule", f"{sampling.sampler!r} already selects the {implied} schedule; "
                                         f"drop the schedule or choose the sampler's plain name")
    return name, schedule or implied or "default"


def _size(request: Request, model_dir) -> tuple[int, int]:
    size = request.size
    scale = model_dir.vae_scale_factor
    multiple = scale * model_dir.latent_multiple
    width = None if size.width is None else fields.integer("width", size.width, 1)
    height = None if size.height is None else fields.integer("height", size.height, 1)
    latents = request.refine.init_latents
    if latents is not None:
        return latents.shape[-1] * scale, latents.shape[-2] * scale
    init = request.images.init_image
    if isinstance(init, Image.Image) and (width is None or height is None):
        w, h = init.size
        width, height = width or max(w // multiple * multiple, multiple), height or max(h // multiple * multiple, multiple)
    width, height = width or model_dir.default_size, height or model_dir.default_size
    for name, v in (("width", width), ("height", height)):
        if v % multiple:
            lower, upper = v // multiple * multiple, (v // multiple + 1) * multiple
            raise InvalidRequest(name, f"must be a multiple of {multiple} for this model (got {v}; "
                                       f"{lower or upper} or {upper} would do)")
    return width, height


def _hypernet_tags(prompts, negative, model_dir):
    from sdrt.runtime.prompts.tags import TagError, check_hypernet_tags

    baked = (getattr(model_dir, "manifest", None) or {}).get("hypernetworks") or []
    try:
        prompts = check_hypernet_tags(prompts, baked)
    except TagError as e:
        raise InvalidRequest("prompt", str(e)) from None
    try:
        negative = None if negative is None else check_hypernet_tags(negative, baked)
    except TagError as e:
        raise InvalidRequest("negative_prompt", str(e)) from None
    return prompts, negative
def _flux_request(request: Request, negative, model_dir) -> None:
    """What FLUX.1 runs in sdrt: text to image, image to image and inpainting (FluxImg2ImgPipeline,
    FluxInpaintPipeline: runtime/tasks/img2img.py, inpaint.py), without a negative prompt (FluxPipeline ignores one
    unless true_cfg_scale > 1, which sdrt does not run) or a refiner hand-off."""
    if model_dir.info.family != Family.FLUX:
        return
    if request.refine.init_latents is not None:
        raise InvalidRequest("init_latents", "FLUX.1 runs text to image, image to image and inpainting in sdrt "
                                             "(init_image, mask); leave it out")
    if negative is not None and any(negative):
        raise InvalidRequest("negative_prompt", "FLUX.1 takes no negative prompt (it is guidance-distilled, or "
                                                "has no guidance); leave it out or empty")


def _sd3_request(request: Request, model_dir) -> None:
    """What SD3 / SD3.5 run in sdrt: text to image, image to image and inpainting (StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline; the flow noising is runtime/tasks/img2img.py's), no refiner hand-off."""
    if model_dir.info.family != Family.SD3:
        return
    if request.refine.init_latents is not None:
        raise InvalidRequest("init_latents", "SD3 / SD3.5 run text to image, image to image and inpainting in sdrt "
                                             "(init_image, mask); leave it out")


def _flux_schedule(cfg, model_dir, width: int, height: int):
    """FluxPipeline's schedule inputs: sigmas linspace(1, 1/N, N) and, with dynamic shifting, mu at the packed
    image sequence length (h/2)·(w/2) in latents (runtime/samplers/flow.py, runtime/denoiser/flux.py)."""
    if model_dir.info.family != Family.FLUX:
        return cfg
    mu = flow.image_seq_mu(cfg, flux.sequence_length(height, width, model_dir.vae_scale_factor)) \
        if cfg.use_dynamic_shifting else None
    return replace(cfg, pipeline_sigmas=True, mu=mu)


VAE_CHOICES = ("full", "tiny")
TILING_CHOICES = ("auto", "on", "off")


def _vae(request: Request, model_dir) -> str:
    vae = request.decode.vae
    if vae not in VAE_CHOICES:
        raise InvalidRequest("vae", f"must be one of {', '.join(VAE_CHOICES)} (got {vae!r})")
    if vae == "tiny":
        has = [n for n in ("vae_decoder", "vae_encoder", *TINY_VAE.values())
               if model_dir.has(n)]
        needs = [TINY_VAE["decode"]] + ([TINY_VAE["encode"]] if request.images.init_image is not None else [])
        missing = [n for n in needs if n not in has]
        if missing:
            raise InvalidRequest("vae", f"is tiny, but this engine directory has no {' or '.join(missing)} (it has "
                                        f"{', '.join(has) or 'no VAE'}); re-export the model with a tiny VAE "
                                        "(a diffusers AutoencoderTiny folder) or use the full VAE")
    return vae


STEP_CACHE = ("unet_deepcache", "unet_deepcache_shallow")  # export/extras/deepcache.py


def _cache_interval(value, model_dir, loras) -> int:
    interval = fields.integer("cache_interval", value, 1, 1000)
    if interval > 1:
        missing = [n for n in STEP_CACHE if not model_dir.has(n)]
        if missing:
            raise InvalidRequest("cache_interval", f"step caching needs {' and '.join(missing)} in the engine "
                                                   "directory; re-export the model with the step-caching graphs, "
                                                   "or use 1 (off)")
        if loras:
            raise InvalidRequest("cache_interval", "step caching's graphs carry no LoRA weights; drop the LoRAs "
                                                   "or use 1 (off)")
    return interval


def validate(request: Request, model_dir, limits: Limits = Limits(), lora_dir=None,
             embeddings_dir=None, embeddings=()) -> Job:
    """Check every field of `request` for the model in `model_dir` (runtime/loader.EngineDir) and the limits."""
    if not isinstance(request, Request):
        raise InvalidRequest("request", f"must be a Request, not {type(request).__name__}")
    task_fields = {}  # what the tasks' own checks resolve (outpaint's overlay, the upscaler's image, …)
    for task in tasks.VALIDATING:
        request, found = task.validate(request, model_dir, limits)
        task_fields.update(found)
    p, s, images, refine = request.prompt_group, request.sampling, request.images, request.refine
    prompts = fields.texts("prompt", p.text)
    negative = None if p.negative is None else fields.texts("negative_prompt", p.negative)
    if negative is not None and len(negative) not in (1, len(prompts)):
        raise InvalidRequest("negative_prompt", f"give one negative prompt or one per prompt ({len(prompts)}), "
                                                f"not {len(negative)}")
    if negative is not None and len(negative) == 1 and len(prompts) > 1:
        negative = negative * len(prompts)
    prompts, negative, loras = lora_refs.request_loras(request, prompts, negative, model_dir, lora_dir)  # <lora:…> out
    prompts, negative = _hypernet_tags(prompts, negative, model_dir)  # <hypernet:…> out

    batch = fields.integer("batch", request.size.batch, 1, limits.max_batch)
    count = len(prompts) * batch
    if count > limits.max_batch:
        raise InvalidRequest("batch", f"{len(prompts)} prompts × {batch} images = {count} images; at most "
                                      f"{limits.max_batch} per request")
    guidance = fields.number("guidance", s.guidance, 0.0, MAX_GUIDANCE)
    rescale = fields.number("guidance_rescale", s.guidance_rescale, 0.0, 1.0)
    _flux_request(request, negative, model_dir)
    _sd3_request(request, model_dir)
    width, height = _size(request, model_dir)  # before the schedule: FLUX.1's shift depends on the size
    sampler, schedule = _sampler(s, model_dir)
    for name in ("timestep_spacing", "prediction_type"):
        if getattr(s, name) is not None and not isinstance(getattr(s, name), str):
            raise InvalidRequest(name, f"must be a string, not {getattr(s, name)!r}")
    try:
        cfg = scheduler_config(model_dir.scheduler_config, s.timestep_spacing, s.prediction_type)
    except ScheduleError as e:
        raise InvalidRequest("timestep_spacing" if "spacing" in str(e) else "prediction_type", str(e)) from None
    cfg = _flux_schedule(cfg, model_dir, width, height)
    ceiling = min(limits.max_steps, sampler_registry.max_steps(cfg, sampler))
    steps = fields.integer("steps", s.steps, 1, ceiling,
                 f"; {sampler} on this model's schedule runs at most {ceiling} steps (its training timesteps "
                 "or the configured limit)")
    try:
        built = sampler_registry.build_schedule(cfg, sampler, steps, schedule)
    except ScheduleError as e:
        own = "" if s.sampler is not None else \
            f"this model's own scheduler ({model_dir.scheduler_config.get('_class_name')}, sdrt's {sampler}): "
        raise InvalidRequest("sampler", own + str(e)) from None
    try:  # many steps can round two timesteps onto one float32 sigma, which the denoiser cannot tell apart
        timestep_lookup(built)
    except ScheduleError:
        raise InvalidRequest("steps", f"{steps} steps of {sampler} on this model's schedule put two timesteps on "
                                      "one sigma (float32); use fewer steps") from None

    if width * height > limits.max_pixels:
        raise InvalidRequest("width", f"{width}x{height} is {width * height:,} pixels; at most "
                                      f"{limits.max_pixels:,} per image (Limits.max_pixels)")
    seeds = fields.seeds(request.seeds.seed, count)
    text = prompt_encode.validate_text(p, model_dir, prompts, negative, embeddings_dir, embeddings)

    init_image = fields.image("init_image", images.init_image, "RGB")
    mask = fields.image("mask", images.mask, "L")
    strength = None if images.strength is None else fields.number("strength", images.strength, 0.0, 1.0, lo_open=True)
    if mask is not None and init_image is None:
        raise InvalidRequest("mask", "needs an init image to inpaint")
    info = model_dir.info
    if info.family == Family.SDXL_REFINER and init_image is None and refine.init_latents is None:
        raise InvalidRequest("init_image", "the SDXL refiner refines an image: give an init image, or use it "
                                           "after a base")
    if info.inpaint and mask is None:
        raise InvalidRequest("mask", "this is an inpainting model: give an init image and a mask")
    starts = [None if v is None else fields.number(n, v, 0.0, 1.0, lo_open=True)
              for n, v in (("denoising_start", refine.denoising_start), ("denoising_end", refine.denoising_end))]
    for name, v in zip(("denoising_start", "denoising_end"), starts):
        if v is not None and v >= 1.0:
            raise InvalidRequest(name, f"must be below 1 (got {v:g})")
        if v is not None and built.sigma_data is not None:  # diffusers' cut compares c_noise with 1000·(1 - v)
            raise InvalidRequest(name, "an EDM model's timesteps are 0.25·ln(sigma), not training steps: the "
                                       "base/refiner hand-off does not apply to it")
    kind_uses = {}  # the conditioning kinds the request uses: NAME → its validated inputs
    for kind in kinds.KINDS:
        use = kind.validate(request, model_dir, kinds.Context(width, height, loras, dict(kind_uses)))
        if use is not None:
            kind_uses[kind.NAME] = use
    loras += tuple(r for use in kind_uses.values() for r in getattr(use, "loras", ()))  # a kind's own (PhotoMaker's)
    aesthetic = fields.number("aesthetic_score", refine.aesthetic_score)
    negative_aesthetic = fields.number("negative_aesthetic_score", refine.negative_aesthetic_score)

    cache_interval = _cache_interval(s.cache_interval, model_dir, loras)
    vae = _vae(request, model_dir)
    tiling = request.decode.vae_tiling
    if tiling not in TILING_CHOICES:
        raise InvalidRequest("vae_tiling", f"must be one of {', '.join(TILING_CHOICES)} (got {tiling!r})")
    if tiling == "on" and vae == "tiny":
        raise InvalidRequest("vae_tiling", "tiles the full VAE; the tiny VAE decodes whole images (use auto or off)")

    unet_batch = count * (2 if guidance > 1.0 else 1)
    estimate_args = (model_dir.unet_config, model_dir.vae_config, count, unet_batch, height, width,
                     model_dir.vae_scale_factor)
    tile = Tiles.of_vae(model_dir.vae_config).latent_size
    tiled_estimate = estimate_bytes(*estimate_args, vae_tile=tile)
    estimate = tiled_estimate if tiling == "on" else estimate_bytes(*estimate_args)
    budget = memory_budget(limits)
    tile_vae = tiling == "on"
    if tiling == "auto" and vae == "full" and budget is not None and estimate > budget >= tiled_estimate:
        estimate, tile_vae = tiled_estimate, True  # what diffusers' enable_tiling() is for
    if budget is not None and estimate > budget:
        tiled = " even with the VAE tiled" if tiling != "off" and vae == "full" else ""
        raise InvalidRequest("width", f"{count} image(s) of {width}x{height} need an estimated "
                                      f"{estimate / GIB:,.1f} GiB (attention and VAE buffers){tiled}, more than the "
                                      f"{budget / GIB:,.1f} GiB this machine allows a request; lower the size "
                                      "or the batch")
    if cache_interval > 1 and kind_uses:
        raise InvalidRequest("cache_interval", "step caching's graphs take no ControlNet, IP-Adapter or T2I-Adapter "
                                               "inputs; use 1 (off) with them")
    job = Job(prompt=prompts, negative_prompt=negative, steps=steps, guidance=guidance, guidance_rescale=rescale,
               sampler=sampler, schedule=schedule, timestep_spacing=s.timestep_spacing,
               prediction_type=s.prediction_type, width=width, height=height, images_per_prompt=batch, seeds=seeds,
               init_image=init_image, strength=strength, mask=mask, init_latents=refine.init_latents,
               denoising_start=starts[0], denoising_end=starts[1], aesthetic_score=aesthetic,
               negative_aesthetic_score=negative_aesthetic, estimated_bytes=estimate, syntax=text.syntax,
               clip_skip=text.clip_skip, text_chunks=text.chunks, embeddings=text.embeddings, loras=loras,
               max_sequence_length=text.max_sequence_length,
               vae=vae, tile_vae=tile_vae, cache_interval=cache_interval,
               **{kind.FIELD: kind_uses.get(kind.NAME) for kind in kinds.KINDS}, **task_fields,
               scheduler_config=cfg, full_schedule=built, uses=tuple(kind_uses))
    return replace(job, task=tasks.task_for(job, model_dir).NAME)


