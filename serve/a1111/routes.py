"""The AUTOMATIC1111 dialect's routes: `/sdapi/v1` (txt2img, img2img, progress, extras, and what the server can do)
and the ControlNet extension's `/controlnet` lists. The bodies become Plans in serve/a1111/fields.py (ControlNet
units: serve/a1111/controlnet.py); progress, interrupt and skip are serve/a1111/progress.py.

AUTOMATIC1111 (`POST /sdapi/v1/txt2img`, `/sdapi/v1/img2img`): the fields sdrt uses are in `A1111_USED`; the
fields A1111 clients send with neutral defaults are in `a1111_neutral()`, each accepted only with a value whose
behaviour sdrt already has (e.g. `restore_faces: false`) and refused with 422 naming it otherwise (e.g.
`restore_faces: true`); any other field is refused as unknown. `n_iter` > 1 runs several batches whose seeds
continue (A1111: image i of the whole request has seed + i). Omitted fields take A1111's defaults (steps 50,
cfg_scale 7, sampler "Euler", denoising_strength 0.75, seed -1) except the size, which is the model's default size
(A1111 always defaults to 512). An omitted `negative_prompt` means the model's default negative conditioning
(for SDXL: zeroed, as diffusers), not "".
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from sdrt.runtime import image_io
from sdrt.runtime.lora import refs as lora_refs
from sdrt.runtime.samplers import registry as sampler_registry
from sdrt.serve import fields, jobs
from sdrt.serve.a1111.controlnet import model_list, module_list
from sdrt.serve.a1111.fields import A1111_SCHEDULERS, a1111_neutral, a1111_plan
from sdrt.serve.a1111.progress import Progress
from sdrt.serve.edge import ServerState
from sdrt.serve.errors import invalid
from sdrt.serve.fields import Plan

__all__ = ["a1111_response", "a1111_samplers", "a1111_schedulers", "add_routes"]

# ---- the answers ---------------------------------------------------------------------------------------------

def _version() -> str:
    try:
        from importlib.metadata import version

        return f"sdrt {version('sdrt')}"
    except Exception:  # not installed: running from a checkout
        return "sdrt"


VERSION = _version()
# sdrt's schedule names → A1111's "Schedule type" labels ("default": what the sampler implies, A1111's Automatic)
SCHEDULE_LABELS = {"default": "Automatic", "karras": "Karras", "exponential": "Exponential",
                   "sgm_uniform": "SGM Uniform", "simple": "Simple", "beta": "Beta"}
_FILL_LABELS = {"fill": "fill", "latent_noise": "latent noise", "latent_nothing": "latent nothing"}


def extra_generation_params(plan: Plan) -> dict:
    """A1111's extra_generation_params of an inpainting request (processing.py img2img init)."""
    spec = plan.requests[0].images.inpaint if plan.requests else None
    if not isinstance(spec, dict):
        return {}
    out = {}
    bx, by = spec["mask_blur"]
    if bx > 0 or by > 0:
        out["Mask blur"] = bx if bx == by else None
    if spec["invert"]:
        out["Mask mode"] = "Inpaint not masked"
    if spec["only_masked"]:
        out |= {"Inpaint area": "Only masked", "Masked area padding": spec["padding"]}
    if spec["fill"] in _FILL_LABELS:
        out["Masked content"] = _FILL_LABELS[spec["fill"]]
    return out


