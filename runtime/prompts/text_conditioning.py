"""Prompt → the UNet's conditioning, per family (reference/fewstep_perf.md §1.5).

SD 1.x/2.x: the text encoder's last_hidden_state (diffusers ships SD 2.x's OpenCLIP with the last layer
removed, so its last state is the "penultimate" layer). SDXL: each encoder's hidden_states[-2] (no final
layer norm) concatenated on the channel axis, pooled `text_embeds` from encoder 2, and time ids.
Prompt syntax, long prompts and clip skip change which states and how many chunks: runtime/prompts/encode.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdrt.runtime.family import Family
from sdrt.runtime.prompts.encode import Encoder, TextOptions, encode


@dataclass(frozen=True)
class Conditioning:
    embeds: torch.Tensor  # [N, 77·k, C]; with guidance [2N, 77·k, C], uncond first
    pooled: torch.Tensor | None = None  # SDXL: [N(·2), P]
    time_ids: torch.Tensor | None = None  # SDXL: [N(·2), 6] base, [N(·2), 5] refiner


@dataclass(frozen=True)
class TextEncoder:
    tokenizer: object  # sdrt.runtime.prompts.tokenizer.ClipTokenizer
    engine: object  # Engine with input_ids → last_hidden_state, pooler_output|text_embeds, hidden_states.N
    folder: object = None  # the encoder's folder in the engine directory (clip skip reads its final layer norm)
    variant: object = None  # () → its inputs_embeds variant engine (textual inversion), None where there is none


def repeat_per_image(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, ...] → [B·n, ...] with each prompt's copies adjacent, as diffusers' repeat(1, n, 1).view(B·n, ...)."""
    return x.repeat_interleave(n, dim=0)


@dataclass(frozen=True)
class SdxlSizes:
    original: tuple[int, int]  # (height, width)
    crop: tuple[int, int]  # (top, left)
    target: tuple[int, int]
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


def time_ids(sizes: SdxlSizes, refiner: bool, negative: bool = False) -> torch.Tensor:
    """[6] = orig ‖ crop ‖ target (base); [5] = orig ‖ crop ‖ aesthetic score (refiner)."""
    if refiner:
        score = sizes.negative_aesthetic_score if negative else sizes.aesthetic_score
        values = [*sizes.original, *sizes.crop, score]
    else:
        values = [*sizes.original, *sizes.crop, *sizes.target]
    return torch.tensor([values], dtype=torch.float32)


def condition(family: Family, encoders: list[TextEncoder], prompts: list[str], negative: list[str] | None,
              per_prompt: int, guided: bool, force_zeros_for_empty_prompt: bool, sizes: SdxlSizes | None,
              text: TextOptions | None = None) -> Conditioning:
    """Everything the UNet needs besides the latents, for N = len(prompts)·per_prompt images.

    `text` chooses the prompt syntax, clip skip and chunk count (runtime/prompts/encode.py); None: plain,
    diffusers' encoding."""
    text = text if text is not None else TextOptions(syntax="plain")
    views = [Encoder(e.tokenizer, e.engine, family, e.folder, e.variant, text.embeddings, i)
             for i, e in enumerate(encoders)]
    texts = encode(family, views, prompts, negative, guided, force_zeros_for_empty_prompt, text)
    embeds = repeat_per_image(texts.positive, per_prompt)
    if family in (Family.SD15, Family.SD21):
        if guided:
            embeds = torch.cat([repeat_per_image(texts.negative, per_prompt), embeds])
        return Conditioning(embeds)

    refiner = family == Family.SDXL_REFINER
    pooled = repeat_per_image(texts.pooled, per_prompt)
    n = embeds.shape[0]
    ids = time_ids(sizes, refiner)
    if guided:
        embeds = torch.cat([repeat_per_image(texts.negative, per_prompt), embeds])
        pooled = torch.cat([repeat_per_image(texts.negative_pooled, per_prompt), pooled])
        # diffusers concatenates [neg, pos] and *then* repeats N times, so for N > 1 the rows alternate
        # neg, pos, neg, pos… while the embeddings are [neg×N, pos×N]. Reproduced for parity; it only
        # matters where neg ≠ pos (the refiner's aesthetic scores).
        ids = torch.cat([time_ids(sizes, refiner, negative=True), ids])
    return Conditioning(embeds, pooled, ids.repeat(n, 1))
