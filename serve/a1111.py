"""The AUTOMATIC1111 dialect of `sdrt serve`: `/sdapi/v1` (txt2img, img2img, and what the server can do).

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
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import ImageOps

from sdrt.runtime.fields import MAX_SEED
from sdrt.runtime.lora import refs as lora_refs
from sdrt.runtime.prompts.tags import TagError, strip_lora_tags
from sdrt.runtime.samplers import registry as sampler_registry
from sdrt.serve import fields, jobs
from sdrt.serve.edge import ServerState
from sdrt.serve.errors import invalid
from sdrt.serve.fields import ModelContext, Plan

# ---- the body → Plans ----------------------------------------------------------------------------------------

A1111_USED = ("prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "batch_size",
              "n_iter", "steps", "cfg_scale", "width", "height", "send_images")
A1111_IMG2IMG_USED = ("init_images", "denoising_strength", "mask", "inpainting_mask_invert", "include_init_images",
                      "outpaint")
# inpainting_fill with sdrt's `outpaint` extension: 0 "fill" (blurred colours), 1 "original", 2 "latent noise"
A1111_OUTPAINT_FILL = {0: "blur", 1: "edge", 2: "noise"}
_A1111_NAMES = {"guidance": "cfg_scale", "batch": "batch_size", "sampler": "sampler_name", "schedule": "scheduler",
                "strength": "denoising_strength", "init_image": "init_images", "request": "body"}
A1111_DEFAULTS = {"steps": 50, "cfg_scale": 7.0, "sampler": "Euler", "denoising_strength": 0.75}

# A1111 scheduler labels (and sdrt's schedule names) → sdrt's schedule; None: what the sampler name implies
A1111_SCHEDULERS = {"automatic": None, "karras": "karras", "exponential": "exponential", "sgm uniform": "sgm_uniform",
                    "simple": "simple", "beta": "beta", "default": "default"}


@dataclass(frozen=True)
class Neutral:
    accepts: str  # what sdrt accepts, in words (the 422 message and the docs)
    check: Callable[[Any, Mapping], bool]  # (value, the whole body) → accepted


def _is(*values) -> Callable[[Any, Mapping], bool]:
    """Accepts exactly these JSON values (1 and 1.0 alike; true is not 1)."""
    def check(v, body) -> bool:
        for x in values:
            if x is None or isinstance(x, bool):
                if v is x:
                    return True
            elif isinstance(x, (int, float)):
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v == x:
                    return True
            elif type(v) is type(x) and v == x:
                return True
        return False
    return check


def _any(v, body) -> bool:
    return True


def _bool_or_null(v, body) -> bool:
    return v is None or isinstance(v, bool)


def _unless(flag: str, inner=None) -> Callable[[Any, Mapping], bool]:
    """Any value while `flag` is off (the field then does nothing, in A1111 too), else `inner`."""
    return lambda v, body: not body.get(flag) or (inner is not None and inner(v, body))


def _with_mask(inner) -> Callable[[Any, Mapping], bool]:
    return lambda v, body: body.get("mask") is None or inner(v, body)


def _eta(v, body) -> bool:
    """eta as the sampler's registry entry allows it (DDIM 0; ancestral and SDE samplers 1, as sdrt runs them)."""
    if v is None:
        return True
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    name = body.get("sampler_name") or body.get("sampler_index") or A1111_DEFAULTS["sampler"]
    try:
        sampler, _ = sampler_registry.resolve(name) if isinstance(name, str) else ("euler", None)
    except Exception:  # the sampler's own error comes from validation
        return True
    return sampler_registry.get(sampler).accepts_eta(v)


def _override_settings(ctx_name: str) -> Callable[[Any, Mapping], bool]:
    def check(v, body) -> bool:
        if v is None or v == {}:
            return True
        return isinstance(v, dict) and set(v) == {"sd_model_checkpoint"} and \
            isinstance(v["sd_model_checkpoint"], str) and v["sd_model_checkpoint"].split(" [")[0] == ctx_name
    return check


_HIRES = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
          "hr_additional_modules", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg",
          "hr_distilled_cfg", "firstphase_width", "firstphase_height")


