"""compel's prompt syntax and embedding rules, without compel (reference/customization.md §2.5; compel 2.x).

Syntax (compel's `doc/syntax.md`): `word+` / `word-` (and `++`, `---`, …: each + multiplies by 1.1, each - by 0.9),
`(several words)+`, `(words)1.3`, `"quoted words"1.3`, `word.attend(1.3)`; nesting multiplies; plain parentheses
only group. `("a", "b").blend(0.7, 0.3[, no_normalize])` is a weighted sum of the separately encoded prompts;
`("a", "b").and([w…])` concatenates them along the token axis (w ≠ 1: empty + (c − empty)·w). A comma directly
followed by a non-space gets a space. `.swap()` (cross-attention control) and `withLora()` are not supported.

Embedding (compel's EmbeddingsProvider with CompelForSD/CompelForSDXL's settings): the fragments' tokens are
concatenated and cut into chunks of at most 75 tokens, each cut at the last sentence end ('.') within the 75,
else the last phrase end (. , ; :), else the last word end, else at 75; each chunk is BOS + tokens + EOS + pad.
Per chunk, z_w = e + (z − e)·w with e the encoding of the empty chunk; tokens of weight exactly 1 keep z.
A fragment of weight w < 1 also blends in the prompt encoded without that fragment, with weight
tan((1 − w)·π/2) against 1 for the prompt itself (compel's DownweightMode.REMOVE: the exported text encoders
take no attention mask, so compel's default MASK mode, which masks the fragment out instead, is not
reproduced). Tensors of different length are padded with e. SDXL's pooled vector is encoded from the raw
prompt text, syntax and all, truncated to 77 tokens (as compel does).
A Vocabulary with `truncate` and no BOS is compel with truncate_long_prompts=True over a T5 tokenizer (FLUX.1:
runtime/prompts/flux_compel.py): one chunk of `length` tokens, the tokens past it dropped, </s>, pad.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

PLUS, MINUS = 1.1, 0.9
CHUNK_TOKENS = 75
_SYNTAX = '()",.+-='
_ESCAPES = {"\\" + c for c in _SYNTAX}
_WS = " \n\t\r"
_REAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_INT = re.compile(r"-?\d+")
_KEYWORD = re.compile(r"[A-Za-z0-9_-]+")


class PromptSyntaxError(ValueError):
    """A compel prompt that compel would reject, or a construct sdrt does not run (.swap, withLora)."""


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class Blend:
    prompts: tuple[tuple[Fragment, ...], ...]
    weights: tuple[float, ...]
    normalize: bool = True


@dataclass(frozen=True)
class Conjunction:
    parts: tuple  # each a tuple of Fragments (a flattened prompt) or a Blend
    weights: tuple[float, ...]


# ---- parsing: a recursive descent that mirrors compel's pyparsing grammar -------------------------------

class _Att:
    def __init__(self, weight: float, children: list):
        self.weight, self.children = weight, children


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


class _Parser:
    def __init__(self, text: str):
        self.s = text

    # words -------------------------------------------------------------------------------------------
    def non_syntax_word(self, i: int):
        s, j = self.s, i
        while j < len(s):
            if s[j:j + 2] in _ESCAPES:
                j += 2
            elif s[j] in "+-" and j + 1 < len(s) and s[j + 1] not in _WS and s[j + 1] not in _SYNTAX:
                j += 1
            elif not s[j].isspace() and s[j] not in _SYNTAX:
                j += 1
            else:
                break
        return ([s[i:j]], j) if j > i else None

    def free_word(self, i: int):
        s, j = self.s, i
        while j < len(s) and not s[j].isspace():
            j += 1
        return ([s[i:j]], j) if j > i else None

    def weight_op(self, i: int):
        s = self.s
        for sign, base in (("+", PLUS), ("-", MINUS)):
            j = i
            while j < len(s) and s[j] == sign:
                j += 1
            if j > i:
                return pow(base, j - i), j
        m = _REAL.match(s, i) or _INT.match(s, i)
        return (float(m.group(0)), m.end()) if m else None

    def number(self, i: int):
        m = _REAL.match(self.s, i) or _INT.match(self.s, i)
        return (float(m.group(0)), m.end()) if m else None

    # bracketed pieces --------------------------------------------------------------------------------
    def quoted(self, i: int):
        s = self.s
        if i >= len(s) or s[i] != '"':
            return None
        j, content = i + 1, []
        while j < len(s):
            if s.startswith('\\"', j):
                content.append('"')
                j += 2
            elif s[j] == '"':
                break
            elif s[j] in "\n\r":
                return None
            else:
                content.append(s[j])
                j += 1
        else:
            return None
        text = "".join(content)
        if not text.strip():
            return [""], j + 1
        inner = _Parser(text.replace('"', '\\"'))
        nodes, k = inner.fragments(0)
        if _skip(inner.s, k) != len(inner.s):
            return None  # compel's parse of the quoted text fails: the quoted alternative does not match
        return nodes, j + 1

    def parenthesized(self, i: int):
        s = self.s
        if i >= len(s) or s[i] != "(":
            return None
        nodes, k = self.fragments(i + 1)
        k = _skip(s, k)
        if k < len(s) and s[k] == ")":
            return nodes, k + 1
        return None

    def target(self, i: int):
        return self.quoted(i) or self.parenthesized(i) or self.non_syntax_word(i)

    def unsupported(self, i: int) -> None:
        """Raise on .swap() after a target and on withLora()/useLora() at i."""
        s = self.s
        if "Lora" not in s and ".swap" not in s:
            return
        for trigger in ("useLora", "withLora"):
            if s.startswith(trigger, i) and s[_skip(s, i + len(trigger)):].startswith("("):
                raise PromptSyntaxError(f"compel's {trigger}(…) is not supported; name LoRAs in the request instead")
        t = self.target(i)
        if t is not None and s.startswith(".swap", _skip(s, t[1])):
            raise PromptSyntaxError("compel's .swap() (cross-attention control) is not supported")

    def attention(self, i: int):
        s = self.s
        t = self.target(i)
        if t is not None:  # target.attend(weight)
            k = _skip(s, t[1])
            if s.startswith(".attend", k):
                k = _skip(s, k + len(".attend"))
                if k < len(s) and s[k] == "(":
                    w = self.weight_op(_skip(s, k + 1))
                    if w is not None:
                        k = _skip(s, w[1])
                        if k < len(s) and s[k] == ")":
                            return [_Att(w[0], t[0])], k + 1
        t = self.quoted(i) or self.parenthesized(i)
        if t is not None and t[1] < len(s) and s[t[1]] not in _WS:
            w = self.weight_op(t[1])
            if w is not None:
                return [_Att(w[0], t[0])], w[1]
        t = self.non_syntax_word(i)
        if t is not None and t[1] < len(s) and s[t[1]] in "+-":
            w = self.weight_op(t[1])
            return [_Att(w[0], t[0])], w[1]
        return None

    def fragments(self, i: int):
        """compel's fragment_including_commas_or_periods: zero or more pieces, whitespace between."""
        s, nodes = self.s, []
        while True:
            j = _skip(s, i)
            if j >= len(s):
                return nodes, i
            self.unsupported(j)
            r = self.attention(j) or self.parenthesized(j) or self.quoted(j) or self.non_syntax_word(j)
            if r is None and s[j] in ",.":
                r = [s[j]], j + 1
            if r is None:
                return nodes, i
            nodes += r[0]
            i = r[1]

    def prompt(self, i: int):
        """compel's top-level prompt: like fragments, but any other run of non-space characters is a word."""
        s, nodes = self.s, []
        while True:
            j = _skip(s, i)
            if j >= len(s):
                return nodes, j
            self.unsupported(j)
            r = self.attention(j) or self.quoted(j) or self.parenthesized(j) or self.free_word(j)
            nodes += r[0]
            i = r[1]

    # operators ---------------------------------------------------------------------------------------
    def operator(self, i: int, names: tuple[str, ...]):
        """(target, target, …).name(options) → (name, [target nodes…], [options…], end) or None."""
        s = self.s
        if i >= len(s) or s[i] != "(":
            return None
        targets, k = [], i + 1
        while True:
            t = self.target(_skip(s, k))
            if t is None:
                return None
            targets.append(t[0])
            k = _skip(s, t[1])
            if k < len(s) and s[k] == ",":
                k += 1
                continue
            break
        if k >= len(s) or s[k] != ")":
            return None
        k = _skip(s, k + 1)
        name = next((n for n in names if s.startswith(n, k)), None)
        if name is None:
            return None
        k = _skip(s, k + len(name))
        if k >= len(s) or s[k] != "(":
            return None
        options, k = [], _skip(s, k + 1)
        while k < len(s) and s[k] != ")":
            m = _KEYWORD.match(s, k)
            eq = _skip(s, m.end()) if m else k
            if m and eq < len(s) and s[eq] == "=":  # keyword=value: compel passes it on, unused here
                v = self.number(_skip(s, eq + 1)) or (lambda m2: (m2.group(0), m2.end()) if m2 else None)(
                    _KEYWORD.match(s, _skip(s, eq + 1)))
                if v is None:
                    return None
                options.append((m.group(0), v[0]))
                k = v[1]
            else:
                n = self.number(k)
                if n is not None:
                    options.append(n[0])
                    k = n[1]
                elif m:
                    options.append(m.group(0))
                    k = m.end()
                else:
                    return None
            k = _skip(s, k)
            if k < len(s) and s[k] == ",":
                k = _skip(s, k + 1)
            elif k < len(s) and s[k] != ")":
                return None
        if k >= len(s):
            return None
        return name, targets, options, k + 1


