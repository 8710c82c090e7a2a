"""CLIP tokenization on the `tokenizers` library, giving the ids transformers' CLIPTokenizer gives.

Reference: transformers 5.x `CLIPTokenizer` (models/clip/tokenization_clip.py), which is itself a `tokenizers`
pipeline: NFC, whitespace runs → one space, lower case; CLIP's split pattern (letters runs, one digit at a
time, punctuation runs, 's 't 're 've 'm 'll 'd); byte-level BPE with "</w>" word ends; <|startoftext|> … <|endoftext|>.
transformers 5 has no ftfy path at all (ftfy is never imported) and does not unescape HTML entities, so
"&amp;" stays four tokens' worth of text; the same holds here. (transformers 4's slow CLIPTokenizer, which
diffusers used under 4.x, ran ftfy.fix_text when ftfy was installed and BERT's BasicTokenizer otherwise; ids
can differ from 5.x for HTML entities, CJK and control characters. sdrt matches 5.x.)

Like transformers, the folder's special tokens (bos, eos, unk, pad) are added tokens matched in the raw text
before normalization: with SDXL's tokenizer_2 (pad "!") every "!" in a prompt is the single pad-token id.
Calls pad to 77 with the pad token (SD: <|endoftext|>, SDXL's tokenizer_2: "!") and truncate like diffusers'
calls (padding="max_length", max_length=tokenizer.model_max_length, truncation=True).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from sdrt.runtime.errors import UserError

MAX_LENGTH = 77
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_UNSET_LENGTH = 10**6  # transformers writes int(1e30) for "no limit"; anything this large means unset


class TokenizerError(UserError):
    """A tokenizer folder that is missing, incomplete or damaged; the message names the file."""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); the tokenizer folder is damaged") from None


def _settings(folder: Path) -> dict:
    """Special tokens and model_max_length; special_tokens_map.json overrides tokenizer_config.json."""
    merged = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = _read_json(path)
        if not isinstance(data, dict):
            raise TokenizerError(f"{path} is not a JSON object; the tokenizer folder is damaged")
        for key in (*_SPECIAL_KEYS, "model_max_length"):
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value  # {"content": ...} or a plain str
            if value is not None:
                merged[key] = value
    return merged


def _from_vocab(folder: Path, unk: str) -> Tokenizer:
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise TokenizerError(f"{folder} has no tokenizer.json and no {path.name}; the tokenizer folder is "
                                 "incomplete")
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{vocab_path} is not a token → id map; the tokenizer folder is damaged")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{merges_path} is not UTF-8 text ({e}); the tokenizer folder is damaged") from None
    merges = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#version"):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise TokenizerError(f"{merges_path} line {number} is not a pair of tokens: {line[:60]!r}")
        merges.append(tuple(pair))
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, continuing_subword_prefix="",
                         end_of_word_suffix="</w>", fuse_unk=False)
    except Exception as e:  # tokenizers raises a plain Exception, e.g. a merge of tokens not in the vocabulary
        raise TokenizerError(f"{merges_path} does not fit {vocab_path.name} ({e})") from None
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _from_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception on malformed files
        raise TokenizerError(f"{path} cannot be read ({str(e)[:200]}); the tokenizer folder is damaged") from None


@dataclass(frozen=True)
class ClipTokenizer:
    """Prompts → int64 ids [B, max_length]: BOS, tokens, EOS, then pad; longer prompts are truncated."""

    tokenizer: Tokenizer  # padding and truncation off; encode() does both
    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int = MAX_LENGTH

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClipTokenizer:
        """A diffusers tokenizer folder: tokenizer.json if present, else vocab.json + merges.txt.

        Special tokens and model_max_length come from tokenizer_config.json / special_tokens_map.json
        (CLIP's defaults where absent); max_length is model_max_length capped at 77.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerError(f"{folder} is missing; the engine directory needs its tokenizer folder")
        settings = _settings(folder)
        bos = settings.get("bos_token", "<|startoftext|>")
        eos = settings.get("eos_token", "<|endoftext|>")
        pad = settings.get("pad_token", eos)
        unk = settings.get("unk_token", eos)
        has_json = (folder / "tokenizer.json").is_file()
        tok = _from_json(folder / "tokenizer.json") if has_json else _from_vocab(folder, unk)
        source = folder / ("tokenizer.json" if has_json else "vocab.json")
        ids = {}
        for role, token in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
            ids[role] = tok.token_to_id(token)
            if ids[role] is None:
                raise TokenizerError(f"{source} has no {role} token {token!r}; the tokenizer folder is damaged")
        # transformers adds the special tokens of the config as added tokens even when tokenizer.json lacks them
        specials = dict.fromkeys((bos, eos, unk, pad))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tok.post_processor = processors.RobertaProcessing((eos, ids["eos"]), (bos, ids["bos"]),
                                                          trim_offsets=False, add_prefix_space=False)
        tok.no_padding()
        tok.no_truncation()
        length = settings.get("model_max_length", MAX_LENGTH)
        if not isinstance(length, (int, float)) or length < 2:
            raise TokenizerError(f"{folder / 'tokenizer_config.json'}: model_max_length {length!r} is not a length")
        length = MAX_LENGTH if length >= _UNSET_LENGTH else min(int(length), MAX_LENGTH)
        return cls(tok, ids["bos"], ids["eos"], ids["pad"], length)

    def tokens(self, text: str) -> list[int]:
        """The ids of `text` alone: no BOS/EOS, no truncation (what prompt-syntax chunking appends)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_text(self, token_id: int) -> str | None:
        """The vocabulary entry of an id (",</w>"), None if there is none."""
        return self.tokenizer.id_to_token(token_id)

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)

    def with_added(self, tokens: Sequence[str]) -> ClipTokenizer:
        """A copy that also knows `tokens`, as transformers' add_tokens makes them (diffusers'
        load_textual_inversion): new ids after the vocabulary, matched anywhere in the lower-cased text."""
        clone = Tokenizer.from_str(self.tokenizer.to_str())
        clone.add_tokens([AddedToken(t, normalized=True) for t in tokens])
        return replace(self, tokenizer=clone)

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """ids int64 [B, max_length] and, per prompt, the text truncation dropped ("" when nothing was).

        The dropped text is what diffusers prints in its warning ("The following part of your input was
        truncated because CLIP can only handle sequences up to 77 tokens: ..."): the tokens between the
        kept ones and the EOS, decoded as transformers' batch_decode does.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode takes a list of prompt strings")
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        dropped = []
        for row, prompt in enumerate(prompts):
            tokens = self.tokenizer.encode(prompt).ids  # one at a time: no tokenizers thread pool, no fork warning
            if len(tokens) > self.max_length:  # keep BOS + the first max_length-2 tokens + EOS, as truncation=True does
                text = self.tokenizer.decode(tokens[self.max_length - 1:-1], skip_special_tokens=False)
                dropped.append(text.replace("</w>", " ").strip())
                tokens = tokens[: self.max_length - 1] + [self.eos_id]
            else:
                dropped.append("")
            ids[row, : len(tokens)] = tokens
        return ids, dropped