def a1111_neutral(model_name: str, img2img: bool) -> dict[str, Neutral]:
    """The fields A1111 clients send with defaults, and the values of them sdrt accepts."""
    table = {
        "restore_faces": Neutral("false or null (sdrt has no face restoration)", _is(False, None)),
        "tiling": Neutral("false or null (sdrt does not tile)", _is(False, None)),
        "styles": Neutral("[] or null (sdrt has no saved styles)", _is([], None)),
        "subseed": Neutral("anything while subseed_strength is 0 (no variation seeds)",
                           lambda v, body: not body.get("subseed_strength")),
        "subseed_strength": Neutral("0 or null (no variation seeds)", _is(0, None)),
        "seed_resize_from_h": Neutral("-1, 0 or null (no seed resize)", _is(-1, 0, None)),
        "seed_resize_from_w": Neutral("-1, 0 or null (no seed resize)", _is(-1, 0, None)),
        "do_not_save_samples": Neutral("true, false or null (sdrt never saves images on the server)", _bool_or_null),
        "do_not_save_grid": Neutral("true, false or null (sdrt never saves grids)", _bool_or_null),
        "save_images": Neutral("false or null (sdrt never saves images on the server)", _is(False, None)),
        "eta": Neutral("null; 0 for DDIM; 1 for ancestral and SDE samplers (sdrt's fixed eta); any value for "
                       "samplers without noise", _eta),
        "s_min_uncond": Neutral("0 or null", _is(0, None)),
        "s_churn": Neutral("0 or null (no churn)", _is(0, None)),
        "s_tmax": Neutral("0 or null", _is(0, None)),
        "s_tmin": Neutral("0 or null", _is(0, None)),
        "s_noise": Neutral("1 or null", _is(1, None)),
        "override_settings": Neutral(f"{{}}, null, or {{\"sd_model_checkpoint\": \"{model_name}\"}}",
                                     _override_settings(model_name)),
        "override_settings_restore_afterwards": Neutral("true, false or null (nothing is overridden)",
                                                        _bool_or_null),
        "refiner_checkpoint": Neutral("null, \"\" or \"None\" (no refiner)", _is(None, "", "None")),
        "refiner_switch_at": Neutral("anything while there is no refiner_checkpoint", _any),
        "disable_extra_networks": Neutral("true, false or null (true: extra-network tags are dropped unapplied)", _bool_or_null),
        "comments": Neutral("{} or null", _is({}, None)),
        "enable_hr": Neutral("false or null (sdrt has no hires fix)", _is(False, None)),
        "script_name": Neutral("null or \"\" (sdrt runs no scripts)", _is(None, "")),
        "script_args": Neutral("[] or null", _is([], None)),
        "alwayson_scripts": Neutral("{} or null", _is({}, None)),
        "force_task_id": Neutral("any string or null (sdrt has no progress endpoint to use it)",
                                 lambda v, body: v is None or isinstance(v, str)),
        "infotext": Neutral("null or \"\"", _is(None, "")),
    }
    for name in _HIRES:
        table[name] = Neutral("anything while enable_hr is false (hires fix does nothing then)", _unless("enable_hr"))
    if not img2img:
        table["denoising_strength"] = Neutral("anything while enable_hr is false (txt2img uses it only for hires "
                                              "fix)", _unless("enable_hr"))
        return table
    table |= {
        "resize_mode": Neutral("0 or null (\"Just resize\": the init image is resized to width x height)",
                               _is(0, None)),
        "image_cfg_scale": Neutral("any value (AUTOMATIC1111 uses it for instruct-pix2pix models only, which sdrt "
                                   "does not serve; webuiapi sends 1.5)", _any),
        "mask_blur": Neutral("0 or null with a mask (sdrt does not blur masks); anything without one (with outpaint: "
                             "the soft border)",
                             _with_mask(_is(0, None))),
        "mask_blur_x": Neutral("0 or null with a mask; anything without one", _with_mask(_is(0, None))),
        "mask_blur_y": Neutral("0 or null with a mask; anything without one", _with_mask(_is(0, None))),
        "mask_round": Neutral("true or null with a mask (sdrt binarizes masks at 0.5); anything without one",
                              _with_mask(_is(True, None))),
        "inpainting_fill": Neutral("1 (\"original\") or null with a mask; anything without one (with outpaint: 0, 1 "
                                   "or 2, the fill)",
                                   _with_mask(_is(1, None))),
        "inpaint_full_res": Neutral("false, 0 or null with a mask (\"whole picture\"); anything without one",
                                    _with_mask(_is(False, 0, None))),
        "inpaint_full_res_padding": Neutral("anything while inpaint_full_res is off",
                                            lambda v, body: body.get("mask") is None or
                                            not body.get("inpaint_full_res")),
        "initial_noise_multiplier": Neutral("1 or null", _is(1, None)),
        "latent_mask": Neutral("null", _is(None)),
    }
    return table


_EXTRA_NETWORK = re.compile(r"<(\w+):[^>]*>")


