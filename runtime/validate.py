"""The one validation of a Request against a model and the Limits: typed `Job` out, or InvalidRequest(field, …).

Every interface (CLI, HTTP, Triton, Python) calls this once and phrases `field` its own way; messages say what
was wrong and what would be right, and never name CLI flags.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

from PIL import Image

from sdrt.runtime.conditioning import controlnet, ip_adapter, t2i_adapter
from sdrt.runtime.lora import adapters as lora
from sdrt.runtime.tasks import outpaint as outpaint_mod, unclip, upscale
from sdrt.runtime.prompts import encode as prompt_encode
from sdrt.runtime.samplers import registry as sampler_registry
from sdrt.runtime import fields
from sdrt.runtime.fields import MAX_GUIDANCE, MAX_SEED, InvalidRequest
from sdrt.runtime.job import TINY_VAE, Job
from sdrt.runtime.family import Family
from sdrt.runtime.limits import GIB, Limits, estimate_bytes, memory_budget
from sdrt.runtime.request import Request
from sdrt.runtime.denoiser.x0 import timestep_lookup
from sdrt.runtime.samplers.schedules import SIGMA_SCHEDULES, ScheduleError, SchedulerConfig
from sdrt.runtime.vae_tiling import Tiles

def _sampler(sampling, model_dir) -> tuple[str, str]:
    schedule = sampling.schedule
    if schedule is not None and schedule not in SIGMA_SCHEDULES:
        raise InvalidRequest("schedule", f"unknown schedule {schedule!r}; choose one of {', '.join(SIGMA_SCHEDULES)}")
    if sampling.sampler is None:
        name, implied = sampler_registry.default_for(model_dir.scheduler_config), None
    else:
        if not isinstance(sampling.sampler, str):
            raise InvalidRequest("sampler", f"must be a sampler name, not {sampling.sampler!r}")
        try:
            name, implied = sampler_registry.resolve(sampling.sampler)
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
VAE_CHOICES = ("full", "tiny")
TILING_CHOICES = ("auto", "on", "off")


def _vae(request: Request, model_dir) -> str:
    vae = request.decode.vae
    if vae not in VAE_CHOICES:
        raise InvalidRequest("vae", f"must be one of {', '.join(VAE_CHOICES)} (got {vae!r})")
    if vae == "tiny":
        has = [n for n in ("vae_decoder", "vae_encoder", *TINY_VAE.values())
               if (model_dir.path / n / "model.onnx").exists()]
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
        missing = [n for n in STEP_CACHE if not (model_dir.path / n / "model.onnx").exists()]
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
    request, overlay = _outpaint(request, model_dir, limits)
    request, low_res, noise_level = _upscale(request, model_dir, limits)
    depth_map = _depth(request, model_dir)
    request, variation_image, unclip_level = _unclip(request, model_dir)
    noise_level = unclip_level if variation_image is not None else noise_level
    p, s, images, refine = request.prompt_group, request.sampling, request.images, request.refine
    prompts = fields.texts("prompt", p.text)
    negative = None if p.negative is None else fields.texts("negative_prompt", p.negative)
    if negative is not None and len(negative) not in (1, len(prompts)):
        raise InvalidRequest("negative_prompt", f"give one negative prompt or one per prompt ({len(prompts)}), "
                                                f"not {len(negative)}")
    if negative is not None and len(negative) == 1 and len(prompts) > 1:
        negative = negative * len(prompts)
    prompts, negative, loras = lora.request_loras(request, prompts, negative, model_dir, lora_dir)  # <lora:…> out
    prompts, negative = _hypernet_tags(prompts, negative, model_dir)  # <hypernet:…> out

    batch = fields.integer("batch", request.size.batch, 1, limits.max_batch)
    count = len(prompts) * batch
    if count > limits.max_batch:
        raise InvalidRequest("batch", f"{len(prompts)} prompts × {batch} images = {count} images; at most "
                                      f"{limits.max_batch} per request")
    guidance = fields.number("guidance", s.guidance, 0.0, MAX_GUIDANCE)
    rescale = fields.number("guidance_rescale", s.guidance_rescale, 0.0, 1.0)
    sampler, schedule = _sampler(s, model_dir)
    for name in ("timestep_spacing", "prediction_type"):
        if getattr(s, name) is not None and not isinstance(getattr(s, name), str):
            raise InvalidRequest(name, f"must be a string, not {getattr(s, name)!r}")
    config = dict(model_dir.scheduler_config)
    if s.timestep_spacing:
        config["timestep_spacing"] = s.timestep_spacing
    if s.prediction_type:
        config["prediction_type"] = s.prediction_type
    try:
        cfg = SchedulerConfig.from_diffusers_json(config)
    except ScheduleError as e:
        raise InvalidRequest("timestep_spacing" if "spacing" in str(e) else "prediction_type", str(e)) from None
    ceiling = min(limits.max_steps, sampler_registry.max_steps(cfg, sampler))
    steps = fields.integer("steps", s.steps, 1, ceiling,
                 f"; {sampler} on this model's schedule runs at most {ceiling} steps (its training timesteps "
                 "or the configured limit)")
    try:
        built = sampler_registry.build_schedule(cfg, sampler, steps, schedule)
    except ScheduleError as e:
        raise InvalidRequest("sampler", str(e)) from None
    try:  # many steps can round two timesteps onto one float32 sigma, which the denoiser cannot tell apart
        timestep_lookup(built)
    except ScheduleError:
        raise InvalidRequest("steps", f"{steps} steps of {sampler} on this model's schedule put two timesteps on "
                                      "one sigma (float32); use fewer steps") from None

    width, height = _size(request, model_dir)
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
    controls = controlnet.validate_controls(request.control, model_dir, loras)
    image_prompt = ip_adapter.validate_image_prompt(request.image_prompt, model_dir, loras, controls)
    adapter = t2i_adapter.validate_adapter(request.t2i, model_dir, width, height,
                                           controls is not None or image_prompt is not None, loras)
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
    if cache_interval > 1 and (controls is not None or image_prompt is not None or adapter is not None):
        raise InvalidRequest("cache_interval", "step caching's graphs take no ControlNet, IP-Adapter or T2I-Adapter "
                                               "inputs; use 1 (off) with them")
    return Job(prompt=prompts, negative_prompt=negative, steps=steps, guidance=guidance, guidance_rescale=rescale,
               sampler=sampler, schedule=schedule, timestep_spacing=s.timestep_spacing,
               prediction_type=s.prediction_type, width=width, height=height, images_per_prompt=batch, seeds=seeds,
               init_image=init_image, strength=strength, mask=mask, init_latents=refine.init_latents,
               denoising_start=starts[0], denoising_end=starts[1], aesthetic_score=aesthetic,
               negative_aesthetic_score=negative_aesthetic, estimated_bytes=estimate, syntax=text.syntax,
               clip_skip=text.clip_skip, text_chunks=text.chunks, embeddings=text.embeddings, loras=loras,
               vae=vae, tile_vae=tile_vae, cache_interval=cache_interval,
               overlay=overlay, low_res_image=low_res, noise_level=noise_level, depth_map=depth_map,
               variation_image=variation_image, controls=controls, image_prompt=image_prompt,
               t2i_adapter=adapter)


def _unclip(request: Request, model_dir) -> tuple[Request, Image.Image | None, int | None]:
    """For unCLIP image variations: the image to vary (taken out of init_image: the size is the model's unless
    given, as diffusers) and the embedding's noise level."""
    images = request.images
    if not model_dir.info.unclip:
        return request, None, None
    image = fields.image("init_image", images.init_image, "RGB")
    if image is None:
        raise InvalidRequest("init_image", "this is an unCLIP model: give the image to make variations of")
    for name in ("mask", "strength"):
        if getattr(images, name) is not None:
            raise InvalidRequest(name, "unCLIP variations take no " + ("mask" if name == "mask" else
                                       "strength (they start from noise; the image enters as an embedding)"))
    top = unclip.EmbeddingNoise.levels(model_dir.path)
    level = unclip.DEFAULT_NOISE_LEVEL if images.noise_level is None else \
        fields.integer("noise_level", images.noise_level, 0, top, " (the image-noising scheduler's last timestep)")
    return replace(request, images=replace(images, init_image=None, noise_level=None)), image, level


