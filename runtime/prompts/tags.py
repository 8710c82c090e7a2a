"""AUTOMATIC1111's `<lora:NAME:SCALE>` tags inside prompts: taken out before the prompt is parsed or tokenized.

    strip_lora_tags("a castle <lora:ink_style:0.8>, detailed") → ("a castle , detailed", [("ink_style", 0.8)])

AUTOMATIC1111 removes every `<kind:args>` extra-network tag from the prompt text (modules/extra_networks.py)
and applies the networks to the whole batch; the text left behind (spaces and commas included) is what the
prompt parser sees. Only `lora` (and LyCORIS' `lyco` alias) tags are taken here: others stay in the text.
`<lora:NAME>` means scale 1. AUTOMATIC1111's separate text-encoder/UNet multipliers (`<lora:NAME:0.8:0.5>`,
`te=`, `unet=`, `dyn=`) are refused with a message: sdrt applies one scale to every component of a LoRA.
"""

from __future__ import annotations

import math
import re

TAG = re.compile(r"<(lora|lyco):([^>]*)>", re.IGNORECASE)


class TagError(ValueError):
    """A malformed tag; the message quotes it and says what would be right."""


def strip_lora_tags(text: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its LoRA tags, [(name, scale), …] in the order they appear)."""
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        found.append(_parse(match.group(0), match.group(2)))
        return ""

    return TAG.sub(take, text), found


HYPERNET_TAG = re.compile(r"<(hypernet):([^>]*)>", re.IGNORECASE)


def strip_hypernet_tags(text: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its `<hypernet:NAME[:SCALE]>` tags, [(name, scale), …]): AUTOMATIC1111 hypernetworks,
    which sdrt bakes into the UNet at export (export/extras/hypernetwork.py), so a tag can only confirm what is baked."""
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        found.append(_parse(match.group(0), match.group(2), "hypernet"))
        return ""

    return HYPERNET_TAG.sub(take, text), found


def check_hypernet_tags(texts, baked: list[dict]):
    """The texts without hypernet tags; TagError unless every tag names a hypernetwork baked into this engine
    directory at the scale it was baked with."""
    out = []
    for text in texts:
        text, tags = strip_hypernet_tags(text)
        for name, scale in tags:
            match = next((b for b in baked if b["name"] == name), None)
            if match is None or abs(float(match["scale"]) - scale) > 1e-6:
                have = ", ".join(f"<hypernet:{b['name']}:{b['scale']:g}>" for b in baked)
                raise TagError(f"<hypernet:{name}:{scale:g}> is not baked into this engine directory (hypernetworks "
                               f"are not linear, so sdrt bakes them at export; it has: {have or 'none'}); export "
                               f"with --hypernetwork FILE:SCALE to use it")
        out.append(text)
    return tuple(out)


def _parse(tag: str, body: str, kind: str = "lora") -> tuple[str, float]:
    items = [item.strip() for item in body.split(":")]
    name = items[0]
    what = "LoRA" if kind == "lora" else "hypernetwork"
    if not name:
        raise TagError(f"{tag} names no {what}; write <{kind}:NAME> or <{kind}:NAME:SCALE>")
    if len(items) == 1:
        return name, 1.0
    if len(items) > 2 or "=" in items[1]:
        raise TagError(f"{tag}: separate text-encoder/UNet multipliers are not supported; give one scale, "
                       f"as in <{kind}:{name}:0.8>")
    try:
        scale = float(items[1])
    except ValueError:
        raise TagError(f"{tag}: the scale {items[1]!r} is not a number; write e.g. <{kind}:{name}:0.8>") from None
    if not math.isfinite(scale):
        raise TagError(f"{tag}: the scale must be a finite number (got {items[1]})")
    return name, scale
