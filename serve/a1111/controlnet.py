"""The AUTOMATIC1111 ControlNet extension's API (github.com/Mikubill/sd-webui-controlnet, scripts/api.py and
internal_controlnet/args.py ControlNetUnit) on sdrt's ControlNets (runtime/conditioning/controlnet.py).

`GET /controlnet/model_list` lists the engine directory's ControlNets as "NAME [hash]" (the first 8 hex digits of
the sha256 of the files they were exported from, like A1111's short hashes); a unit's `model` names one, with or
without the " [hash]" suffix. `GET /controlnet/module_list` lists "none" and sdrt's preprocessors
(runtime/conditioning/preprocess.py).

A txt2img/img2img body's `alwayson_scripts.controlnet.args` (the key matched case-insensitively, as A1111 matches
script titles: webuiapi sends "ControlNet") is a list of units; each enabled unit becomes one entry of the Request's
`controls` {name, image, scale, start, end} (several units: several ControlNets, summed as diffusers'
MultiControlNetModel), `control_mode` 2 becomes `guess_mode`. What each unit field does here is `UNIT_FIELDS`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from PIL import Image

from sdrt.runtime.conditioning import preprocess
from sdrt.runtime.conditioning.controlnet import controlnet_names, controlnet_record
from sdrt.runtime.fields import InvalidRequest
from sdrt.serve import fields
from sdrt.serve.errors import invalid
from sdrt.serve.fields import ModelContext

SCRIPT = "controlnet"  # the alwayson_scripts key, lower-cased
# the extension's ResizeMode (scripts/enums.py): int value → name, plus the aliases args.py accepts
RESIZE_MODES = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill"}
_RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": 1, "Scale to Fit (Inner Fit)": 1, "Outer Fit (Shrink to Fit)": 2,
                   "Envelope (Outer Fit)": 2}
CONTROL_MODES = {0: "Balanced", 1: "My prompt is more important", 2: "ControlNet is more important"}
CANNY_DEFAULTS = (100, 200)  # the extension's canny sliders (scripts/preprocessor/model_free_preprocessors.py)

# unit field → what sdrt does with it (the README and GET /docs say the same)
UNIT_FIELDS = {
    "enabled": "honoured: false skips the unit (default true)",
    "image": "honoured: base64 or a data URL, or {\"image\": …}; omitted in img2img: the init image",
    "input_image": "honoured: the older name of image",
    "module": "honoured: none or canny",
    "model": "honoured: a ControlNet of GET /controlnet/model_list, the \" [hash]\" suffix optional",
    "weight": "honoured: the ControlNet's conditioning scale, 0 to 2",
    "guidance_start": "honoured: where in the schedule the net starts (0 to 1)",
    "guidance_end": "honoured: where it stops (0 to 1), diffusers' control_guidance_end",
    "guidance": "honoured: the older name of guidance_end",
    "control_mode": "honoured: 0/\"Balanced\", 2/\"ControlNet is more important\" (guess mode, the same for every "
                    "unit); 1/\"My prompt is more important\" is refused",
    "resize_mode": "honoured: 0/\"Just Resize\", 1/\"Crop and Resize\", 2/\"Resize and Fill\"",
    "threshold_a": "honoured: canny's low threshold (1 to 255; otherwise 100)",
    "threshold_b": "honoured: canny's high threshold (1 to 255; otherwise 200)",
    "processor_res": "accepted without effect: canny runs at the control image's own size",
    "pixel_perfect": "accepted without effect: canny runs at the control image's own size",
    "low_vram": "accepted without effect",
    "lowvram": "accepted without effect (the older name of low_vram)",
    "hr_option": "accepted without effect: sdrt has no hires fix",
    "save_detected_map": "accepted without effect",
    "mask": "null or \"\" only: sdrt has no ControlNet masks",
    "mask_image": "null or \"\" only: sdrt has no ControlNet masks",
}


def enabled(obj: Mapping, where: str) -> bool:
    """A unit's or script entry's `enabled` (default true): a boolean, else a 422 naming `where`.enabled."""
    value = obj.get("enabled", True)
    if not isinstance(value, bool):
        raise invalid(f"{where}.enabled", f"must be true or false, not {fields.short(value)}")
    return value


def short_hash(model_dir, name: str) -> str | None:
    sha = controlnet_record(model_dir, name).get("sha256")
    return sha[:8] if isinstance(sha, str) else None


def model_list(model_dir) -> list[str]:
    """GET /controlnet/model_list: "NAME [hash]" per ControlNet of the engine directory, in export order."""
    out = []
    for name in controlnet_names(model_dir):
        digest = short_hash(model_dir, name)
        out.append(f"{name} [{digest}]" if digest else name)
    return out


def module_list() -> list[str]:
    """GET /controlnet/module_list: the preprocessors a unit's `module` may name."""
    return ["none", *preprocess.NAMES]