def _flatten(nodes: list, scale: float) -> list[Fragment]:
    out = []
    for node in nodes:
        if isinstance(node, _Att):
            out += _flatten(node.children, scale * node.weight)
        else:
            text = node
            if "\\(" in text or "\\)" in text or '\\"' in text:
                text = text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')
            out.append(Fragment(text, 1.0 * scale))
    return out


def _fuse(fragments: list[Fragment]) -> tuple[Fragment, ...]:
    fused: list[Fragment] = []
    for f in fragments:
        if fused and fused[-1].weight == f.weight:
            fused[-1] = Fragment(fused[-1].text + " " + f.text, f.weight)
        else:
            fused.append(f)
    return tuple(fused)


def _weights(options: list, what: str) -> tuple[list[float], bool]:
    normalize = True
    if options and options[-1] == "no_normalize":
        normalize, options = False, options[:-1]
    weights = []
    for o in options:
        if not isinstance(o, float):
            raise PromptSyntaxError(f"{what}: {o!r} is not a weight")
        weights.append(o)
    return weights, normalize


def parse(text: str) -> Conjunction:
    """A compel prompt → its Conjunction of flattened prompts and blends (compel's PromptParser + flatten)."""
    text = re.sub(r",(\S)", r", \1", text)
    if not text.strip():
        return Conjunction(((Fragment(""),),), (1.0,))
    p = _Parser(text)
    start = _skip(text, 0)
    op = p.operator(start, (".and", ".add"))
    if op is not None:  # text after the closing parenthesis is ignored, as compel does
        _, targets, options, _ = op
        weights, _ = _weights(options, ".and()")
        prompts = [_fuse(_flatten(t, 1.0)) for t in targets]
        if weights and len(weights) != len(prompts):
            raise PromptSyntaxError(f".and(): {len(prompts)} prompts but {len(weights)} weights")
        weights = weights or [1.0] * len(prompts)
        kept = [(pr, w) for pr, w in zip(prompts, weights) if pr]
        return Conjunction(tuple(pr for pr, _ in kept), tuple(w for _, w in kept))
    op = p.operator(start, (".blend",))
    if op is not None:
        _, targets, options, end = op
        if _skip(text, end) != len(text):
            p.unsupported(_skip(text, end))
            raise PromptSyntaxError(f"unexpected text after .blend(…): {text[_skip(text, end):][:40]!r}")
        weights, normalize = _weights(options, ".blend()")
        prompts = tuple(_fuse(_flatten(t, 1.0)) for t in targets)
        weights = weights or [1.0] * len(prompts)
        if len(weights) != len(prompts):
            raise PromptSyntaxError(f".blend(): {len(prompts)} prompts but {len(weights)} weights")
        return Conjunction((Blend(prompts, tuple(weights), normalize),), (1.0,))
    nodes, _ = p.prompt(start)
    fused = _fuse(_flatten(nodes, 1.0))
    return Conjunction((fused,) if fused else (), (1.0,) if fused else ())