def extra_networks(field_name: str, text: str, ctx: ModelContext, disabled) -> str:
    """A1111 prompt tags: `<lora:NAME:SCALE>` names a LoRA of the server's folder (the runtime applies it);
    `<hypernet:…>` must name one baked into the engines (the runtime checks); other networks are refused. With
    disable_extra_networks, A1111 drops every tag unapplied."""
    if disabled:
        return _EXTRA_NETWORK.sub("", text)
    kinds = {m.group(1).lower() for m in _EXTRA_NETWORK.finditer(text)} - {"lora", "lyco", "hypernet"}
    if kinds:
        raise invalid(field_name, f"holds a <{sorted(kinds)[0]}:…> extra network, which sdrt does not load (it loads "
                                  "<lora:NAME:SCALE>); remove it, or set disable_extra_networks: true to drop the tags")
    try:
        _, tags = strip_lora_tags(text)
    except TagError as e:
        raise invalid(field_name, str(e)) from None
    fields.lora_names_check(field_name, [name for name, _ in tags], ctx)
    return text


def a1111_plan(body: Mapping, ctx: ModelContext, img2img: bool) -> Plan:
    used = A1111_USED + (A1111_IMG2IMG_USED if img2img else ())
    neutral = a1111_neutral(ctx.name, img2img)
    unknown = [k for k in body if k not in used and k not in neutral]
    if unknown:
        route = "img2img" if img2img else "txt2img"
        raise invalid(unknown[0], f"is not an AUTOMATIC1111 {route} field sdrt knows (unknown: "
                                  f"{', '.join(unknown)}); GET /docs lists the accepted fields")
    refused = [k for k, rule in neutral.items() if k in body and not rule.check(body[k], body)]
    if refused:
        what = "; ".join(f"{k} = {fields.short(body[k])} (sdrt accepts {neutral[k].accepts})" for k in refused)
        raise invalid(refused[0], f"asks for what sdrt does not do: {what}")

    prompt = body.get("prompt")
    prompt = fields.text("prompt", "" if prompt is None else prompt, ctx)
    flat: dict[str, Any] = {"prompt": extra_networks("prompt", prompt, ctx, body.get("disable_extra_networks"))}
    names = dict(_A1111_NAMES)
    if body.get("negative_prompt") is not None:
        negative = fields.text("negative_prompt", body["negative_prompt"], ctx)
        flat["negative_prompt"] = extra_networks("negative_prompt", negative, ctx, body.get("disable_extra_networks"))
    batch = body.get("batch_size", 1)
    flat["batch"] = batch
    iterations = fields.integer("n_iter", 1 if body.get("n_iter") is None else body["n_iter"], 1, ctx.max_iterations)
    flat["steps"] = A1111_DEFAULTS["steps"] if body.get("steps") is None else body["steps"]
    flat["guidance"] = A1111_DEFAULTS["cfg_scale"] if body.get("cfg_scale") is None else body["cfg_scale"]
    for key in ("width", "height"):
        if body.get(key) is not None:
            flat[key] = body[key]
    sampler = body.get("sampler_name") or None
    if sampler is None and body.get("sampler_index"):
        sampler, names["sampler"] = body["sampler_index"], "sampler_index"
    if sampler is not None and not isinstance(sampler, str):
        raise invalid(names["sampler"], f"must be a sampler name (GET /sdapi/v1/samplers), not {fields.short(sampler)}")
    flat["sampler"] = sampler or A1111_DEFAULTS["sampler"]
    scheduler = body.get("scheduler")
    if scheduler is not None:
        key = re.sub(r"[\s_\-]+", " ", scheduler.strip().lower()) if isinstance(scheduler, str) else None
        if key not in A1111_SCHEDULERS:
            raise invalid("scheduler", f"must be one of Automatic, Karras, Exponential, SGM Uniform, Simple, Beta "
                                       f"(GET /sdapi/v1/schedulers), not {fields.short(scheduler)}")
        flat["schedule"] = A1111_SCHEDULERS[key]
    send_images = body.get("send_images", True)
    if not isinstance(send_images, bool):
        raise invalid("send_images", f"must be true or false, not {fields.short(send_images)}")
    seed = -1 if body.get("seed") is None else fields.integer("seed", body["seed"], -1, MAX_SEED)
    if isinstance(batch, bool) or not isinstance(batch, int):
        batch_count = None  # validation names batch_size
    else:
        batch_count = batch
    if seed == -1:
        seed = secrets.randbelow(2 ** 32)
    echo = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            got = fields.json_type(images) if not isinstance(images, list) else f"{len(images)} images"
            raise invalid("init_images", "must be a list holding one base64 image (sdrt uses one init image for "
                                         f"the whole batch), not {got}")
        flat["init_image"] = fields.decode_image("init_images", images[0], ctx, "RGB")
        strength = body.get("denoising_strength")
        flat["strength"] = A1111_DEFAULTS["denoising_strength"] if strength is None else strength
        if body.get("mask") is not None:
            mask = fields.decode_image("mask", body["mask"], ctx, "L")
            invert = body.get("inpainting_mask_invert")
            if invert not in (None, 0, 1) or isinstance(invert, bool):
                raise invalid("inpainting_mask_invert", f"must be 0 or 1, not {fields.short(invert)}")
            flat["mask"] = ImageOps.invert(mask) if invert == 1 else mask
        if body.get("outpaint") is not None:
            flat["outpaint"] = _a1111_outpaint(body)
            _a1111_outpaint_size(flat)
        include = body.get("include_init_images")
        if include not in (None, True, False):
            raise invalid("include_init_images", f"must be true or false, not {fields.short(include)}")
        if include:
            echo = dict(body)
    requests = []
    step = batch_count if batch_count is not None else 1
    if seed + iterations * step - 1 > MAX_SEED:
        raise invalid("seed", f"image i uses seed + i; with {iterations * step} images the seed must be at most "
                              f"{MAX_SEED - iterations * step + 1}")
    for i in range(iterations):
        requests.append(fields.request_of({**flat, "seed": seed + i * step}))
    return Plan(requests, names, send_images=send_images, echo=echo, img2img=img2img)


