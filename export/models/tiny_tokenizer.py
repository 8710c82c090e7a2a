"""A small CLIP-format byte-level BPE tokenizer, trained here on a built-in prompt corpus.

The files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) have the layout of
openai/clip-vit-large-patch14's tokenizer, so transformers' CLIPTokenizer and sdrt's own tokenizer
load them exactly as they load the real ones; only the vocabulary is smaller.
Vocabulary order follows CLIP's: 256 byte symbols, the same with "</w>", one entry per merge, then
<|startoftext|> and <|endoftext|> (github.com/openai/CLIP/blob/main/clip/simple_tokenizer.py).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

_CORPUS = """
a photo of an astronaut riding a horse on the moon, highly detailed, 8k, trending on artstation
portrait of a beautiful woman with long red hair, oil painting by greg rutkowski, dramatic lighting
a cute corgi dog wearing sunglasses sitting on the beach at sunset, digital art, vibrant colors
cyberpunk city street at night with neon lights and rain, cinematic, ultra realistic, octane render
a bowl of fruit on a wooden table, still life, soft light, photorealistic, sharp focus, bokeh
landscape of snowy mountains and a lake in the morning, wide angle, national geographic photography
an old castle on a hill surrounded by fog, fantasy concept art, matte painting, epic composition
close up of a cat's face with green eyes, macro photography, studio lighting, high resolution
blurry, low quality, ugly, deformed, bad anatomy, extra fingers, watermark, text, jpeg artifacts
a futuristic robot playing the violin in an orchestra, illustration, colorful, masterpiece
the interior of a cozy library with books and a fireplace, warm light, isometric, unreal engine
a red sports car driving through the desert, motion blur, dust, golden hour, professional photo
underwater scene with coral reef and tropical fish, crystal clear water, sunlight rays
a steampunk airship flying over a victorian city, clouds, detailed, by james gurney
watercolor painting of flowers in a vase, pastel colors, delicate brush strokes, white background
"""

_PATTERN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+""", re.IGNORECASE)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def _words(text: str) -> list[tuple[str, ...]]:
    byte_map = bytes_to_unicode()
    words = []
    for token in _PATTERN.findall(text.lower()):
        symbols = [byte_map[b] for b in token.encode("utf-8")]
        words.append(tuple(symbols[:-1]) + (symbols[-1] + "</w>",))
    return words


def train_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself)."""
    vocab = Counter(_words(text))
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, count in vocab.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter = Counter()
        for word, count in vocab.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        vocab = merged
    return merges


def write_clip_tokenizer(folder: Path, *, pad_token: str = EOS, num_merges: int = 400,
                         max_length: int = 77) -> int:
    """Write a CLIP tokenizer folder; returns the vocabulary size.

    pad_token is "<|endoftext|>" for SD's tokenizer and "!" for SDXL's tokenizer_2.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    merges = train_merges(_CORPUS, num_merges)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(vocab)