def _depth(request: Request, model_dir) -> Image.Image | None:
    """Depth-to-image's inputs: an init image, no mask, and a depth map or the exported estimator."""
    images, info = request.images, model_dir.info
    if not info.depth:
        if images.depth_map is not None:
            raise InvalidRequest("depth_map", f"applies to depth-to-image models only; this is a "
                                              f"{info.family.value} model ({info.pipeline_class})")
        return None
    if images.init_image is None:
        raise InvalidRequest("init_image", "this is a depth-to-image model: give the image to start from")
    if images.mask is not None:
        raise InvalidRequest("mask", "depth-to-image models take no mask")
    depth = fields.image("depth_map", images.depth_map, "F")
    if depth is None and not (model_dir.path / "depth_estimator" / "model.onnx").exists():
        raise InvalidRequest("depth_map", "is needed: this engine directory has no depth_estimator (export it, "
                                          "or give a depth map)")
    if depth is not None:
        lo, hi = depth.getextrema()
        if lo == hi:
            raise InvalidRequest("depth_map", "is constant; give a map with some depth in it")
    return depth


def _upscale(request: Request, model_dir, limits: Limits) -> tuple[Request, Image.Image | None, int | None]:
    """For the ×4 upscaler: its low-resolution image (taken out of init_image, so nothing treats the request as
    img2img), the output size (4× that image) and the noise level; other models refuse a noise level."""
    images, info = request.images, model_dir.info
    if not info.upscaler:
        if images.noise_level is not None and not info.unclip:
            raise InvalidRequest("noise_level", f"applies to the ×4 upscaler and unCLIP variations only; this is a "
                                                f"{info.family.value} model ({info.pipeline_class})")
        return request, None, None
    image = fields.image("init_image", images.init_image, "RGB")
    if image is None:
        raise InvalidRequest("init_image", "this is a ×4 upscaler: give the low-resolution image to upscale")
    for name in ("mask", "strength"):
        if getattr(images, name) is not None:
            raise InvalidRequest(name, "the ×4 upscaler takes no " + ("mask" if name == "mask" else
                                       "strength (it always starts from noise at the low-resolution size)"))
    size = request.size
    if size.width is not None or size.height is not None:
        raise InvalidRequest("width" if size.width is not None else "height",
                             "is 4× the low-resolution image's for the ×4 upscaler; leave it out")
    noise = upscale.LowResNoise.of(model_dir)
    level = upscale.DEFAULT_NOISE_LEVEL if images.noise_level is None else \
        fields.integer("noise_level", images.noise_level, 0, noise.max_noise_level,
             " (the model's max_noise_level, within its low-resolution scheduler's timesteps)")
    f = model_dir.vae_scale_factor
    low = upscale.low_res_image(image, f)
    width, height = low.width * f, low.height * f
    if width * height > limits.max_pixels:
        raise InvalidRequest("init_image", f"is {image.width}x{image.height}; upscaled ×{f} it would be {width}x"
                                           f"{height} = {width * height:,} pixels, more than {limits.max_pixels:,} "
                                           "(Limits.max_pixels); give a smaller image")
    request = replace(request, images=replace(images, init_image=None, noise_level=None),
                      size=replace(size, width=width, height=height))
    return request, low, level