# ---- embedding ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Vocabulary:
    """What the chunking needs from a tokenizer."""

    tokenize: Callable[[str], list[int]]  # no BOS/EOS, no truncation
    token_text: Callable[[int], str]  # id → vocabulary entry (".</w>")
    bos: int | None  # None: no start marker (T5)
    eos: int
    pad: int
    length: int = CHUNK_TOKENS + 2  # tokens per chunk, markers and padding included (compel's max_token_count)
    truncate: bool = False  # compel's truncate_long_prompts: one chunk, the tokens past it dropped

    @property
    def markers(self) -> list[int]:
        return [] if self.bos is None else [self.bos]

    @property
    def room(self) -> int:
        """Prompt tokens per chunk."""
        return self.length - len(self.markers) - 1


def _split_point(tokens: list[int], vocab: Vocabulary) -> int:
    if vocab.truncate or len(tokens) <= vocab.room:
        return vocab.room
    texts = [vocab.token_text(t) or "" for t in tokens[:vocab.room]]
    for ends in ((".</w>",), (".</w>", ",</w>", ";</w>", ":</w>"), None):
        for index in range(len(texts) - 1, -1, -1):
            if (texts[index].endswith("</w>") if ends is None else texts[index] in ends):
                return index + 1
    return vocab.room


