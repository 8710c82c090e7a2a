"""compel's syntax on FLUX.1, as compel 2.5's CompelForFlux encodes it (compel/convenience_wrappers.py).

CompelForFlux runs two Compel objects:
- CLIP (text_encoder), ReturnedEmbeddingsType.POOLED: the pooled vector of the prompt's fragments joined by a space
  (the syntax stripped, the weights not applied: compel's EmbeddingsProvider leaves POOLED unweighted), tokenized
  with truncation and padding to 77 as diffusers does → pooler_output.
- T5 (text_encoder_2), compel's defaults with truncate_long_prompts=True: one chunk of the tokenizer's
  model_max_length (512 for FLUX.1, FluxPipeline's max_sequence_length default; sdrt uses the request's
  max_sequence_length) holding the fragments' tokens (each fragment tokenized alone, no start marker; cut to fit)
  + </s> + <pad>…, no attention mask (compel's padding mask value is 1: every position attends, as FluxPipeline's
  T5 call); last_hidden_state weighted by compel's rule against the encoded empty prompt ([</s>, <pad>…]).
Down-weighting (w < 1) blends in the prompt encoded without the fragment (DownweightMode.REMOVE, as sdrt does for
CLIP; the exported T5 takes no attention mask, so compel's default MASK mode is not reproduced).
`.blend()` and `.and()` are refused: CompelForFlux stacks one pooled vector per blended or conjoined prompt, which
FluxPipeline cannot take, so there is no reference to follow.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdrt.runtime.denoiser import feed
from sdrt.runtime.prompts import compel as prompt_compel


def parse(text: str) -> prompt_compel.Conjunction:
    """compel's parse, limited to what CompelForFlux can encode (PromptSyntaxError otherwise)."""
    conjunction = prompt_compel.parse(text)
    if len(conjunction.parts) > 1 or any(w != 1 for w in conjunction.weights) or \
            any(isinstance(p, prompt_compel.Blend) for p in conjunction.parts):
        raise prompt_compel.PromptSyntaxError(
            "compel's .blend() and .and() are not supported on FLUX.1 (compel's CompelForFlux returns one pooled "
            "CLIP vector per blended prompt); use weights such as word++ or (words)0.8")
    return conjunction


def fragments(conjunction: prompt_compel.Conjunction) -> tuple:
    return conjunction.parts[0] if conjunction.parts else (prompt_compel.Fragment(""),)


def t5_vocabulary(t5_tokenizer, length: int) -> prompt_compel.Vocabulary:
    """sdrt's T5Tokenizer (runtime/prompts/t5_tokenizer.py) as compel sees transformers' T5 tokenizer."""
    tok = t5_tokenizer.tokenizer
    eos = tok.token_to_id("</s>")
    return prompt_compel.Vocabulary(lambda text: tok.encode(text, add_special_tokens=False).ids,
                                    lambda i: tok.id_to_token(i) or "", None, 1 if eos is None else eos,
                                    t5_tokenizer.pad_id, length=length, truncate=True)


def encode(clip, t5, prompts: Sequence[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 sequence [B, L, D], CLIP pooled [B, P]) for compel prompts; `clip`/`t5`: text_conditioning.TextEncoder."""
    conjunctions = [parse(p) for p in prompts]
    texts = [" ".join(f.text for f in fragments(c)) for c in conjunctions]
    ids, _ = clip.tokenizer.encode(texts)
    pooled = feed.run(clip.engine, input_ids=torch.from_numpy(ids))["pooler_output"]
    embedder = prompt_compel.Embedder(
        t5_vocabulary(t5.tokenizer, max_sequence_length),
        lambda rows: feed.run(t5.engine, input_ids=torch.tensor(rows, dtype=torch.int64))["last_hidden_state"])
    sequence = torch.stack([embedder.flattened(fragments(c)) for c in conjunctions])
    return sequence, pooled
