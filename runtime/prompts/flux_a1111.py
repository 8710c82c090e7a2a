"""AUTOMATIC1111's syntax on FLUX.1, as Forge's Flux engine reads it (backend/text_processing: the classic engine
for CLIP, T5TextProcessingEngine for T5), at diffusers' sequence length.

- CLIP: the prompt parsed and cut into 75-token chunks as on the UNet families (runtime/prompts/a1111.py); FLUX.1
  uses only the pooled vector, which AUTOMATIC1111/Forge take from the first chunk (its tokens unweighted: emphasis
  acts on the hidden states, not on the pooled output).
- T5: the same parse; each piece tokenized alone without </s> and weighted (Forge's T5 engine), the tokens cut to
  max_sequence_length − 1, then </s> and <pad> to max_sequence_length (FluxPipeline's length; Forge pads to at
  least 256 and never truncates); last_hidden_state through "Original" emphasis over the whole sequence (z · w per
  token, then the mean restored). BREAK has no meaning for T5's single sequence and is dropped (Forge would start
  a second sequence).
A prompt without syntax characters and at most 75 CLIP tokens gives FluxPipeline's own conditioning.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdrt.runtime.denoiser import feed
from sdrt.runtime.prompts import a1111


def t5_tokens(t5_tokenizer, parsed: Sequence[tuple[str, float]], length: int) -> tuple[list[int], list[float]]:
    """One prompt's T5 ids and multipliers, `length` long: weighted tokens (cut to fit), </s>, <pad>…."""
    tok = t5_tokenizer.tokenizer
    eos = tok.token_to_id("</s>")
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in parsed:
        if text == a1111.BREAK and weight == -1.0:
            continue
        tokens = tok.encode(text, add_special_tokens=False).ids
        ids += tokens
        weights += [weight] * len(tokens)
    ids, weights = ids[: length - 1] + [1 if eos is None else eos], weights[: length - 1] + [1.0]
    pad = length - len(ids)
    return ids + [t5_tokenizer.pad_id] * pad, weights + [1.0] * pad


def encode(clip, t5, prompts: Sequence[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 sequence [B, L, D], CLIP pooled [B, P]); `clip`/`t5`: text_conditioning.TextEncoder."""
    parsed = [a1111.parse_attention(p) for p in prompts]
    t = clip.tokenizer
    first = [a1111.chunk(p, t.tokens, t.bos_id, t.eos_id, t.token_id(",</w>"))[0] for p in parsed]
    ids = torch.tensor([a1111.pad_after_end(c.ids, t.eos_id, t.pad_id) for c in first], dtype=torch.int64)
    pooled = feed.run(clip.engine, input_ids=ids)["pooler_output"]
    rows = [t5_tokens(t5.tokenizer, p, max_sequence_length) for p in parsed]
    z = feed.run(t5.engine, input_ids=torch.tensor([r[0] for r in rows], dtype=torch.int64))["last_hidden_state"]
    sequence = torch.stack([a1111.emphasize(z[b], torch.tensor(w)) for b, (_, w) in enumerate(rows)])
    return sequence, pooled
