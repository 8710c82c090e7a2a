"""sdrt's tokenizer (on `tokenizers`) gives exactly transformers' CLIPTokenizer ids."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from sdrt.export.tiny_tokenizer import EOS, write_clip_tokenizer
from sdrt.runtime.tokenizer import ClipTokenizer, TokenizerError

CORPUS = [
    "a photo of an astronaut riding a horse on the moon",
    "Portrait of a Beautiful Woman, OIL PAINTING by Greg Rutkowski",
    "", " ", "   leading and trailing   ", "tabs\tand\nnewlines\r\nmixed",
    "it's a dog's life, isn't it? we'll see, they've gone, I'm here, you'd know",
    "numbers 1234567890 and 3.14159 and 8k 4K 1080p",
    "punctuation!!! ??? ... ,,, ;;; ::: --- ((())) [[]] {{}} <<>> @#$%^&*",
    "R&amp;D &lt;tag&gt; &quot;quoted&quot;", "café naïve résumé façade", "ÀÉÎÕÜ ñ ç ß ø å",
    "日本語のテキスト", "中文提示词", "한국어", "emoji 😀🎨🚀 and ❤️", "Ünïcödé  café!!  日本語 😀",
    "a ! b !! c", "!!!", "hi<|startoftext|>there", "<|endoftext|> trick", "x" * 300,
    " ".join(["very detailed castle painting"] * 30),
    "masterpiece, best quality, ultra-detailed, (cinematic lighting:1.2), [blurry]",
    "UPPER lower MiXeD", "e.g. i.e. etc.", "C++ and C# and F#", "a-b_c/d\\e|f", "50% off $9.99",
    "o'clock rock'n'roll", "ﬁne ligature", "Ⅻ roman numeral", "full-width ＡＢＣ", "zero\u200bwidth",
    "the quick brown fox jumps over the lazy dog", "watercolor, pastel colors, white background",
    "cyberpunk city street at night with neon lights and rain", "a cute corgi wearing sunglasses",
    "underwater scene with coral reef", "steampunk airship over a victorian city",
]


@pytest.fixture(scope="module", params=[EOS, "!"], ids=["sd-pad-eos", "sdxl2-pad-bang"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_clip_tokenizer(path, pad_token=request.param)
    return path


def test_same_ids_as_transformers(folder):
    ref = CLIPTokenizer.from_pretrained(folder)
    ours = ClipTokenizer.from_folder(folder)
    want = ref(CORPUS, padding="max_length", max_length=77, truncation=True).input_ids
    got, _ = ours.encode(CORPUS)
    assert got.shape == (len(CORPUS), 77) and str(got.dtype) == "int64"
    mismatched = [p for p, g, w in zip(CORPUS, got.tolist(), want) if g != w]
    assert not mismatched


def test_same_ids_from_a_saved_tokenizer_json(folder, tmp_path):
    CLIPTokenizer.from_pretrained(folder).save_pretrained(tmp_path)  # transformers 5 writes tokenizer.json
    assert (tmp_path / "tokenizer.json").exists()
    got, _ = ClipTokenizer.from_folder(tmp_path).encode(CORPUS)
    want, _ = ClipTokenizer.from_folder(folder).encode(CORPUS)
    assert (got == want).all()


def test_truncation_reports_the_dropped_text(folder):
    ours = ClipTokenizer.from_folder(folder)
    ids, dropped = ours.encode(["short", " ".join(["castle"] * 100)])
    assert dropped[0] == ""
    assert dropped[1].split() == ["castle"] * 25  # 100 words, 75 kept between BOS and EOS
    assert ids[1, -1] == ours.eos_id


def test_incomplete_folder_names_the_file(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match="merges.txt"):
        ClipTokenizer.from_folder(tmp_path)
    with pytest.raises(TokenizerError, match="missing"):
        ClipTokenizer.from_folder(tmp_path / "nope")
