"""Prompt → the UNet's conditioning, per family (reference/fewstep_perf.md §1.5).

SD 1.x/2.x: the text encoder's last_hidden_state (diffusers ships SD 2.x's OpenCLIP with the last layer
removed, so its last state is the "penultimate" layer). SDXL: each encoder's hidden_states[-2] (no final
layer norm) concatenated on the channel axis, pooled `text_embeds` from encoder 2, and time ids.
Prompt syntax, long prompts and clip skip change which states and how many chunks: runtime/prompts/encode.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sdrt.runtime.family import Family
from sdrt.runtime.denoiser import feed
from sdrt.runtime.prompts import flux_a1111, flux_compel
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
    if family == Family.FLUX:
        return flux_condition(encoders, prompts, per_prompt, text.max_sequence_length if text is not None else 512,
                              text.syntax if text is not None else "plain")
    if family == Family.SD3:
        return sd3_condition(encoders, prompts, negative, per_prompt, guided,
                             text.max_sequence_length if text is not None else SD3_MAX_SEQUENCE_LENGTH)
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


def flux_condition(encoders: list[TextEncoder], prompts: list[str], per_prompt: int,
                   max_sequence_length: int = 512, syntax: str = "plain") -> Conditioning:
    """FLUX.1's FluxPipeline.encode_prompt (prompt_2 = prompt): CLIP's pooler_output [N, P] from the prompt padded
    to 77, T5's last_hidden_state [N, L, D] from the prompt padded (and truncated, </s> kept) to
    max_sequence_length; each prompt's rows repeated per image. `a1111`: Forge's reading
    (runtime/prompts/flux_a1111.py); `compel`: compel's CompelForFlux (runtime/prompts/flux_compel.py); `plain`:
    no syntax, no embeddings."""
    clip, t5 = encoders
    if syntax in ("a1111", "compel"):
        run = flux_a1111.encode if syntax == "a1111" else flux_compel.encode
        sequence, pooled = run(clip, t5, prompts, max_sequence_length)
        return Conditioning(repeat_per_image(sequence, per_prompt), repeat_per_image(pooled, per_prompt))
    ids, _ = clip.tokenizer.encode(prompts)
    pooled = feed.run(clip.engine, input_ids=torch.from_numpy(ids))["pooler_output"]
    sequence = feed.run(t5.engine, input_ids=torch.from_numpy(t5.tokenizer.encode(prompts, max_sequence_length)))
    return Conditioning(repeat_per_image(sequence["last_hidden_state"], per_prompt),
                        repeat_per_image(pooled, per_prompt))


SD3_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length default


def sd3_texts(encoders: list[TextEncoder], texts: list[str], max_sequence_length: int,
              joint_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """StableDiffusion3Pipeline.encode_prompt for one list of texts (prompt_2 = prompt_3 = prompt, no clip skip):
    CLIP-L's and CLIP-G's hidden_states[-2] (77 tokens each, padded and truncated) side by side on the channel
    axis, zero-padded to T5's width, then T5's last_hidden_state (max_sequence_length tokens) after them on the
    token axis → [B, 77 + L, D]; pooled = the two text_embeds side by side [B, P]. Without T5 (text_encoder_3 not
    in the directory, as diffusers with text_encoder_3=None) zeros of `joint_dim` stand in for its sequence."""
    clip, t5 = encoders[:2], (encoders[2] if len(encoders) > 2 else None)
    states, pooled = [], []
    for enc in clip:
        ids, _ = enc.tokenizer.encode(texts)
        out = feed.run(enc.engine, input_ids=torch.from_numpy(ids))
        layers = max(int(n.split(".")[1]) for n in out if n.startswith("hidden_states."))
        states.append(out[f"hidden_states.{layers - 1}"])  # hidden_states[-2]
        pooled.append(out["text_embeds"])
    clip_states = torch.cat(states, dim=-1)
    if t5 is not None:
        ids = t5.tokenizer.encode(texts, max_sequence_length)
        sequence = feed.run(t5.engine, input_ids=torch.from_numpy(ids))["last_hidden_state"]
    else:
        sequence = torch.zeros(len(texts), max_sequence_length, joint_dim or clip_states.shape[-1])
    clip_states = torch.nn.functional.pad(clip_states, (0, sequence.shape[-1] - clip_states.shape[-1]))
    return torch.cat([clip_states, sequence], dim=-2), torch.cat(pooled, dim=-1)


def sd3_condition(encoders: list[TextEncoder], prompts: list[str], negative: list[str] | None, per_prompt: int,
                  guided: bool, max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH,
                  joint_dim: int | None = None) -> Conditioning:
    """SD3's conditioning for N = len(prompts)·per_prompt images: [N(·2), 77 + L, D] and pooled [N(·2), P], the
    negative half first with guidance; a missing negative prompt is "" encoded (not zeros), as diffusers does."""
    if len(encoders) < 3 and joint_dim is None and encoders[0].folder is not None:  # no T5: its width from the
        import json  # transformer's config beside the encoders

        config = Path(encoders[0].folder).parent / "transformer" / "config.json"
        joint_dim = int(json.loads(config.read_text())["joint_attention_dim"])
    embeds, pooled = sd3_texts(encoders, prompts, max_sequence_length, joint_dim)
    embeds, pooled = repeat_per_image(embeds, per_prompt), repeat_per_image(pooled, per_prompt)
    if guided:
        neg, neg_pooled = sd3_texts(encoders, negative if negative is not None else [""] * len(prompts),
                                    max_sequence_length, joint_dim)
        embeds = torch.cat([repeat_per_image(neg, per_prompt), embeds])
        pooled = torch.cat([repeat_per_image(neg_pooled, per_prompt), pooled])
    return Conditioning(embeds, pooled)