def _outpaint(request: Request, model_dir, limits: Limits) -> tuple[Request, tuple | None]:
    """An outpainting request as the inpainting request it is (padded init image, mask, canvas size), and the
    soft border's overlay (runtime/tasks/outpaint.py); other requests unchanged."""
    images = request.images
    if images.outpaint is None:
        return request, None
    try:
        spec = outpaint_mod.parse(images.outpaint)
    except outpaint_mod.OutpaintError as e:
        raise InvalidRequest("outpaint", str(e)) from None
    init = fields.image("init_image", images.init_image, "RGB")
    if init is None:
        raise InvalidRequest("outpaint", "needs an init image to extend")
    if images.mask is not None:
        raise InvalidRequest("mask", "outpainting builds its own mask; give a mask or outpaint margins, not both")
    size = request.size
    if size.width is not None or size.height is not None:
        raise InvalidRequest("width" if size.width is not None else "height",
                             "is set by the outpaint margins (init image plus margins); leave it out")
    width, height = spec.canvas(*init.size)
    multiple = model_dir.vae_scale_factor * model_dir.latent_multiple
    if width % multiple or height % multiple:
        raise InvalidRequest("outpaint", f"the extended canvas is {width}x{height}, not a multiple of {multiple} "
                                         f"for this model; the init image is {init.width}x{init.height}: crop or "
                                         f"resize it to a multiple of {multiple} first")
    if width * height > limits.max_pixels:
        raise InvalidRequest("outpaint", f"the extended canvas {width}x{height} is {width * height:,} pixels; at "
                                         f"most {limits.max_pixels:,} per image (Limits.max_pixels)")
    seed = fields.integer("seed", request.seeds.seed)
    if seed == -1:  # resolved here: the noise fill and the generation use the same seed
        seed = secrets.randbelow(MAX_SEED - limits.max_batch + 2)
        request = replace(request, seeds=replace(request.seeds, seed=seed))
    seed = fields.seeds(seed, 1)[0]  # range checked
    try:
        out = outpaint_mod.outpaint(init, spec, seed)
    except outpaint_mod.OutpaintError as e:
        raise InvalidRequest("outpaint", str(e)) from None
    request = replace(request, images=replace(images, init_image=out.image, mask=out.mask, outpaint=None),
                      size=replace(size, width=width, height=height))
    return request, None if out.soft is None else (out.image, out.soft)