def infotext(job, index: int, seed: int, model_name: str, model_hash: str | None, extra: dict) -> str:
    """The `parameters` text as A1111's create_infotext writes it (its key order; values sdrt has)."""
    row = index // job.images_per_prompt
    lines = [job.prompt[row]]
    negative = (job.negative_prompt or ("",) * len(job.prompt))[row]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    spec = sampler_registry.get(job.sampler)
    params = {"Steps": job.steps, "Sampler": spec.a1111[0] if spec.a1111 else spec.name,
              "Schedule type": SCHEDULE_LABELS.get(job.schedule, job.schedule), "CFG scale": f"{job.guidance:g}",
              "Seed": seed, "Size": f"{job.width}x{job.height}", "Model hash": model_hash, "Model": model_name,
              "Denoising strength": None if job.init_image is None else
              (job.strength if job.strength is not None else 1.0 if job.mask is not None else 0.8),
              **extra, "Version": VERSION}
    lines.append(", ".join(f"{k}: {v}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def encode(plan: Plan, results, model_name: str, model_hash: str | None) -> list[list[bytes]]:
    """Each result's images as PNG bytes with A1111's infotext (CPU work: run it off the event loop)."""
    if not plan.send_images:
        return [[] for _ in results]
    extra = extra_generation_params(plan)
    return [[image_io.image_bytes(image, infotext(r.job, i, r.seeds[i], model_name, model_hash, extra),
                                  plan.output_format, plan.quality)
             for i, image in enumerate(r.images)] for r in results]


def a1111_response(plan: Plan, results, encoded: list[list[bytes]], model_name: str,
                   model_hash: str | None = None, inpainting_model: bool = False) -> dict:
    jobs = [r.job for r in results]
    first = jobs[0]
    seeds = [s for r in results for s in r.seeds]
    prompts = [p for j in jobs for p in j.prompt for _ in range(j.images_per_prompt)]
    negatives = [n for j in jobs for n in (j.negative_prompt or ("",) * len(j.prompt))
                 for _ in range(j.images_per_prompt)]
    extra = extra_generation_params(plan)
    infotexts = [infotext(r.job, i, r.seeds[i], model_name, model_hash, extra)
                 for r in results for i in range(len(r.images))]
    spec = sampler_registry.get(first.sampler)
    strength = first.strength if first.init_image is None or first.strength is not None else \
        (1.0 if first.mask is not None else 0.8)
    info = {
        "prompt": prompts[0], "all_prompts": prompts, "negative_prompt": negatives[0],
        "all_negative_prompts": negatives, "seed": seeds[0], "all_seeds": seeds, "subseed": -1,
        "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": first.width, "height": first.height,
        "sampler_name": spec.a1111[0] if spec.a1111 else spec.name,
        "scheduler": SCHEDULE_LABELS.get(first.schedule, first.schedule), "cfg_scale": first.guidance,
        "steps": first.steps, "batch_size": first.count, "n_iter": len(jobs), "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model_name, "sd_model_hash": model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": strength, "extra_generation_params": extra, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": first.mask is not None and inpainting_model,
        "version": VERSION,
    }
    images = [base64.b64encode(data).decode("ascii") for per in encoded for data in per] if plan.send_images else []
    return {"images": images, "parameters": plan.echo, "info": json.dumps(info)}


def a1111_samplers() -> list[dict]:
    """GET /sdapi/v1/samplers: every name `sampler_name` takes (A1111's, with schedule suffixes, and sdrt's)."""
    out = []
    for spec in sampler_registry.REGISTRY.values():
        names = sampler_registry.display_names(spec) or (spec.name,)
        for name in names:
            schedule = next((s for s in ("karras", "exponential") if name.lower().endswith(" " + s)), None)
            out.append({"name": name, "aliases": [spec.name] if name in spec.a1111 or name == spec.name else [],
                        "options": {"scheduler": schedule} if schedule else {}})
    return out


def a1111_schedulers() -> list[dict]:
    labels = {"automatic": "Automatic", "karras": "Karras", "exponential": "Exponential",
              "sgm uniform": "SGM Uniform", "simple": "Simple", "beta": "Beta"}
    return [{"name": (A1111_SCHEDULERS[k] or "automatic"), "label": label, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for k, label in labels.items()]


# ---- the routes ----------------------------------------------------------------------------------------------

def _a1111_schema(img2img: bool) -> dict:
    props = {"prompt": {"type": "string"}, "negative_prompt": {"type": "string"},
             "seed": {"type": "integer", "default": -1}, "sampler_name": {"type": "string", "default": "Euler"},
             "sampler_index": {"type": "string"}, "scheduler": {"type": "string", "default": "Automatic"},
             "batch_size": {"type": "integer", "default": 1}, "n_iter": {"type": "integer", "default": 1},
             "steps": {"type": "integer", "default": 50}, "cfg_scale": {"type": "number", "default": 7.0},
             "width": {"type": "integer"}, "height": {"type": "integer"},
             "send_images": {"type": "boolean", "default": True}}
    if img2img:
        props |= {"init_images": {"type": "array", "items": {"type": "string"}, "maxItems": 1, "minItems": 1},
                  "denoising_strength": {"type": "number", "default": 0.75}, "mask": {"type": "string"},
                  "inpainting_mask_invert": {"type": "integer", "enum": [0, 1]},
                  "include_init_images": {"type": "boolean"},
                  "outpaint": {"type": "object", "description": "sdrt extension: extend the canvas by these margins "
                               "(pixels, multiples of 8) and inpaint the new area; inpainting_fill 0/1/2 picks the "
                               "fill (blur/edge/noise), mask_blur the soft border",
                               "properties": {k: {"type": "integer", "default": 0}
                                              for k in ("left", "right", "top", "bottom")}}}
    return {"type": "object", "properties": props, "additionalProperties": True}


def _neutral_doc(img2img: bool) -> str:
    rows = "\n".join(f"- `{k}`: {n.accepts}" for k, n in a1111_neutral("MODEL", img2img).items())
    return ("AUTOMATIC1111's request and response shapes. Fields sent with neutral defaults are accepted only with "
            "values whose behaviour sdrt already has; other values are refused with 422 naming the field:\n\n" + rows)


# A1111's built-in upscalers (modules/upscaler.py UpscalerNone, UpscalerLanczos, UpscalerNearest): plain resizes
PLAIN_UPSCALERS = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
_EXTRAS_NEUTRAL = {"gfpgan_visibility": 0, "codeformer_visibility": 0, "extras_upscaler_2_visibility": 0}


def extras_upscale(body: dict, ctx) -> Image.Image:
    """POST /sdapi/v1/extra-single-image: A1111's extras upscale (modules/postprocessing.py, scripts/postprocessing_
    upscale.py) with its built-in upscalers; face restoration and a second upscaler only at visibility 0."""
    if not isinstance(body.get("image"), str) or not body["image"]:
        raise invalid("image", "is required: a base64 image")
    for key, zero in _EXTRAS_NEUTRAL.items():
        if body.get(key) not in (None, zero, 0.0):
            raise invalid(key, f"must be 0: sdrt has no face restoration or second upscaler (got "
                               f"{fields.short(body[key])})")
    name = body.get("upscaler_1", "None")
    if name not in PLAIN_UPSCALERS:
        raise invalid("upscaler_1", f"no upscaler named {fields.short(name)} on this server; it has "
                                    f"{', '.join(PLAIN_UPSCALERS)} (GET /sdapi/v1/upscalers)")
    image = fields.decode_image("image", body["image"], ctx, "RGB")
    mode = body.get("resize_mode", 0)
    if mode not in (0, 1) or isinstance(mode, bool):
        raise invalid("resize_mode", f"must be 0 (scale by upscaling_resize) or 1 (to upscaling_resize_w x h), "
                                     f"not {fields.short(mode)}")
    if mode == 0:
        scale = body.get("upscaling_resize", 2)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 8:
            raise invalid("upscaling_resize", f"must be a number above 0 and at most 8, not {fields.short(scale)}")
        width, height = int(image.width * scale), int(image.height * scale)
    else:
        width = fields.integer("upscaling_resize_w", body.get("upscaling_resize_w", 512), 1, 8192)
        height = fields.integer("upscaling_resize_h", body.get("upscaling_resize_h", 512), 1, 8192)
    if width * height > ctx.max_image_pixels:
        raise invalid("upscaling_resize", f"the result would be {width}x{height}; at most "
                                          f"{ctx.max_image_pixels:,} pixels")
    resample = PLAIN_UPSCALERS[name]
    if resample is None:
        return image
    if mode == 1 and body.get("upscaling_crop", True):  # A1111: scale to cover, then crop the centre
        scale = max(width / image.width, height / image.height)
        cover = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                             resample)
        left, top = (cover.width - width) // 2, (cover.height - height) // 2
        return cover.crop((left, top, left + width, top + height))
    return image.resize((width, height), resample)


def parse_parameters(text: str) -> dict:
    """AUTOMATIC1111's `parameters` text (prompt, "Negative prompt: …", then "Key: value, …") as a dict, as its
    png-info route answers it ("Size" also split into "Size-1" and "Size-2")."""
    if not text:
        return {}
    lines = text.strip().split("\n")
    last = lines.pop() if re.match(r"^\w[\w ]*: ", lines[-1]) and ", " in lines[-1] or lines[-1].startswith("Steps: ") \
        else ""
    negative = [i for i, line in enumerate(lines) if line.startswith("Negative prompt: ")]
    prompt_lines = lines[:negative[0]] if negative else lines
    out = {"Prompt": "\n".join(prompt_lines)}
    if negative:
        out["Negative prompt"] = "\n".join(lines[negative[0]:])[len("Negative prompt: "):]
    for part in re.split(r",\s*(?=\w[\w ]*: )", last) if last else []:
        key, _, value = part.partition(": ")
        out[key.strip()] = value.strip()
        if key.strip() == "Size" and "x" in value:
            out["Size-1"], out["Size-2"] = value.strip().split("x", 1)
    return out


def add_routes(app: FastAPI, state: ServerState) -> None:
    """The dialect's routes on `app`, over the app's shared state."""
    config = state.config
    progress = Progress(lambda: state.dir.info.family)

    async def answer(request: Request, img2img: bool):
        plan = await jobs.plan_of(state, request, lambda body: a1111_plan(body, state.ctx, img2img, state.dir))
        watches = []

        def begin(planned):
            watches.append(progress.begin(planned))
            return watches[-1]
        try:
            results = await jobs.generate(state, request, plan, watch=begin)
        finally:
            for watch in watches:
                progress.end(watch)
        _, sha = checkpoint()
        short = sha[:10] if sha else None
        encoded = await asyncio.to_thread(encode, plan, results, state.model_name, short)
        return JSONResponse(a1111_response(plan, results, encoded, state.model_name, short, state.dir.info.inpaint))

    @app.post("/sdapi/v1/txt2img", tags=["AUTOMATIC1111"], summary="txt2img (AUTOMATIC1111)",
              description=_neutral_doc(False),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": _a1111_schema(False)}}}})
    async def txt2img(request: Request):
        return await answer(request, img2img=False)

    @app.post("/sdapi/v1/img2img", tags=["AUTOMATIC1111"], summary="img2img and inpainting (AUTOMATIC1111)",
              description=_neutral_doc(True),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": _a1111_schema(True)}}}})
    async def img2img(request: Request):
        return await answer(request, img2img=True)

    @app.get("/sdapi/v1/progress", tags=["AUTOMATIC1111"], summary="The running generation's progress and preview")
    async def progress_route(skip_current_image: bool = False):
        return await asyncio.to_thread(progress.answer, skip_current_image)

    @app.post("/sdapi/v1/interrupt", tags=["AUTOMATIC1111"],
              summary="End the running generation after its current step; it answers with what it has")
    async def interrupt():
        progress.interrupt()
        return None

    @app.post("/sdapi/v1/skip", tags=["AUTOMATIC1111"],
              summary="End the running batch (of n_iter) after its current step; the next batches run")
    async def skip():
        progress.skip()
        return None

    # ---- what the server can do ------------------------------------------------------------------------------
    @app.get("/sdapi/v1/samplers", tags=["AUTOMATIC1111"])
    async def samplers():
        return a1111_samplers()

    @app.get("/sdapi/v1/schedulers", tags=["AUTOMATIC1111"])
    async def schedulers():
        return a1111_schedulers()

    def checkpoint() -> tuple[str, str | None]:
        """(the title AUTOMATIC1111 lists the model under, its sha256) from the manifest's source record."""
        source = (state.dir.manifest or {}).get("source") or {}
        sha = source.get("sha256") if isinstance(source, dict) else None
        short = sha[:10] if isinstance(sha, str) else None
        return (f"{state.model_name} [{short}]" if short else state.model_name), sha

    @app.get("/sdapi/v1/sd-models", tags=["AUTOMATIC1111"])
    async def sd_models():
        title, sha = checkpoint()
        return [{"title": title, "model_name": state.model_name, "hash": sha[:10] if sha else None, "sha256": sha,
                 "filename": str(Path(config.engine_dir).resolve()), "config": None}]

    @app.get("/sdapi/v1/options", tags=["AUTOMATIC1111"], summary="The settings clients read (one model, served)")
    async def options():
        title, sha = checkpoint()
        return {"sd_model_checkpoint": title, "sd_checkpoint_hash": sha, "samples_format": "png",
                "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0}

    @app.post("/sdapi/v1/options", tags=["AUTOMATIC1111"],
              summary="Choose the model: only the served one (settings are per request here)")
    async def set_options(request: Request):
        body = fields.parse_json(await jobs.read_body(request, config.max_body_bytes))
        if not isinstance(body, dict):
            raise invalid("body", f"must be a JSON object of settings, not {fields.json_type(body)}")
        title, _ = checkpoint()
        for key, value in body.items():
            if key != "sd_model_checkpoint":
                raise invalid(key, "is not a setting of this server: it serves one model and takes every other "
                                   "setting per request")
            if value not in (title, state.model_name):
                raise invalid(key, f"this server serves {title!r} (GET /sdapi/v1/sd-models), not "
                                   f"{fields.short(value)}")
        return None

    @app.get("/sdapi/v1/cmd-flags", tags=["AUTOMATIC1111"], summary="How the server was started, as A1111 flags")
    async def cmd_flags():
        return {"api": True, "nowebui": True, "api_auth": None, "listen": None, "port": None,
                "ckpt": str(Path(config.engine_dir).resolve()), "lora_dir": str(config.lora_dir or "") or None,
                "embeddings_dir": str(config.embeddings_dir or "") or None}

    @app.get("/sdapi/v1/upscalers", tags=["AUTOMATIC1111"], summary="The upscalers extras can use (A1111's built-in)")
    async def upscalers():
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name in PLAIN_UPSCALERS]

    @app.post("/sdapi/v1/extra-single-image", tags=["AUTOMATIC1111"],
              summary="Resize an image with a built-in upscaler (None, Lanczos, Nearest)")
    async def extra_single_image(request: Request):
        body = fields.parse_json(await jobs.read_body(request, config.max_body_bytes))
        image = await asyncio.to_thread(extras_upscale, body, state.ctx)
        return {"html_info": "", "image": base64.b64encode(image_io.image_bytes(image)).decode("ascii")}

    # ---- the ControlNet extension (sd-webui-controlnet scripts/api.py) ----------------------------------------
    @app.get("/controlnet/version", tags=["AUTOMATIC1111"], summary="The ControlNet extension's API version")
    async def controlnet_version():
        return {"version": 3}  # external_code.get_api_version()

    @app.get("/controlnet/model_list", tags=["AUTOMATIC1111"],
             summary="The ControlNets of the engine directory, as a unit's `model` names them")
    async def controlnet_models(update: bool = True):
        return {"model_list": model_list(state.dir)}

    @app.get("/controlnet/module_list", tags=["AUTOMATIC1111"],
             summary="The preprocessors a unit's `module` may name")
    async def controlnet_modules(alias_names: bool = False):
        return {"module_list": module_list()}

    @app.get("/sdapi/v1/scripts", tags=["AUTOMATIC1111"], summary="Scripts: none (sdrt runs none)")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.post("/sdapi/v1/png-info", tags=["AUTOMATIC1111"], summary="The generation parameters a PNG carries")
    async def png_info(request: Request):
        body = fields.parse_json(await jobs.read_body(request, config.max_body_bytes))
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise invalid("image", "is required: a base64 PNG")
        image = fields.decode_image("image", body["image"], state.ctx, None)
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        text = items.pop("parameters", "")
        return {"info": text, "items": items, "parameters": parse_parameters(text)}

    @app.get("/sdapi/v1/loras", tags=["AUTOMATIC1111"], summary="The LoRAs requests may name")
    async def loras():
        folder = config.lora_dir
        return [{"name": name, "alias": name, "path": str(path.relative_to(Path(folder).absolute())), "metadata": {}}
                for name, path in sorted(lora_refs.available(folder.absolute() if folder else None).items())]

    @app.post("/sdapi/v1/refresh-loras", tags=["AUTOMATIC1111"], summary="Re-read the LoRA folder (always current)")
    async def refresh_loras():
        return None

    @app.get("/sdapi/v1/embeddings", tags=["AUTOMATIC1111"], summary="The textual inversions prompts may use")
    async def embeddings():
        from sdrt.runtime.prompts import embeddings as ti

        if config.embeddings_dir is None:
            return {"loaded": {}, "skipped": {}}
        loaded = ti.resolve((), config.embeddings_dir, ti.slots_for(state.dir))
        return {"loaded": {e.name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                    "shape": int(e.vectors[0].shape[-1]), "vectors": int(e.vectors[0].shape[0])}
                           for e in loaded}, "skipped": {}}
