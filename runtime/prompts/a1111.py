"""AUTOMATIC1111's prompt syntax: attention brackets, BREAK, and 75-token chunks (reference/customization.md §2.1-2.3).

    parse_attention("a (red:1.3) [cat]")  → [("a ", 1.0), ("red", 1.3), (" ", 1.0), ("cat", 0.909…)]
    chunk(parsed, tokenize, …)            → one Chunk (77 ids + 77 multipliers) per 75 prompt tokens

Parsing: `(x)` multiplies x's weight by 1.1, `[x]` by 1/1.1, `(x:w)` by w; nesting multiplies; brackets still
open at the end apply to everything after them; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; closing
brackets without an opening one and a `:` outside `(x:w)` are plain text. `BREAK` (a whole word, upper case)
starts a new chunk. Adjacent pieces of equal weight merge.

Chunking: each piece is tokenized without BOS/EOS and without truncation, and its tokens appended to the
current chunk with the piece's weight. A chunk holds 75 tokens; when it is full it is closed (EOS-padded to
75, then wrapped as BOS + 75 + EOS, those three kinds of positions weighing 1.0). When a chunk fills up and
its last comma is at most `comma_backtrack` (20) tokens back, the tokens after that comma move to the next
chunk. BREAK closes the current chunk. A textual-inversion embedding occupies as many positions as it has
vectors and never straddles two chunks. The empty prompt is one chunk [BOS, EOS × 76].

Emphasis "Original" (`emphasize`): z ← z · m per token, then z ← z · mean(z_before) / mean(z_after), one scalar per
chunk. AUTOMATIC1111 takes that mean over its whole batch call; it encodes each prompt on its own, so here
the mean is over one prompt's chunk (which keeps an image the same alone or batched).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

CHUNK_TOKENS = 75
ROUND = 1.1
SQUARE = 1 / 1.1
BREAK = "BREAK"
COMMA_BACKTRACK = 20

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\      # escapes (a lone backslash too)
|\(|\[                          # openers
|:\s*([+-]?[.\d]+)\s*\)         # :weight)
|\)|]                           # closers
|[^\\()\[\]:]+                  # plain text
|:                              # a lone colon
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight), …]; a BREAK is the pair ("BREAK", -1.0)."""
    out: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in out[start:]:
            piece[1] *= factor

    for m in _ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        number = _number(weight)
        if part.startswith("\\"):
            out.append([part[1:], 1.0])
        elif part == "(":
            round_open.append(len(out))
        elif part == "[":
            square_open.append(len(out))
        elif number is not None and round_open:
            multiply(round_open.pop(), number)
        elif part == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif part == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, piece in enumerate(_BREAK.split(part)):
                if i:
                    out.append([BREAK, -1.0])
                out.append([piece, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    if not out:
        out = [["", 1.0]]
    merged = [out[0]]
    for piece in out[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:  # "(x:.)": not a number, so the whole "…:.)" stays text
        return None


@dataclass
class Chunk:
    """77 token ids (BOS, 75 tokens, EOS) with a multiplier each; `fixes` place embedding vectors:
    (position in the 77, name of the embedding)."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, str]] = field(default_factory=list)


# (tokens of a piece, position) → (embedding name, its vector count, tokens its name spans) or None
FindEmbedding = Callable[[Sequence[int], int], "tuple[str, int, int] | None"]


def chunk(parsed: Sequence[tuple[str, float]], tokenize: Callable[[str], list[int]], bos: int, eos: int,
          comma: int | None, find_embedding: FindEmbedding | None = None,
          comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """The chunks of one parsed prompt (at least one)."""
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        fill = CHUNK_TOKENS - len(current.ids)
        current.ids = [bos] + current.ids + [eos] * fill + [eos]
        current.weights = [1.0] + current.weights + [1.0] * fill + [1.0]
        current.fixes = [(offset + 1, name) for offset, name in current.fixes]
        chunks.append(current)
        current, last_comma = Chunk(), -1

    for text, weight in parsed:
        if text == BREAK and weight == -1.0:
            close()
            continue
        tokens = tokenize(text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(current.ids)
            elif (comma_backtrack and len(current.ids) == CHUNK_TOKENS and last_comma != -1
                  and len(current.ids) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_ids, moved_weights = current.ids[cut:], current.weights[cut:]
                moved_fixes = [(o - cut, n) for o, n in current.fixes if o >= cut]
                current.ids, current.weights = current.ids[:cut], current.weights[:cut]
                current.fixes = [(o, n) for o, n in current.fixes if o < cut]
                close()
                current.ids, current.weights, current.fixes = moved_ids, moved_weights, moved_fixes
            if len(current.ids) == CHUNK_TOKENS:
                close()
            found = find_embedding(tokens, position) if find_embedding is not None else None
            if found is None:
                current.ids.append(token)
                current.weights.append(weight)
                position += 1
                continue
            name, vectors, span = found
            if len(current.ids) + vectors > CHUNK_TOKENS:
                close()
            current.fixes.append((len(current.ids), name))
            current.ids += [0] * vectors
            current.weights += [weight] * vectors
            position += span
    if current.ids or not chunks:
        close()
    return chunks


def empty_chunk(bos: int, eos: int) -> Chunk:
    return Chunk([bos] + [eos] * (CHUNK_TOKENS + 1), [1.0] * (CHUNK_TOKENS + 2))


def pad_after_end(ids: list[int], eos: int, pad: int) -> list[int]:
    """Every position after the first EOS becomes the pad id (SD 2.x / OpenCLIP-G pad with 0, not EOS)."""
    if pad == eos or eos not in ids:
        return list(ids)
    end = ids.index(eos)
    return ids[: end + 1] + [pad] * (len(ids) - end - 1)


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """'Original' emphasis on one chunk of one prompt: z [77, C] · w [77], the chunk's mean restored."""
    if bool((weights == 1.0).all()):
        return z
    before = z.mean()
    z = z * weights.to(z.dtype)[:, None]
    return z * (before / z.mean())