def token_chunks(fragments: Sequence[Fragment], vocab: Vocabulary) -> tuple[list[list[int]], list[list[float]]]:
    """Per chunk of vocab.length tokens: ids ([BOS +] tokens + EOS + pad) and per-token weights."""
    if not fragments:
        fragments = [Fragment("")]
    ids: list[int] = []
    weights: list[float] = []
    for f in fragments:
        tokens = vocab.tokenize(f.text)
        ids += tokens
        weights += [float(f.weight)] * len(tokens)
    chunk_ids, chunk_weights = [], []
    while True:
        cut = _split_point(ids, vocab)
        part, part_w = ids[:cut], weights[:cut]
        ids, weights = ids[cut:], weights[cut:]
        row = vocab.markers + part + [vocab.eos]
        row_w = [1.0] * len(vocab.markers) + part_w + [1.0]
        pad = vocab.length - len(row)
        chunk_ids.append(row + [vocab.pad] * pad)
        chunk_weights.append(row_w + [1.0] * pad)
        if not ids or vocab.truncate:
            return chunk_ids, chunk_weights


def chunk_count(conjunction: Conjunction, vocab: Vocabulary) -> int:
    """How many 77-token chunks the conditioning of this prompt has."""
    total = 0
    for part in conjunction.parts:
        prompts = part.prompts if isinstance(part, Blend) else (part,)
        counts = []
        for fragments in prompts:
            counts.append(len(token_chunks(fragments, vocab)[0]))
            for k, f in enumerate(fragments):
                if f.weight < 1:
                    counts.append(len(token_chunks(list(fragments[:k]) + list(fragments[k + 1:]), vocab)[0]))
        total += max(counts)
    return max(total, 1)


# chunk ids [n, 77] → encoder states [n, 77, C] (the layer the family and clip skip select)
EncodeChunks = Callable[[list[list[int]]], torch.Tensor]


class Embedder:
    """compel's conditioning for one text encoder."""

    def __init__(self, vocab: Vocabulary, encode: EncodeChunks):
        self.vocab = vocab
        self.encode = encode
        self._empty = None

    @property
    def empty(self) -> torch.Tensor:
        """[length, C]: the encoding of [BOS,] EOS, pad…."""
        if self._empty is None:
            v = self.vocab
            row = v.markers + [v.eos]
            self._empty = self.encode([row + [v.pad] * (v.length - len(row))])[0]
        return self._empty

    def pad(self, z: torch.Tensor, length: int) -> torch.Tensor:
        """[T, C] → [length, C] with empty chunks appended."""
        missing = (length - z.shape[0]) // self.empty.shape[0]
        return torch.cat([z] + [self.empty] * missing) if missing > 0 else z

    def weighted(self, fragments: Sequence[Fragment]) -> torch.Tensor:
        ids, weights = token_chunks(fragments, self.vocab)
        z = self.encode(ids)  # [n, 77, C]
        w = torch.tensor(weights, dtype=z.dtype)[..., None].expand(z.shape)
        if bool((w == 1).all()):
            return z.reshape(-1, z.shape[-1])
        e = self.empty
        return torch.where(w == 1, z, e + (z - e) * w).reshape(-1, z.shape[-1])  # weight 1 keeps z exactly

    def flattened(self, fragments: Sequence[Fragment]) -> torch.Tensor:
        base = self.weighted(fragments)
        variants, lerp = [base], [1.0]
        for k, f in enumerate(fragments):
            if f.weight < 1:
                variants.append(self.weighted(list(fragments[:k]) + list(fragments[k + 1:])))
                lerp.append(math.tan((1.0 - max(1e-5, f.weight)) * math.pi / 2))
        if len(variants) == 1:
            return base
        length = max(v.shape[0] for v in variants)  # compel would fail on unequal lengths; pad instead
        stacked = torch.stack([self.pad(v, length) for v in variants])
        w = torch.tensor(lerp, dtype=stacked.dtype)
        w = w / torch.sum(w)
        return torch.sum(stacked * w.reshape(-1, 1, 1), dim=0)

    def blend(self, blend: Blend) -> torch.Tensor:
        parts = [self.flattened(p) for p in blend.prompts]
        length = max(p.shape[0] for p in parts)
        stacked = torch.stack([self.pad(p, length) for p in parts])
        w = torch.tensor(blend.weights, dtype=stacked.dtype)
        if blend.normalize:
            w = w / torch.sum(w)
        return torch.sum(stacked * w.reshape(-1, 1, 1), dim=0)

    def __call__(self, conjunction: Conjunction) -> torch.Tensor:
        """[77·k, C] for one prompt."""
        pieces = []
        for part, weight in zip(conjunction.parts, conjunction.weights):
            z = self.blend(part) if isinstance(part, Blend) else self.flattened(part)
            if weight != 1:
                e = self.pad(self.weighted([Fragment("")]), z.shape[0])
                z = e + (z - e) * weight
            pieces.append(z)
        if not pieces:
            return self.empty
        return torch.cat(pieces)