def _a1111_outpaint(body: Mapping) -> dict:
    """sdrt's `outpaint` extension ({"left", "right", "top", "bottom"} pixels) with A1111's own fields where they
    map: inpainting_fill → the fill of the new area, mask_blur → the soft border (runtime/tasks/outpaint.py)."""
    spec = body["outpaint"]
    if not isinstance(spec, Mapping):
        raise invalid("outpaint", f"must be an object with left/right/top/bottom margins in pixels, not "
                                  f"{fields.json_type(spec)}")
    spec = dict(spec)
    fill = body.get("inpainting_fill")
    if fill is not None:
        if isinstance(fill, bool) or not isinstance(fill, int) or fill not in A1111_OUTPAINT_FILL:
            raise invalid("inpainting_fill", "with outpaint: 0 (fill: blurred edge), 1 (original: repeated edge) "
                                             f"or 2 (latent noise: noise), not {fields.short(fill)}")
        if "fill" in spec and spec["fill"] != A1111_OUTPAINT_FILL[fill]:
            raise invalid("inpainting_fill", f"asks for {A1111_OUTPAINT_FILL[fill]} but outpaint.fill is "
                                             f"{fields.short(spec['fill'])}; give one")
        spec["fill"] = A1111_OUTPAINT_FILL[fill]
    blur = body.get("mask_blur")
    if blur is not None:
        if "blur" in spec and spec["blur"] != blur:
            raise invalid("mask_blur", f"is {fields.short(blur)} but outpaint.blur is {fields.short(spec['blur'])}; "
                                       "give one")
        spec["blur"] = blur
    return spec


def _a1111_outpaint_size(flat: dict) -> None:
    """With outpaint the size is the extended canvas: width/height (which A1111 clients always send) may only
    repeat it, and are then left to the margins."""
    spec, (w, h) = flat["outpaint"], flat["init_image"].size
    sides = [spec.get(k, 0) for k in ("left", "right", "top", "bottom")]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in sides):
        canvas = {"width": w + sides[0] + sides[1], "height": h + sides[2] + sides[3]}
        for key, value in canvas.items():
            if key in flat and flat[key] != value:
                raise invalid(key, f"with outpaint the image is the extended canvas, {canvas['width']}x"
                                   f"{canvas['height']}; send that size or leave {key} out")
    flat.pop("width", None)
    flat.pop("height", None)


# ---- the answers ---------------------------------------------------------------------------------------------

def a1111_response(plan: Plan, results, encoded: list[list[bytes]], model_name: str) -> dict:
    jobs = [r.job for r in results]
    first = jobs[0]
    seeds = [s for r in results for s in r.seeds]
    prompts = [p for j in jobs for p in j.prompt for _ in range(j.images_per_prompt)]
    negatives = [n for j in jobs for n in (j.negative_prompt or ("",) * len(j.prompt))
                 for _ in range(j.images_per_prompt)]
    infotexts = [r.parameters(i, model_name).a1111_text() for r in results for i in range(len(r.images))]
    info = {
        "prompt": prompts[0], "all_prompts": prompts, "negative_prompt": negatives[0],
        "all_negative_prompts": negatives, "seed": seeds[0], "all_seeds": seeds, "subseed": -1,
        "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": first.width, "height": first.height,
        "sampler_name": first.sampler_label, "scheduler": first.schedule, "cfg_scale": first.guidance,
        "steps": first.steps, "batch_size": first.count, "n_iter": len(jobs), "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model_name, "sd_model_hash": None, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": first.strength, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": first.mask is not None, "version": "sdrt",
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

    async def answer(request: Request, img2img: bool):
        plan = await jobs.plan_of(state, request, lambda body: a1111_plan(body, state.ctx, img2img))
        results = await jobs.generate(state, request, plan)
        encoded = await asyncio.to_thread(jobs.encode_results, plan, results, state.model_name)
        return JSONResponse(a1111_response(plan, results, encoded, state.model_name))

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
