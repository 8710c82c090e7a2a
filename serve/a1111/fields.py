"""AUTOMATIC1111's txt2img/img2img bodies → Plans for the service (serve/fields.py Plan), for serve/a1111/routes.py.

The fields sdrt uses are in `A1111_USED` (and `A1111_IMG2IMG_USED`); the fields A1111 clients send with neutral
defaults are in `a1111_neutral()`, each accepted only with a value whose behaviour sdrt already has and refused
with 422 naming it otherwise; any other field is refused as unknown. With a mask, A1111's inpainting fields
(mask_blur[_x/_y], inpainting_fill, inpaint_full_res[_padding], inpainting_mask_invert) map onto the runtime's
`inpaint` settings (runtime/tasks/inpaint_a1111.py) with A1111's defaults. The ControlNet extension's units in
`alwayson_scripts` become the Request's Control fields (serve/a1111/controlnet.py); the face-ID entries
(`instantid`, `photomaker`, `pulid`) and InstantID's two units, its InstantID/PhotoMaker/Pulid fields
(serve/a1111/identity.py).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from sdrt.runtime.fields import MAX_SEED
from sdrt.runtime.prompts.tags import TagError, strip_lora_tags
from sdrt.runtime.samplers import registry as sampler_registry
from sdrt.serve import fields
from sdrt.serve.a1111.controlnet import control_fields, has_units
from sdrt.serve.a1111.identity import instantid_units, script_fields, scripts_check
from sdrt.serve.errors import invalid
from sdrt.serve.fields import ModelContext, Plan

# ---- the body → Plans ----------------------------------------------------------------------------------------

A1111_USED = ("prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "batch_size",
              "n_iter", "steps", "cfg_scale", "width", "height", "send_images")
A1111_IMG2IMG_USED = ("init_images", "denoising_strength", "mask", "inpainting_mask_invert", "include_init_images",
                      "outpaint", "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
                      "inpaint_full_res_padding")
# with a mask: inpainting_fill 0..3 → runtime/tasks/inpaint_a1111.py's fill; A1111's defaults when omitted
A1111_INPAINT_FILL = ("fill", "original", "latent_noise", "latent_nothing")
A1111_INPAINT_DEFAULTS = {"mask_blur_x": 4, "mask_blur_y": 4, "inpainting_fill": 0, "inpaint_full_res": True,
                          "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0}
# inpainting_fill with sdrt's `outpaint` extension: 0 "fill" (blurred colours), 1 "original", 2 "latent noise"
A1111_OUTPAINT_FILL = {0: "blur", 1: "edge", 2: "noise"}
_A1111_NAMES = {"fill": "inpainting_fill", "only_masked": "inpaint_full_res", "padding": "inpaint_full_res_padding",
                "invert": "inpainting_mask_invert", "guidance": "cfg_scale", "batch": "batch_size", "sampler": "sampler_name", "schedule": "scheduler",
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
        "alwayson_scripts": Neutral("{}, null, the ControlNet extension's {\"controlnet\": {\"args\": [units]}} "
                                    "(InstantID's two units among them) and the face-ID entries {\"instantid\" | "
                                    "\"photomaker\" | \"pulid\": {\"args\": [{fields}]}} (serve/a1111/identity.py); "
                                    "sdrt runs no other scripts", scripts_check),
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
        "mask_round": Neutral("true or null with a mask (sdrt's latent mask is binary, as A1111's rounded one); "
                              "anything without one", _with_mask(_is(True, None))),
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


def a1111_plan(body: Mapping, ctx: ModelContext, img2img: bool, model_dir=None) -> Plan:
    """`model_dir`: the engine directory (its ControlNets), needed only for ControlNet units."""
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
            if body.get("outpaint") is not None:
                raise invalid("mask", "outpainting builds its own mask; give a mask or outpaint margins, not both")
            flat["mask"] = mask
            flat["inpaint"] = a1111_inpaint(body)
        if body.get("outpaint") is not None:
            flat["outpaint"] = _a1111_outpaint(body)
            _a1111_outpaint_size(flat)
        include = body.get("include_init_images")
        if include not in (None, True, False):
            raise invalid("include_init_images", f"must be true or false, not {fields.short(include)}")
        if include:
            echo = dict(body)
    if has_units(body):
        if model_dir is None:
            raise invalid("alwayson_scripts", "ControlNet units need the server's engine directory")
        size = _output_size(flat, ctx, body)
        identity, taken = instantid_units(body, ctx, size, names)
        flat |= control_fields(body, ctx, model_dir, flat.get("init_image"), size, skip=taken) | identity
    scripted = script_fields(body, ctx, names)  # alwayson_scripts' instantid / photomaker / pulid entries
    clash = sorted(set(flat) & set(scripted))
    if clash:
        raise invalid(names[clash[0]], "InstantID is given twice (ControlNet units and the instantid entry); give "
                                       "one")
    flat |= scripted
    requests = []
    step = batch_count if batch_count is not None else 1
    if seed + iterations * step - 1 > MAX_SEED:
        raise invalid("seed", f"image i uses seed + i; with {iterations * step} images the seed must be at most "
                              f"{MAX_SEED - iterations * step + 1}")
    for i in range(iterations):
        requests.append(fields.request_of({**flat, "seed": seed + i * step}))
    return Plan(requests, names, send_images=send_images, echo=echo, img2img=img2img)


def _flag(body: Mapping, key: str) -> bool:
    value = body.get(key)
    value = A1111_INPAINT_DEFAULTS[key] if value is None else value
    if value not in (0, 1) or (not isinstance(value, (bool, int))):
        raise invalid(key, f"must be true or false (or 0 or 1), not {fields.short(value)}")
    return bool(value)


def a1111_inpaint(body: Mapping) -> dict:
    """A1111's inpainting fields as the runtime's `inpaint` settings (runtime/tasks/inpaint_a1111.py); omitted
    fields take A1111's defaults (blur 4, fill, only masked, padding 0). `mask_blur`, when given, sets both axes."""
    blur = []
    for axis in ("mask_blur_x", "mask_blur_y"):
        key = "mask_blur" if body.get("mask_blur") is not None else axis
        value = body.get(key)
        blur.append(fields.integer(key, A1111_INPAINT_DEFAULTS[axis] if value is None else value, 0, 256))
    fill = body.get("inpainting_fill")
    fill = A1111_INPAINT_DEFAULTS["inpainting_fill"] if fill is None else fill
    if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill < len(A1111_INPAINT_FILL):
        raise invalid("inpainting_fill", "must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), "
                                         f"not {fields.short(fill)}")
    padding = body.get("inpaint_full_res_padding")
    padding = fields.integer("inpaint_full_res_padding", 0 if padding is None else padding, 0, 4096)
    return {"mask_blur": tuple(blur), "fill": A1111_INPAINT_FILL[fill], "only_masked": _flag(body, "inpaint_full_res"),
            "padding": padding, "invert": _flag(body, "inpainting_mask_invert")}


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


def _output_size(flat: dict, ctx: ModelContext, body: Mapping) -> tuple[int, int] | None:
    """The size the request will have (runtime/validate.py _size): width/height, else the init image's (floored to
    the size multiple; with outpaint, the extended canvas), else the model's default; None while a value is bad."""
    init = flat.get("init_image")
    if "outpaint" in flat:
        spec = flat["outpaint"]
        sides = [spec.get(k, 0) for k in ("left", "right", "top", "bottom")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in sides):
            return None
        return init.width + sides[0] + sides[1], init.height + sides[2] + sides[3]
    width, height = flat.get("width"), flat.get("height")
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1) for v in (width, height)):
        return None
    m = ctx.size_multiple
    if init is not None:
        width = width or max(init.width // m * m, m)
        height = height or max(init.height // m * m, m)
    return width or ctx.default_size, height or ctx.default_size