def has_units(body: Mapping) -> bool:
    scripts = body.get("alwayson_scripts")
    return isinstance(scripts, Mapping) and any(k.lower() == SCRIPT for k in scripts)


def scripts_check(value, body) -> bool:
    """alwayson_scripts: null, {} or only the ControlNet extension's entry (read by `control_fields`)."""
    return value is None or (isinstance(value, Mapping) and all(isinstance(k, str) and k.lower() == SCRIPT
                                                                for k in value))


def control_fields(body: Mapping, ctx: ModelContext, model_dir, init_image: Image.Image | None,
                   size: tuple[int, int] | None, skip=frozenset()) -> dict[str, Any]:
    """The enabled units of alwayson_scripts' ControlNet entry as the Request's Control fields ({} for none).
    `size`: the output's width and height (for resize_mode); `skip`: indices of units read elsewhere (InstantID's,
    serve/a1111/identity.py)."""
    scripts = body.get("alwayson_scripts") or {}
    key = next((k for k in scripts if k.lower() == SCRIPT), None)
    if key is None:
        return {}
    where = f"alwayson_scripts.{key}"
    entry = scripts[key]
    if isinstance(entry, list):  # {"controlnet": [units]}: some clients leave out "args"
        entry = {"args": entry}
    if not isinstance(entry, Mapping) or set(entry) - {"args"}:
        raise invalid(where, "must be {\"args\": [unit, …]}, each unit an object of ControlNetUnit fields")
    units = entry.get("args") or []
    if not isinstance(units, list):
        raise invalid(f"{where}.args", f"must be a list of ControlNet units (objects), not {fields.json_type(units)}")
    have = controlnet_names(model_dir)
    controls, modes, indices = [], [], []
    for i, unit in enumerate(units):
        field = f"{where}.args[{i}]"
        if not isinstance(unit, Mapping):
            raise invalid(field, f"must be an object of ControlNetUnit fields (module, model, image, weight, …), "
                                 f"not {fields.json_type(unit)}")
        if i in skip:
            continue
        unknown = [k for k in unit if k not in UNIT_FIELDS]
        if unknown:
            raise invalid(f"{field}.{unknown[0]}", f"is not a ControlNet unit field sdrt knows (unknown: "
                                                   f"{', '.join(unknown)}); it takes {', '.join(UNIT_FIELDS)}")
        if not enabled(unit, field):
            continue
        control, mode = _unit(unit, field, ctx, model_dir, have, init_image, size)
        controls.append(control)
        modes.append(mode)
        indices.append(i)
    if not controls:
        return {}
    if len(set(modes)) > 1:
        other = next(j for j, m in enumerate(modes) if m != modes[0])
        raise invalid(f"{where}.args[{indices[other]}].control_mode",
                      "must be the same for every enabled unit: sdrt's guess mode (\"ControlNet is more important\")"
                      " applies to all of a request's ControlNets")
    return {"controls": controls, "guess_mode": modes[0] == 2}


def _alias(unit: Mapping, field: str, name: str, old: str):
    if name in unit and old in unit:
        raise invalid(f"{field}.{old}", f"is the older name of {name}; give one of them")
    return (name, unit[name]) if name in unit else (old, unit.get(old))


def _unit(unit: Mapping, field: str, ctx: ModelContext, model_dir, have: list[str], init_image, size):
    for name in ("mask", "mask_image"):
        if unit.get(name) not in (None, ""):
            raise invalid(f"{field}.{name}", "must be null or \"\": sdrt has no ControlNet masks")
    model = unit.get("model")
    name = re.sub(r"\s*\[[^\]]*\]$", "", model) if isinstance(model, str) else None
    if name not in have:
        listed = ", ".join(model_list(model_dir)) or "none (export one with --controlnet)"
        raise invalid(f"{field}.model", f"no ControlNet named {fields.short(model)} on this server; it has: {listed} "
                                        "(GET /controlnet/model_list)")
    image = _image(unit, field, ctx, init_image)
    module = unit.get("module", "none")
    if module not in module_list():
        raise invalid(f"{field}.module", f"must be one of {', '.join(module_list())} (GET /controlnet/module_list), "
                                         f"not {fields.short(module)}")
    if module == "canny":
        image = _canny(unit, field, image)
    image = _fit(image, size, _resize_mode(unit, field))
    weight = _number(unit, field, "weight", 1.0, 0.0, 2.0)
    start = _number(unit, field, "guidance_start", 0.0, 0.0, 1.0)
    end_name, end = _alias(unit, field, "guidance_end", "guidance")
    end = _number({end_name: end}, field, end_name, 1.0, 0.0, 1.0)
    if start >= end:
        raise invalid(f"{field}.guidance_start", f"must be below {end_name} (got {start:g} and {end:g}); sdrt runs a "
                                                 "net over [start, end) of the schedule")
    return {"name": name, "image": image, "scale": weight, "start": start, "end": end}, _control_mode(unit, field)


