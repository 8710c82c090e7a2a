"""Prompt → the UNet's conditioning, per family (reference/fewstep_perf.md §1.5).

SD 1.x/2.x: the text encoder's last_hidden_state (diffusers ships SD 2.x's OpenCLIP with the last layer
removed, so its last state is the "penultimate" layer). SDXL: each encoder's hidden_states[-2] (no final
layer norm) concatenated on the channel axis, pooled `text_embeds` from encoder 2, and time ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import feed
from .family import Family

log = logging.getLogger("sdrt")


@dataclass(frozen=True)
class Conditioning:
    embeds: torch.Tensor  # [N, 77, C]; with guidance [2N, 77, C], uncond first
    pooled: torch.Tensor | None = None  # SDXL: [N(·2), P]
    time_ids: torch.Tensor | None = None  # SDXL: [N(·2), 6] base, [N(·2), 5] refiner


@dataclass(frozen=True)
class TextEncoder:
    tokenizer: object  # sdrt.runtime.tokenizer.ClipTokenizer
    engine: object  # Engine with input_ids → last_hidden_state, pooler_output|text_embeds, hidden_states.N


def _tokens(tokenizer, prompts: list[str]) -> torch.Tensor:
    ids, truncated = tokenizer.encode(prompts)
    for dropped in truncated:
        if dropped:
            log.warning("The following part of your input was truncated because CLIP can only handle sequences "
                        "up to 77 tokens: %s", dropped)
    return torch.from_numpy(ids).long()


def _penultimate_name(engine) -> str:
    layers = [int(n.split(".")[1]) for n in engine.outputs if n.startswith("hidden_states.")]
    if not layers:
        raise ValueError("this text encoder exports no hidden_states.N outputs; SDXL needs the penultimate layer")
    return f"hidden_states.{max(layers) - 1}"


def encode_sd(encoder: TextEncoder, prompts: list[str]) -> torch.Tensor:
    """[N, 77, C] last_hidden_state."""
    return feed.run(encoder.engine, input_ids=_tokens(encoder.tokenizer, prompts))["last_hidden_state"]


def encode_sdxl(encoders: list[TextEncoder], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, 77, ΣC] penultimate states, [N, P] pooled text_embeds of the last encoder)."""
    states, pooled = [], None
    for enc in encoders:
        out = feed.run(enc.engine, input_ids=_tokens(enc.tokenizer, prompts))
        states.append(out[_penultimate_name(enc.engine)])
        if "text_embeds" in out:
            pooled = out["text_embeds"]
    return torch.cat(states, dim=-1), pooled


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
              per_prompt: int, guided: bool, force_zeros_for_empty_prompt: bool, sizes: SdxlSizes | None) -> Conditioning:
    """Everything the UNet needs besides the latents, for N = len(prompts)·per_prompt images."""
    if family in (Family.SD15, Family.SD21):
        embeds = repeat_per_image(encode_sd(encoders[0], prompts), per_prompt)
        if guided:
            uncond = encode_sd(encoders[0], negative if negative is not None else [""] * len(prompts))
            embeds = torch.cat([repeat_per_image(uncond, per_prompt), embeds])
        return Conditioning(embeds)

    refiner = family == Family.SDXL_REFINER
    embeds, pooled = encode_sdxl(encoders, prompts)
    embeds, pooled = repeat_per_image(embeds, per_prompt), repeat_per_image(pooled, per_prompt)
    n = embeds.shape[0]
    ids = time_ids(sizes, refiner)
    if guided:
        if negative is None and force_zeros_for_empty_prompt:
            neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            neg_embeds, neg_pooled = encode_sdxl(encoders, negative if negative is not None else [""] * len(prompts))
            neg_embeds, neg_pooled = repeat_per_image(neg_embeds, per_prompt), repeat_per_image(neg_pooled, per_prompt)
        embeds = torch.cat([neg_embeds, embeds])
        pooled = torch.cat([neg_pooled, pooled])
        # diffusers concatenates [neg, pos] and *then* repeats N times, so for N > 1 the rows alternate
        # neg, pos, neg, pos… while the embeddings are [neg×N, pos×N]. Reproduced for parity; it only
        # matters where neg ≠ pos (the refiner's aesthetic scores).
        ids = torch.cat([time_ids(sizes, refiner, negative=True), ids])
    return Conditioning(embeds, pooled, ids.repeat(n, 1))
