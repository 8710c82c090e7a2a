"""sdrt's tokenizer (on `tokenizers`) gives exactly transformers' CLIPTokenizer ids."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys

import pytest
from transformers import CLIPTokenizer

from sdrt.export.models.tiny_tokenizer import BOS, EOS, write_clip_tokenizer
from sdrt.runtime.prompts.tokenizer import ClipTokenizer, TokenizerError

CORPUS = [
    "a photo of an astronaut riding a horse on the moon",
    "Portrait of a Beautiful Woman, OIL PAINTING by Greg Rutkowski",
    "", " ", "   leading and trailing   ", "tabs\tand\nnewlines\r\nmixed", "tab\t\t\ttab  two  spaces",
    "it's a dog's life, isn't it? we'll see, they've gone, I'm here, you'd know", "IT'S LOUD", "o'clock rock'n'roll",
    "numbers 1234567890 and 3.14159 and 8k 4K 1080p", "1" * 200,
    "punctuation!!! ??? ... ,,, ;;; ::: --- ((())) [[]] {{}} <<>> @#$%^&*",
    "R&amp;D &lt;tag&gt; &quot;quoted&quot; &#39;", "café naïve résumé façade", "ÀÉÎÕÜ ñ ç ß ø å",
    "a\u0301 combining accent (NFC)", "日本語のテキスト", "中文提示词", "한국어", "emoji 😀🎨🚀 and ❤️", "😀" * 100,
    "Ünïcödé  café!!  日本語 😀", "a ! b !! c", "!!!", "wow!" * 80, "hi<|startoftext|>there", "<|endoftext|> trick",
    "<|ENDOFTEXT|> upper-case specials <|EndOfText|>", "<|endoftext|>" * 80, "\x00control\x07chars\x1b",
    "x" * 300, " ".join(["very detailed castle painting"] * 30),
    "masterpiece, best quality, ultra-detailed, (cinematic lighting:1.2), [blurry]",
    "UPPER lower MiXeD", "e.g. i.e. etc.", "C++ and C# and F#", "a-b_c/d\\e|f", "50% off $9.99",
    "ﬁne ligature", "Ⅻ roman numeral", "full-width ＡＢＣ", "zero\u200bwidth",
    "the quick brown fox jumps over the lazy dog", "watercolor, pastel colors, white background",
    "cyberpunk city street at night with neon lights and rain", "a cute corgi wearing sunglasses",
]


def _call(ref: CLIPTokenizer, prompts: list[str]) -> list[list[int]]:
    """The call diffusers' pipelines make."""
    return ref(prompts, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids


@pytest.fixture(scope="module", params=[EOS, "!"], ids=["sd-pad-eos", "sdxl2-pad-bang"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_clip_tokenizer(path, pad_token=request.param)
    return path


def test_same_ids_as_transformers(folder):
    ref = CLIPTokenizer.from_pretrained(folder)
    ours = ClipTokenizer.from_folder(folder)
    got, _ = ours.encode(CORPUS)
    assert got.shape == (len(CORPUS), 77) and str(got.dtype) == "int64"
    mismatched = [p for p, g, w in zip(CORPUS, got.tolist(), _call(ref, CORPUS)) if g != w]
    assert not mismatched
    assert ours.pad_id == ref.pad_token_id and ours.eos_id == ref.eos_token_id and ours.bos_id == ref.bos_token_id
    assert ours.tokenizer.id_to_token(ours.bos_id) == BOS and ours.tokenizer.id_to_token(ours.eos_id) == EOS


def test_dropped_text_is_what_diffusers_warns_with(folder):
    """diffusers decodes untruncated_ids[:, 76:-1] with batch_decode; one prompt at a time here."""
    ref = CLIPTokenizer.from_pretrained(folder)
    _, dropped = ClipTokenizer.from_folder(folder).encode(CORPUS)
    for prompt, text in zip(CORPUS, dropped):
        full = ref(prompt).input_ids
        assert text == (ref.batch_decode([full[76:-1]])[0] if len(full) > 77 else ""), prompt


def test_truncation_keeps_bos_first_and_eos_last(folder):
    ours = ClipTokenizer.from_folder(folder)
    ids, dropped = ours.encode(["short", " ".join(["castle"] * 100), " ".join(["castle"] * 75),
                                " ".join(["castle"] * 76)])
    assert dropped[0] == "" and dropped[2] == ""  # 75 tokens + BOS + EOS fit exactly
    assert dropped[1].split() == ["castle"] * 25 and dropped[3] == "castle"
    assert (ids[:, 0] == ours.bos_id).all() and (ids[1:, -1] == ours.eos_id).all()


def test_clip_text_rules(folder):
    """Lower case, whitespace runs, digits one by one, no HTML unescaping (transformers 5 has no ftfy path)."""
    ours = ClipTokenizer.from_folder(folder)
    ids, _ = ours.encode(["A  Photo\tOF\n\na Cat", "a photo of a cat", "2024", "2 0 2 4", "&amp;", "&"])
    assert (ids[0] == ids[1]).all() and (ids[2] == ids[3]).all() and not (ids[4] == ids[5]).all()


def test_transformers_clip_tokenizer_never_uses_ftfy():
    """The reference this module matches: transformers 5's CLIPTokenizer has one path, without ftfy/html."""
    from transformers.models.clip import tokenization_clip

    source = inspect.getsource(tokenization_clip)
    assert "ftfy" not in source and "unescape" not in source


def test_same_ids_from_a_saved_tokenizer_json(folder, tmp_path):
    CLIPTokenizer.from_pretrained(folder).save_pretrained(tmp_path)  # transformers 5 writes tokenizer.json
    assert (tmp_path / "tokenizer.json").exists()
    (tmp_path / "vocab.json").unlink(missing_ok=True)
    got, _ = ClipTokenizer.from_folder(tmp_path).encode(CORPUS)
    want, _ = ClipTokenizer.from_folder(folder).encode(CORPUS)
    assert (got == want).all()


def test_pad_token_of_the_config_is_added_when_tokenizer_json_lacks_it(tmp_path):
    """A tokenizer.json whose added tokens omit "!" (older saves): transformers adds the config's pad token."""
    source = tmp_path / "src"
    write_clip_tokenizer(source, pad_token="!")
    ours = ClipTokenizer.from_folder(source)
    data = json.loads(ours.tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "!"]
    target = tmp_path / "json_only"
    target.mkdir()
    (target / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)
    prompts = ["a ! b !!! c", "wow!!!"]
    got, _ = ClipTokenizer.from_folder(target).encode(prompts)
    assert got.tolist() == _call(CLIPTokenizer.from_pretrained(target), prompts)


def test_max_length_defaults_to_77_without_a_config(tmp_path):
    write_clip_tokenizer(tmp_path, pad_token="!")
    (tmp_path / "tokenizer_config.json").unlink()  # transformers then reports model_max_length 1e30
    ours = ClipTokenizer.from_folder(tmp_path)
    assert ours.max_length == 77 and ours.pad_id == ours.tokenizer.token_to_id("!")


def test_encode_takes_a_list(folder):
    with pytest.raises(TypeError, match="list of prompt strings"):
        ClipTokenizer.from_folder(folder).encode("a single string")


@pytest.mark.parametrize("damage,message", [
    (lambda d: shutil.rmtree(d), "is missing; the engine directory needs its tokenizer folder"),
    (lambda d: (d / "merges.txt").unlink(), "has no tokenizer.json and no merges.txt"),
    (lambda d: [f.unlink() for f in d.iterdir()], "has no tokenizer.json and no vocab.json"),
    (lambda d: (d / "vocab.json").write_text("{not json"), "vocab.json is not valid JSON"),
    (lambda d: (d / "vocab.json").write_text("[1, 2]"), "vocab.json is not a token → id map"),
    (lambda d: (d / "merges.txt").write_text("#version: 0.2\na b c\n"), "merges.txt line 2 is not a pair"),
    (lambda d: (d / "merges.txt").write_text("#version: 0.2\nzz qq\n"), "merges.txt does not fit vocab.json"),
    (lambda d: (d / "special_tokens_map.json").write_text('{"pad_token": "<pad>"}'),
     "vocab.json has no pad token '<pad>'"),
    (lambda d: (d / "tokenizer_config.json").write_bytes(b"\xff\xfe"), "tokenizer_config.json is not valid JSON"),
    (lambda d: (d / "tokenizer_config.json").write_text('"x"'), "tokenizer_config.json is not a JSON object"),
    (lambda d: (d / "tokenizer.json").write_text('{"version": "1.0"}'), "tokenizer.json cannot be read"),
])
def test_damaged_folder_names_the_file(tmp_path, damage, message):
    folder = tmp_path / "tokenizer_2"
    write_clip_tokenizer(folder, pad_token="!")
    damage(folder)
    with pytest.raises(TokenizerError) as e:
        ClipTokenizer.from_folder(folder)
    assert message in str(e.value) and "tokenizer_2" in str(e.value)


def test_module_imports_neither_transformers_nor_diffusers():
    code = ("import sys, sdrt.runtime.prompts.tokenizer; "
            "print(sorted(m for m in ('transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
