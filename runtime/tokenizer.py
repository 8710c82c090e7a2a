"""CLIP tokenization on the `tokenizers` library, giving the ids transformers' CLIPTokenizer gives.

Built from a tokenizer folder's tokenizer.json when present, else from vocab.json + merges.txt with the
same pipeline transformers builds for CLIP (NFC, whitespace collapsed, lower case; CLIP's split pattern;
byte-level BPE with "</w>" word ends; <|startoftext|> … <|endoftext|>). Calls pad to 77 with the folder's
pad token (SD: <|endoftext|>, SDXL's tokenizer_2: "!") and truncate like diffusers' calls
(padding="max_length", max_length=77, truncation=True).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .errors import UserError

MAX_LENGTH = 77
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TokenizerError(UserError):
    pass


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _special_tokens(folder: Path) -> dict:
    merged = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.exists():
            try:
                merged |= {k: _token_text(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()
                           if k in ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length")}
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{path} is not valid JSON ({e})") from None
    return merged


def _from_vocab(folder: Path, bos: str, eos: str, unk: str, specials: list[str]) -> Tokenizer:
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise TokenizerError(f"{folder} has no tokenizer.json and no {Path(e.filename).name}; the tokenizer "
                             "folder is incomplete") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{folder / 'vocab.json'} is not valid JSON ({e})") from None
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    # transformers registers the special tokens as added tokens, so they are matched in the raw text
    # (an "!" in a prompt becomes the "!" pad token of SDXL's tokenizer_2, "<|endoftext|>" the EOS).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
    tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]),
                                                      add_prefix_space=False, trim_offsets=False)
    return tok


@dataclass(frozen=True)
class ClipTokenizer:
    tokenizer: Tokenizer
    pad_id: int
    eos_id: int
    max_length: int = MAX_LENGTH

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ClipTokenizer":
        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerError(f"{folder} is missing; the engine directory needs its tokenizer folder")
        special = _special_tokens(folder)
        bos = special.get("bos_token") or "<|startoftext|>"
        eos = special.get("eos_token") or "<|endoftext|>"
        unk = special.get("unk_token") or eos
        if (folder / "tokenizer.json").exists():
            try:
                tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a plain Exception on malformed files
                raise TokenizerError(f"{folder / 'tokenizer.json'} cannot be read ({e})") from None
        else:
            specials = [bos, eos, unk, special.get("pad_token") or eos]
            tok = _from_vocab(folder, bos, eos, unk, specials)
        tok.no_padding()
        tok.no_truncation()
        pad = special.get("pad_token") or eos
        ids = [tok.token_to_id(t) for t in (pad, eos)]
        if None in ids:
            raise TokenizerError(f"{folder}: the pad/eos tokens {pad!r}/{eos!r} are not in the vocabulary")
        max_length = int(special.get("model_max_length") or MAX_LENGTH)
        return cls(tok, ids[0], ids[1], min(max_length, MAX_LENGTH))

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, list[str]]:
        """ids int64 [B, 77] and, per prompt, the text dropped by truncation ("" when none)."""
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        dropped = []
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(prompts))):
            tokens = encoding.ids
            if len(tokens) > self.max_length:  # keep BOS + the first 75 tokens + EOS, as truncation=True does
                text = self.tokenizer.decode(tokens[self.max_length - 1:-1])
                dropped.append(" ".join(text.replace("</w>", " ").split()))
                tokens = tokens[: self.max_length - 1] + [self.eos_id]
            else:
                dropped.append("")
            ids[row, : len(tokens)] = tokens
        return ids, dropped