def _image(unit: Mapping, field: str, ctx: ModelContext, init_image) -> Image.Image:
    key, value = _alias(unit, field, "image", "input_image")
    if isinstance(value, Mapping):  # {"image": …, "mask": …}
        if value.get("mask") not in (None, ""):
            raise invalid(f"{field}.{key}.mask", "must be null or \"\": sdrt has no ControlNet masks")
        key, value = f"{key}.image", value.get("image")
    if value in (None, ""):
        if init_image is None:
            raise invalid(f"{field}.image", "is required in txt2img: the control image (base64)")
        return init_image  # img2img: the extension uses the init image
    return fields.decode_image(f"{field}.{key}", value, ctx, "RGB")


def _number(unit: Mapping, field: str, name: str, default: float, lo: float, hi: float) -> float:
    value = unit.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise invalid(f"{field}.{name}", f"must be a number from {lo:g} to {hi:g}, not {fields.short(value)}")
    return float(value)


def _canny(unit: Mapping, field: str, image: Image.Image) -> Image.Image:
    """The extension clamps each threshold: outside 1..255 (webuiapi sends 64, the API -1) its default applies;
    OpenCV's Canny swaps low > high itself, so the pair is sorted."""
    thresholds = []
    for name, default in zip(("threshold_a", "threshold_b"), CANNY_DEFAULTS):
        value = unit.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise invalid(f"{field}.{name}", f"must be a number, not {fields.short(value)}")
        thresholds.append(int(value) if value is not None and 1 <= value <= 255 else default)
    low, high = sorted(thresholds)
    try:
        canny = preprocess.parse(f"canny:{low}:{high}")
    except InvalidRequest as e:
        raise invalid(f"{field}.module", e.message) from None
    return canny(image)


def _resize_mode(unit: Mapping, field: str) -> int:
    value = unit.get("resize_mode", 1)  # the extension's default: Crop and Resize
    names = {v: k for k, v in RESIZE_MODES.items()} | _RESIZE_ALIASES
    if isinstance(value, str) and value in names:
        return names[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in RESIZE_MODES:
        return value
    raise invalid(f"{field}.resize_mode", "must be 0/\"Just Resize\", 1/\"Crop and Resize\" or 2/\"Resize and "
                                          f"Fill\", not {fields.short(value)}")


def _control_mode(unit: Mapping, field: str) -> int:
    value = unit.get("control_mode", 0)
    names = {v: k for k, v in CONTROL_MODES.items()}
    mode = names.get(value) if isinstance(value, str) else \
        value if isinstance(value, int) and not isinstance(value, bool) and value in CONTROL_MODES else None
    if mode is None:
        raise invalid(f"{field}.control_mode", "must be 0/\"Balanced\", 1/\"My prompt is more important\" or "
                                               f"2/\"ControlNet is more important\", not {fields.short(value)}")
    if mode == 1:
        raise invalid(f"{field}.control_mode", "\"My prompt is more important\" (the extension's soft injection on "
                                               "both guidance halves) is not something sdrt does; use 0 (Balanced) "
                                               "or 2 (ControlNet is more important: diffusers' guess mode)")
    return mode


def _fit(image: Image.Image, size: tuple[int, int] | None, mode: int) -> Image.Image:
    """The extension's resize modes as a crop or a pad to the output's aspect ratio; the runtime then resizes to
    the output size (Lanczos), which is Just Resize. Crop and Resize: the centre at the output's aspect (the
    extension scales to cover, then crops the centre). Resize and Fill: centred on a canvas of the median colour of
    the image's border pixels (the extension's high_quality_background)."""
    if size is None:  # the size is not known yet (validation names a bad width or height)
        return image
    width, height = size
    w, h = image.size
    if mode == 0 or w * height == h * width:
        return image
    if mode == 1:
        if w * height > h * width:  # wider than the output
            cw = round(h * width / height)
            left = (w - cw) // 2
            return image.crop((left, 0, left + cw, h))
        ch = round(w * height / width)
        top = (h - ch) // 2
        return image.crop((0, top, w, top + ch))
    array = np.asarray(image.convert("RGB"))
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]], axis=0)
    fill = tuple(int(v) for v in np.median(border, axis=0))
    cw, ch = (round(h * width / height), h) if w * height < h * width else (w, round(w * height / width))
    canvas = Image.new("RGB", (cw, ch), fill)
    canvas.paste(image.convert("RGB"), ((cw - w) // 2, (ch - h) // 2))
    return canvas
