"""T5's tokenizer at run time (SD3's tokenizer_3): the `tokenizers` library over the folder's tokenizer.json.

What diffusers' StableDiffusion3Pipeline._get_t5_prompt_embeds asks of transformers' T5Tokenizer: padding to
max_length with the pad token, truncation to max_length with the post-processor's </s> kept last
(add_special_tokens=True), no attention mask. tokenizer.json holds the SentencePiece Unigram model, its normalizer,
pre-tokenizer and the "$A </s>" post-processor (reference/flow_models.md §2).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sdrt.runtime.errors import UserError

log = logging.getLogger("sdrt")


@dataclass(frozen=True)
class T5Tokenizer:
    tokenizer: object  # tokenizers.Tokenizer
    pad_id: int

    @classmethod
    def from_folder(cls, folder: str | Path) -> "T5Tokenizer":
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path} is missing; the T5 tokenizer is read from its tokenizer.json (re-export the "
                            "model, or save the tokenizer with transformers' save_pretrained)")
        tok = Tokenizer.from_file(str(path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        pad = config.get("pad_token", "<pad>")
        pad = pad.get("content", "<pad>") if isinstance(pad, dict) else pad
        pad_id = tok.token_to_id(pad)
        tok.no_padding()
        tok.no_truncation()
        return cls(tok, 0 if pad_id is None else pad_id)

    def encode(self, prompts: Sequence[str], max_length: int) -> np.ndarray:
        """ids int64 [B, max_length]: each prompt's tokens and </s>, truncated to fit, then padding."""
        ids = np.full((len(prompts), max_length), self.pad_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            full = self.tokenizer.encode(prompt).ids  # with the post-processor's </s>
            if len(full) > max_length:  # transformers' truncation: the text cut, the special token kept
                plain = self.tokenizer.encode(prompt, add_special_tokens=False).ids
                log.warning("The following part of your input was truncated because `max_sequence_length` is set "
                            "to  %d tokens: %s", max_length, self.tokenizer.decode(plain[max_length - 1:]))
                tokens = plain[: max_length - (len(full) - len(plain))] + full[len(plain):]
            else:
                tokens = full
            ids[row, : len(tokens)] = tokens
        return ids
