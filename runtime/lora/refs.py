"""Naming LoRAs: paths and the LoRA folder, the request's LoRAs (its own and `<lora:NAME:SCALE>` prompt tags),
and the sets engines are keyed by."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.lora.files import (LoraError, LoraRef, Model, check_scale, file_sha256, match, normalize_entries,
    read_header)
from sdrt.runtime.lora.weights import model_for


# ---- naming LoRAs: paths and the LoRA folder -------------------------------------------------------------

def available(lora_dir: Path | None) -> dict[str, Path]:
    """stem → file for every .safetensors under the LoRA folder (sub-folders included; first found wins)."""
    if lora_dir is None or not Path(lora_dir).is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(Path(lora_dir).rglob("*.safetensors")):
        found.setdefault(path.stem, path)
    return found


def locate(name: str, lora_dir: Path | None) -> Path:
    """A LoRA named by path, or by name in the LoRA folder; LoraError naming what the folder has otherwise."""
    if lora_dir is not None:
        named = available(lora_dir)
        if name in named:
            return named[name].absolute()
        if name.endswith(".safetensors") and Path(name).stem in named and os.sep not in name:
            return named[Path(name).stem].absolute()
    path = Path(name).expanduser()
    if path.is_file():
        return path.absolute()
    if lora_dir is None:
        raise LoraError(f"{name!r} is not a file, and no LoRA folder was given to look names up in")
    names = sorted(available(lora_dir))
    listing = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
    raise LoraError(f"no LoRA named {name!r} in {lora_dir}; it has: {listing or 'no .safetensors files'}")


def resolve(entries: Sequence[tuple[str, float]], model: Model, lora_dir: Path | None) -> tuple[LoraRef, ...]:
    """(name or path, scale) pairs → LoraRefs, each file checked against the model (LoraError otherwise)."""
    refs, seen = [], {}
    for name, scale in entries:
        scale = check_scale(scale, name)
        path = locate(name, lora_dir)
        modules = match(read_header(path), model)
        sha = file_sha256(path)
        if sha in seen:
            raise LoraError(f"{name!r} is named twice (also as {seen[sha]!r}); name each LoRA once")
        seen[sha] = name
        refs.append(LoraRef(name, str(path), sha, scale, tuple(sorted({m.component for m in modules}))))
    return tuple(refs)


def combine(base: Sequence[LoraRef], extra: Sequence[LoraRef]) -> tuple[LoraRef, ...]:
    """The pipeline's resident set with a request's set on top (a request's scale replaces the resident one
    for the same file); LoRAs of scale 0 change nothing and are left out."""
    extra_by_sha = {r.sha256: r for r in extra}
    merged = [extra_by_sha.pop(r.sha256, r) for r in base] + [r for r in extra if r.sha256 in extra_by_sha]
    return tuple(r for r in merged if r.scale != 0)


def touching(refs: Sequence[LoraRef], component: str) -> tuple[LoraRef, ...]:
    return tuple(r for r in refs if component in r.components and r.scale != 0)


def set_key(refs: Sequence[LoraRef], component: str) -> tuple:
    return tuple(r.key for r in touching(refs, component))


# ---- the request's side (called by runtime/validate.py) --------------------------------------------------

def request_loras(request, prompts: tuple[str, ...], negative: tuple[str, ...] | None, model_dir,
                  lora_dir: Path | None):
    """(prompts and negative prompts without their <lora:…> tags, the request's resolved LoRAs).

    The set is the request's `loras` followed by the tags of its prompts (AUTOMATIC1111 applies a prompt's
    tags to the whole batch): every prompt of a request must carry the same tags. Raises InvalidRequest."""
    from sdrt.runtime.prompts.tags import TagError, strip_lora_tags

    adapters = getattr(request, "adapters", None)
    try:
        entries = normalize_entries(getattr(adapters, "loras", ()) if adapters is not None else ())
    except LoraError as e:
        raise InvalidRequest("loras", str(e)) from None

    def strip(field_name: str, text: str):
        try:
            return strip_lora_tags(text)
        except TagError as e:
            raise InvalidRequest(field_name, str(e)) from None

    stripped_prompts, per_prompt = zip(*(strip("prompt", t) for t in prompts)) if prompts else ((), ())
    if any(t != per_prompt[0] for t in per_prompt):
        raise InvalidRequest("prompt", "every prompt of one request must carry the same <lora:…> tags (they apply "
                                       "to the whole request); split it into requests")
    tags = list(per_prompt[0]) if per_prompt else []
    stripped_negative = None
    if negative is not None:  # tags in negative prompts apply too, as in AUTOMATIC1111
        stripped_negative, per_negative = zip(*(strip("negative_prompt", t) for t in negative))
        tags += [t for found in per_negative for t in found if t not in tags]
    if not entries and not tags:
        return prompts, negative, ()
    try:
        model = model_for(model_dir)
    except LoraError as e:
        raise InvalidRequest("loras" if entries else "prompt", str(e)) from None
    refs = []
    for field_name, items in (("loras", entries), ("prompt", tags)):
        if field_name == "prompt" and lora_dir is None and items:
            raise InvalidRequest("prompt", f"<lora:{items[0][0]}> names a LoRA, but no LoRA folder was given to "
                                           "look names up in")
        try:
            refs.extend(resolve(items, model, lora_dir))
        except LoraError as e:
            raise InvalidRequest(field_name, str(e)) from None
    shas = [r.sha256 for r in refs]
    if len(set(shas)) != len(shas):
        twice = next(r.name for r in refs if shas.count(r.sha256) > 1)
        raise InvalidRequest("loras", f"{twice!r} is named twice (in loras and in a <lora:…> tag); name it once")
    return tuple(stripped_prompts), (tuple(stripped_negative) if negative is not None else None), tuple(refs)


def resolve_at_load(engine_dir, loras, lora_dir) -> tuple[LoraRef, ...]:
    """Pipeline.load's `loras` resolved and checked against the model (InvalidRequest("loras", …) otherwise)."""

    if not loras:
        return ()
    try:
        return resolve(normalize_entries(loras), model_for(engine_dir), Path(lora_dir) if lora_dir else None)
    except LoraError as e:
        raise InvalidRequest("loras", str(e)) from None
