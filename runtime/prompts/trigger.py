"""PhotoMaker's prompt with a trigger word (reference/identity.md §2; PhotoMaker pipeline.py at 6ec44fc,
`encode_prompt_with_trigger_word` and step 4 of `__call__`), on sdrt's CLIP tokenizer.

The pipeline adds the trigger ("img") to both tokenizers as a special token (transformers' add_tokens(...,
special_tokens=True): matched in the raw text, case-sensitive, anywhere, before normalisation). Per tokenizer: the
prompt's ids with BOS/EOS, the trigger dropped, the token before it (the class word's last token) repeated K times
(K = the number of ID photos), cut or padded with the pad token to 77 with no EOS kept on a cut; the mask marks the
K class positions (the pipeline keeps the second tokenizer's). The text-only prompt of the steps before the merge
is the first tokenizer's ids without special tokens and without the trigger, decoded back to text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from tokenizers import AddedToken, Tokenizer

from sdrt.runtime.prompts.tokenizer import ClipTokenizer


class TriggerError(ValueError):
    """The prompt does not hold the trigger word exactly once after a class word; the message says so."""


@dataclass(frozen=True)
class ClassRows:
    ids: np.ndarray  # int64 [1, max_length]: the class token repeated, the trigger dropped
    mask: np.ndarray  # bool [max_length]: the repeated class positions


@lru_cache(maxsize=16)
def with_trigger(tok: ClipTokenizer, trigger: str) -> tuple[ClipTokenizer, int]:
    """A copy of `tok` that knows `trigger` as a special token, and the trigger's id."""
    clone = Tokenizer.from_str(tok.tokenizer.to_str())
    clone.add_special_tokens([AddedToken(trigger, special=True, normalized=False)])
    return replace(tok, tokenizer=clone), clone.token_to_id(trigger)


def class_rows(tok: ClipTokenizer, prompt: str, trigger: str, repeats: int) -> ClassRows:
    """The ids of `prompt` with its class token repeated `repeats` times in place of the trigger."""
    tok, trigger_id = with_trigger(tok, trigger)
    ids = tok.tokenizer.encode(prompt).ids  # BOS … EOS, uncut
    found = [i for i, t in enumerate(ids) if t == trigger_id]
    if len(found) != 1:
        raise TriggerError(f"must hold the trigger word {trigger!r} exactly once, right after the class word "
                           f"(e.g. \"a photo of a woman {trigger}\"); it holds it {len(found)} times")
    at = found[0]
    clean = ids[:at] + ids[at + 1:]
    if at < 2:  # only BOS before it: no class word
        raise TriggerError(f"the trigger word {trigger!r} must follow a class word (e.g. \"a photo of a man "
                           f"{trigger}\"), not start the prompt")
    klass = at - 1
    clean = clean[:klass] + [clean[klass]] * repeats + clean[klass + 1:]
    if klass + repeats > tok.max_length:
        raise TriggerError(f"the class word before {trigger!r} sits at token {klass}; repeated for {repeats} photo(s) "
                           f"it runs past the {tok.max_length}-token limit: move it earlier or give fewer photos")
    clean = clean[:tok.max_length] + [tok.pad_id] * max(0, tok.max_length - len(clean))
    mask = np.zeros(tok.max_length, dtype=bool)
    mask[klass:klass + repeats] = True
    return ClassRows(np.array([clean], dtype=np.int64), mask)


def text_only(tok: ClipTokenizer, prompt: str, trigger: str) -> str:
    """The prompt without the trigger: its ids (no BOS/EOS) less the trigger's, decoded (word ends → spaces)."""
    tok, trigger_id = with_trigger(tok, trigger)
    ids = tok.tokenizer.encode(prompt, add_special_tokens=False).ids
    if trigger_id in ids:
        ids.remove(trigger_id)
    text = tok.tokenizer.decode(ids, skip_special_tokens=False)
    return text.replace("</w>", " ").strip()
