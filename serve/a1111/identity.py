"""The face-ID methods (InstantID, PhotoMaker, PuLID: runtime/conditioning/) in AUTOMATIC1111 bodies.

1. `alwayson_scripts` entries named after the methods (the key matched case-insensitively, as A1111 matches script
   titles), each holding one object of the Request's own fields for that method (runtime/request.py InstantId,
   PhotoMaker, Pulid; the same names as the OpenAI route's extra_body fields):
       "alwayson_scripts": {"photomaker": {"args": [{"photomaker_images": [b64, …],
                                                     "photomaker_style_strength": 30}]}}
   `{"args": [{…}]}`, `[{…}]` and the bare `{…}` are alike; `enabled: false` in the object skips it. Photos and a
   keypoint image are base64 (or data URLs) — PuLID's photo as `pulid_id: {"embedding": b64}` (alone: the whole
   identity from it; with eva_embedding and eva_hidden: its ArcFace part); embeddings, keypoints, ID tokens and InstantID's face box
   (`instantid_bbox`, with `enhance_face_region: true`) are (nested) lists of numbers.
2. InstantID as sd-webui-controlnet runs it, two ControlNet-extension units in `alwayson_scripts.controlnet.args`:
   the embedding unit (model "ip-adapter_instant_id_sdxl" or module "instant_id_face_embedding"; `weight` → the
   IP-Adapter scale) and the keypoints unit (model "control_instant_id_sdxl" or module "instant_id_face_keypoints";
   `weight` → IdentityNet's scale; both default to 1, the extension's default). The extension computes the
   embedding and the keypoints from face photos with insightface; sdrt's server does not analyse faces in units, so
   the embedding unit must carry `instantid_face` (the raw insightface embedding, [512] numbers) and the keypoints
   unit the keypoint image with module "none" (as InstantID's draw_kps makes it) or `instantid_kps` ([[x, y] × 5]
   output pixels). Each refusal is a 422 naming the unit's field.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from sdrt.runtime.request import InstantId, PhotoMaker, Pulid
from sdrt.serve import fields
from sdrt.serve.a1111.controlnet import SCRIPT, UNIT_FIELDS, _fit, _number, _resize_mode, enabled
from sdrt.serve.errors import invalid
from sdrt.serve.fields import ModelContext

# alwayson_scripts key (lower case) → the Request fields its object may hold
SCRIPT_FIELDS = {name: tuple(f.name for f in dataclasses.fields(group))
                 for name, group in (("instantid", InstantId), ("photomaker", PhotoMaker), ("pulid", Pulid))}
# the extension's InstantID models and preprocessors (sd-webui-controlnet) → the unit's role
IID_MODELS = {"ip-adapter_instant_id_sdxl": "embedding", "control_instant_id_sdxl": "keypoints"}
IID_MODULES = {"instant_id_face_embedding": "embedding", "instant_id_face_keypoints": "keypoints"}
# an InstantID unit's fields beyond the extension's: what sdrt cannot compute on the server
IID_UNIT_FIELDS = {"instantid_face": "the embedding unit's face: the raw insightface `embedding`, [512] numbers",
                   "instantid_kps": "the keypoints unit's 5 keypoints [[x, y] × 5] in output pixels (instead of "
                                    "the keypoint image)"}


def scripts_check(value, body) -> bool:
    """alwayson_scripts: null, {}, or entries of the ControlNet extension and the face-ID methods."""
    return value is None or (isinstance(value, Mapping) and all(
        isinstance(k, str) and (k.lower() == SCRIPT or k.lower() in SCRIPT_FIELDS) for k in value))


def script_fields(body: Mapping, ctx: ModelContext, names: dict) -> dict[str, Any]:
    """The face-ID entries of alwayson_scripts as the Request's flat fields; `names` learns each field's path."""
    scripts = body.get("alwayson_scripts") or {}
    flat: dict[str, Any] = {}
    for key, entry in scripts.items():
        allowed = SCRIPT_FIELDS.get(key.lower())
        if allowed is None:
            continue
        where = f"alwayson_scripts.{key}"
        obj, where = _one_object(entry, where, allowed)
        unknown = [k for k in obj if k not in allowed and k != "enabled"]
        if unknown:
            raise invalid(f"{where}.{unknown[0]}", f"is not a {key} field (unknown: {', '.join(unknown)}); it takes "
                                                   f"{', '.join(allowed)} and enabled")
        if not enabled(obj, where):
            continue
        for name, value in obj.items():
            if name == "enabled" or value is None:
                continue
            names[name] = f"{where}.{name}"
            flat[name] = _decoded(name, value, f"{where}.{name}", ctx)
    return flat


def _one_object(entry, where: str, allowed) -> tuple[Mapping, str]:
    shape = (f"must be {{\"args\": [{{…}}]}} or {{…}}: one object of {', '.join(allowed)}")
    if isinstance(entry, list):  # [obj]: "args" left out
        entry = {"args": entry}
    if isinstance(entry, Mapping) and "args" in entry:
        if set(entry) != {"args"}:
            raise invalid(where, shape)
        args = entry["args"]
        if not isinstance(args, list) or len(args) != 1 or not isinstance(args[0], Mapping):
            raise invalid(f"{where}.args", f"must be a list holding one object (one identity per request) of "
                                           f"{', '.join(allowed)}, not {fields.short(args)}")
        return args[0], f"{where}.args[0]"
    if not isinstance(entry, Mapping):
        raise invalid(where, f"{shape}, not {fields.json_type(entry)}")
    return entry, where


def _decoded(name: str, value, where: str, ctx: ModelContext):
    """Base64 photos and keypoint images → PIL (size-checked, named by their path); everything else as sent
    (validation checks it)."""
    if name == "photomaker_images":
        if isinstance(value, list):
            return tuple(fields.decode_image(f"{where}[{i}]", x, ctx, "RGB") for i, x in enumerate(value))
        return fields.decode_image(where, value, ctx, "RGB")
    if name in ("instantid_kps", "instantid_face") and isinstance(value, str):  # an image (a face photo, where the
        return fields.decode_image(where, value, ctx, "RGB")                    # runtime reads faces from photos)
    if name == "pulid_id" and isinstance(value, Mapping) and isinstance(value.get("embedding"), str):
        return {**value, "embedding": fields.decode_image(f"{where}.embedding", value["embedding"], ctx, "RGB")}
    return value


# ---- InstantID as the ControlNet extension's two units -----------------------------------------------------

def unit_role(unit) -> str | None:
    """"embedding", "keypoints" or None (not an InstantID unit), by its model (hash suffix dropped) or module."""
    if not isinstance(unit, Mapping):
        return None
    model = unit.get("model")
    name = re.sub(r"\s*\[[^\]]*\]$", "", model) if isinstance(model, str) else None
    module = unit.get("module")
    return IID_MODELS.get(name) or (IID_MODULES.get(module) if isinstance(module, str) else None)


def instantid_units(body: Mapping, ctx: ModelContext, size, names: dict) -> tuple[dict[str, Any], set[int]]:
    """The enabled InstantID units of alwayson_scripts' ControlNet entry → the Request's InstantID fields, and the
    indices of all InstantID units (serve/a1111/controlnet.py skips them)."""
    scripts = body.get("alwayson_scripts")
    key = next((k for k in scripts if k.lower() == SCRIPT), None) if isinstance(scripts, Mapping) else None
    entry = scripts[key] if key is not None else None
    units = entry if isinstance(entry, list) else entry.get("args") if isinstance(entry, Mapping) else None
    if not isinstance(units, list):
        return {}, set()  # none, or a shape control_fields refuses
    where = f"alwayson_scripts.{key}.args"
    found, taken = {}, set()
    for i, unit in enumerate(units):
        role = unit_role(unit)
        if role is None:
            continue
        taken.add(i)
        field = f"{where}[{i}]"
        if not enabled(unit, field):
            continue
        if role in found:
            raise invalid(f"{field}.model", f"is a second InstantID {role} unit; InstantID takes one face: one "
                                            "embedding unit and one keypoints unit")
        found[role] = (field, unit)
    if not found:
        return {}, taken
    for role in ("embedding", "keypoints"):
        if role not in found:
            model = next(m for m, r in IID_MODELS.items() if r == role)
            raise invalid(where, f"InstantID needs its {role} unit too (model \"{model}\"): the extension runs "
                                 "InstantID as two units, the face embedding and the face keypoints")
    flat = _embedding_unit(*found["embedding"], names)
    flat |= _keypoints_unit(*found["keypoints"], ctx, size, names)
    return flat, taken


def _common(unit: Mapping, field: str, own: str) -> None:
    allowed = {*UNIT_FIELDS, own}  # the extension's fields that do nothing here are accepted as for any unit
    unknown = [k for k in unit if k not in allowed]
    if unknown:
        raise invalid(f"{field}.{unknown[0]}", f"is not a field of an InstantID unit sdrt knows (unknown: "
                                               f"{', '.join(unknown)}); it takes {', '.join(sorted(allowed))}")
    for name in ("mask", "mask_image"):
        if unit.get(name) not in (None, ""):
            raise invalid(f"{field}.{name}", "must be null or \"\": sdrt has no ControlNet masks")
    if _number(unit, field, "guidance_start", 0.0, 0.0, 1.0) != 0.0:
        raise invalid(f"{field}.guidance_start", "must be 0: sdrt runs InstantID over the whole schedule")
    end = "guidance_end" if "guidance_end" in unit else "guidance"
    if _number(unit, field, end, 1.0, 0.0, 1.0) != 1.0:
        raise invalid(f"{field}.{end}", "must be 1: sdrt runs InstantID over the whole schedule")
    if unit.get("control_mode", 0) not in (0, "Balanced"):
        raise invalid(f"{field}.control_mode", "must be 0/\"Balanced\" for an InstantID unit")


def _embedding_unit(field: str, unit: Mapping, names: dict) -> dict[str, Any]:
    _common(unit, field, "instantid_face")
    if unit.get("instantid_face") is None:
        raise invalid(f"{field}.instantid_face", "is required: the face's raw insightface `embedding` ([512] "
                                                 "numbers); sdrt's server does not run face analysis on the unit's "
                                                 "image (the extension's instant_id_face_embedding preprocessor)")
    names |= {"instantid_face": f"{field}.instantid_face", "instantid_ip_scale": f"{field}.weight"}
    return {"instantid_face": unit["instantid_face"], "instantid_ip_scale": _number(unit, field, "weight", 1.0,
                                                                                    0.0, 2.0)}


def _keypoints_unit(field: str, unit: Mapping, ctx: ModelContext, size, names: dict) -> dict[str, Any]:
    _common(unit, field, "instantid_kps")
    scale = _number(unit, field, "weight", 1.0, 0.0, 2.0)
    names["identitynet_scale"] = f"{field}.weight"
    if unit.get("instantid_kps") is not None:
        names["instantid_kps"] = f"{field}.instantid_kps"
        return {"instantid_kps": unit["instantid_kps"], "identitynet_scale": scale}
    if unit.get("module", "none") != "none":
        raise invalid(f"{field}.module", f"{fields.short(unit.get('module'))} finds the keypoints in a face photo, "
                                         "which sdrt's server does not do; send the keypoint image (InstantID's "
                                         "draw_kps) with module \"none\", or instantid_kps ([[x, y] × 5])")
    key = "image" if unit.get("image") not in (None, "") else "input_image"
    value = unit.get(key)
    if isinstance(value, Mapping):
        key, value = f"{key}.image", value.get("image")
    if value in (None, ""):
        raise invalid(f"{field}.image", "is required: the keypoint image (base64), or give instantid_kps")
    image = fields.decode_image(f"{field}.{key}", value, ctx, "RGB")
    names["instantid_kps"] = f"{field}.{key}"
    return {"instantid_kps": _fit(image, size, _resize_mode(unit, field)), "identitynet_scale": scale}
