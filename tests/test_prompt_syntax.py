"""Prompt syntaxes without engines: AUTOMATIC1111's parse tables and chunking rules, compel's grammar against the
compel library, the request fields, their validation and CLI errors, and TensorRT profiles for long prompts."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from conftest import run_sdrt
from sdrt.engines import trt_profiles as tp
from sdrt.runtime.prompts import a1111
from sdrt.runtime.prompts import compel
from sdrt.runtime.prompts import encode as prompt_encode
from sdrt.runtime.loader import open_dir
from sdrt.runtime.request import Request
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.validate import validate

# ---- AUTOMATIC1111: parse_prompt_attention's documented table (its docstring), plus the rules of §2.1 ----------

A1111_TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1)]),
    # the rules around the table
    ("[x]", [("x", 1 / 1.1)]),
    ("((x))", [("x", 1.1 * 1.1)]),
    ("(x: 1.5 )", [("x", 1.5)]),  # whitespace around the number (current AUTOMATIC1111)
    ("a) b] c", [("a) b] c", 1.0)]),  # closers without openers are text
    ("a:b (c:d)", [("a:b ", 1.0), ("c:d", 1.1)]),  # a colon without a number is text
    ("\\\\ and \\", [("\\ and ", 1.0)]),  # an escaped backslash; a lone one vanishes
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),  # only a whole word
    # inside brackets the marker's -1 is multiplied too, and a marker that is not exactly -1 is text again
    ("(BREAK)", [("", 1.1), ("BREAK", -1.1), ("", 1.1)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text,expected", A1111_TABLE)
def test_a1111_parse_table(text, expected):
    got = a1111.parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_a1111_weights_multiply_in_documented_order():
    # the docstring's exact floats: 1.5730000000000004 and 1.4641000000000006
    got = dict(a1111.parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006


COMMA, BOS, EOS = 9, 1, 2
_VOCAB: dict[str, int] = {}


def fake_tokens(text: str) -> list[int]:
    """One id per word, commas their own id: enough to check the chunk arithmetic."""
    return [COMMA if w == "," else _VOCAB.setdefault(w, 100 + len(_VOCAB)) for w in re.findall(r"[^\s,]+|,", text)]


def chunks_of(text: str, **kw) -> list[a1111.Chunk]:
    return a1111.chunk(a1111.parse_attention(text), fake_tokens, BOS, EOS, COMMA, **kw)


def words(n: int, stem: str = "w") -> str:
    return " ".join(f"{stem}{i}" for i in range(n))


def test_a1111_chunks_hold_75_tokens_wrapped_in_bos_eos():
    one = chunks_of(words(75))
    assert len(one) == 1 and len(one[0].ids) == 77 and one[0].ids[0] == BOS and one[0].ids[-1] == EOS
    assert EOS not in one[0].ids[1:76]
    two = chunks_of(words(76))
    assert len(two) == 2 and two[1].ids[1] == fake_tokens("w75")[0] and two[1].ids[2:] == [EOS] * 75
    assert all(len(c.ids) == len(c.weights) == 77 for c in two)


def test_a1111_empty_prompt_is_one_empty_chunk_and_break_closes_a_chunk():
    (empty,) = chunks_of("")
    assert empty.ids == [BOS] + [EOS] * 76 == a1111.empty_chunk(BOS, EOS).ids
    parts = chunks_of("a b BREAK c")
    assert len(parts) == 2 and parts[0].ids[:4] == [BOS, *fake_tokens("a b"), EOS] and parts[1].ids[1] == \
        fake_tokens("c")[0]


def test_a1111_comma_backtrack_moves_the_words_after_the_last_comma():
    text = words(70) + " , " + words(10, "x")
    first, second = chunks_of(text)
    assert first.ids[71] == COMMA and first.ids[72:] == [EOS] * 5  # chunk 1 ends with the comma
    assert second.ids[1:11] == fake_tokens(words(10, "x"))
    first, second = chunks_of(text, comma_backtrack=0)
    assert first.ids[72:76] == fake_tokens(words(4, "x"))  # without backtrack: cut at exactly 75
    far = words(50) + " , " + words(30, "y")  # the comma is 25 tokens back: no backtrack
    assert chunks_of(far)[0].ids[75] == fake_tokens("y23")[0]


def test_a1111_weights_follow_their_tokens_and_embeddings_do_not_straddle_chunks():
    (c,) = chunks_of("a (b c:1.5) [d]")
    assert c.weights[:6] == [1.0, 1.0, 1.5, 1.5, pytest.approx(1 / 1.1), 1.0]

    def find(tokens, position):  # "emb" is a 3-vector embedding spanning one token
        return ("emb", 3, 1) if tokens[position] == fake_tokens("emb")[0] else None

    first, second = a1111.chunk(a1111.parse_attention(words(73) + " (emb)"), fake_tokens, BOS, EOS, COMMA, find)
    assert first.fixes == [] and second.fixes == [(1, "emb")] and second.weights[1:4] == [1.1] * 3
    assert first.ids[74:] == [EOS] * 3


def test_a1111_pad_after_end_and_emphasis_restore_the_mean():
    assert a1111.pad_after_end([1, 5, 2, 2, 2], 2, 0) == [1, 5, 2, 0, 0]
    assert a1111.pad_after_end([1, 5, 2, 2], 2, 2) == [1, 5, 2, 2]
    z = torch.randn(77, 8) + 0.5
    w = torch.ones(77)
    w[3] = 1.5
    out = a1111.emphasize(z, w)
    assert torch.allclose(out.mean(), z.mean(), atol=1e-6)
    assert torch.allclose(out[3] / out[4], z[3] * 1.5 / z[4], atol=1e-5)
    assert a1111.emphasize(z, torch.ones(77)) is z


# ---- compel: the grammar against compel's own parser ------------------------------------------------------

COMPEL_CASES = [
    "a cat++ on a mat", "(red cat)1.2 dog", "(cat)-1", "a (cat:1.2) dog", "(a - b) c", "x++,y", "hello.world",
    '"quoted  text"1.3 z', "blue-green cat-", "a ((b)+ c)++ d", "(x)++ (y)--", "a \\(b\\) c", "cat.attend(1.5) d",
    '("a cat++", "dog").blend(0.7, 0.3)', '("a", "b").and(1, 0.5)', '("a", "b").blend(1, 2, no_normalize)',
    "(a cat, on a mat)0.8", "cat--- , dog+++", "", "   ", "a, b,c", "(unbalanced", "word+.", '"a"++ ("b")-',
    "a (b (c (d)1.5)0.5)2", "9+ 10-", "a .attend(2)", "((a b), (c d)).and()",
]


def _library(conj):
    from compel.prompt_parser import Blend, FlattenedPrompt

    parts = []
    for p in conj.prompts:
        if isinstance(p, Blend):
            parts.append(compel.Blend(tuple(tuple(compel.Fragment(f.text, f.weight) for f in q.children)
                                            for q in p.prompts), tuple(p.weights), p.normalize_weights))
        else:
            assert isinstance(p, FlattenedPrompt)
            parts.append(tuple(compel.Fragment(f.text, f.weight) for f in p.children))
    return compel.Conjunction(tuple(parts), tuple(conj.weights))


@pytest.mark.parametrize("text", COMPEL_CASES)
def test_compel_parse_equals_compels_parser(text):
    from compel.prompt_parser import PromptParser

    assert compel.parse(text) == _library(PromptParser().parse_conjunction(text))


@pytest.mark.parametrize("text,message", [
    ("a cat.swap(dog)", ".swap"), ("withLora(style, 0.5) a cat", "withLora"),
    ('("a", "b").blend(1, 2) extra', "after .blend"), ('("a", "b").blend(1, 2, 3)', "weights"),
])
def test_compel_constructs_sdrt_does_not_run_are_errors(text, message):
    with pytest.raises(compel.PromptSyntaxError, match=re.escape(message)):
        compel.parse(text)


@pytest.fixture(scope="module")
def sd15_dir(exported):
    return exported("sd15", "fp32")


@pytest.mark.parametrize("text", [
    "a castle. " + ". ".join(["a red car on a long road"] * 12),  # sentence ends
    ", ".join(["a red car on a long road"] * 12),  # phrase ends only
    " ".join(["a red car on a long road"] * 12),  # word ends only
])
def test_compel_chunk_split_points_equal_compels(sd15_dir, text):
    from compel import EmbeddingsProvider
    from transformers import CLIPTokenizer

    from sdrt.runtime.prompts.tokenizer import ClipTokenizer

    provider = EmbeddingsProvider(CLIPTokenizer.from_pretrained(sd15_dir / "tokenizer"), None, truncate=False,
                                  device="cpu")
    frags = compel.parse(text).parts[0]
    ids, weights, _ = provider.get_token_ids_and_expand_weights([f.text for f in frags], [f.weight for f in frags],
                                                               device="cpu")
    tok = ClipTokenizer.from_folder(sd15_dir / "tokenizer")
    ours, _ = compel.token_chunks(frags, compel.Vocabulary(tok.tokens, tok.token_text, tok.bos_id, tok.eos_id,
                                                            tok.pad_id))
    assert [i for row in ours for i in row] == ids.tolist() and len(ours) > 1


# ---- requests, validation, CLI ----------------------------------------------------------------------------

def test_syntax_and_clip_skip_are_prompt_fields_in_flat_and_nested_form():
    flat = Request.from_dict({"prompt": "a", "prompt_syntax": "compel", "clip_skip": 1})
    nested = Request.from_dict({"prompt": {"text": "a", "syntax": "compel", "clip_skip": 1}})
    assert flat == nested and flat.prompt_group.syntax == "compel" and flat.prompt_group.clip_skip == 1
    assert Request.from_dict(json.loads(json.dumps(flat.to_dict()))) == flat
    assert Request.of(prompt="a").to_dict() == {"prompt": {"text": "a"}}  # defaults stay out of JSON
    with_files = Request.of(prompt="a", embeddings=["x.pt"])
    assert with_files.prompt_group.embeddings == ("x.pt",)
    assert Request.from_dict(json.loads(json.dumps(with_files.to_dict()))) == with_files
    with pytest.raises(InvalidRequest, match="known: clip_skip, embeddings, max_sequence_length, negative, syntax, text"):
        Request.from_dict({"prompt": {"text": "a", "sintax": "compel"}})


@pytest.mark.parametrize("fields,field,fragment", [
    ({"prompt_syntax": "fancy"}, "prompt_syntax", "choose one of a1111, compel, plain"),
    ({"prompt_syntax": 3}, "prompt_syntax", "unknown prompt syntax"),
    ({"clip_skip": -1}, "clip_skip", "at least 0"),
    ({"clip_skip": "2"}, "clip_skip", "must be an integer"),
    ({"clip_skip": 4}, "clip_skip", "below the text encoder's 4 layers (0 … 3"),
    ({"prompt_syntax": "compel", "prompt": "a cat.swap(dog)"}, "prompt", ".swap"),
    ({"prompt_syntax": "compel", "negative_prompt": "withLora(x) b"}, "negative_prompt", "withLora"),
    ({"prompt": "a, " * 700}, "prompt", f"at most {prompt_encode.MAX_CHUNKS}"),
])
def test_bad_prompt_fields_name_themselves(sd15_dir, fields, field, fragment):
    request = Request.of(**{"prompt": "a cat", **fields})
    with pytest.raises(InvalidRequest) as e:
        validate(request, open_dir(sd15_dir))
    assert e.value.field == field and fragment in e.value.message


def test_chunk_counts_per_syntax(sd15_dir):
    model = open_dir(sd15_dir)
    long = ", ".join(["a red car"] * 40)
    counts = {s: validate(Request.of(prompt=long, prompt_syntax=s), model).text_chunks for s in prompt_encode.SYNTAXES}
    assert counts == {"a1111": 3, "compel": 3, "plain": 1}
    job = validate(Request.of(prompt="a cat", negative_prompt=long, clip_skip=3), model)
    assert job.text_chunks == 3 and job.clip_skip == 3 and job.syntax == "a1111"  # the negative counts too
    assert validate(Request.of(prompt="a BREAK b BREAK c"), model).text_chunks == 3


@pytest.mark.parametrize("args,expected", [
    (dict(prompt_syntax="bogus"), "--prompt-syntax unknown prompt syntax 'bogus'; choose one of a1111, compel, plain"),
    (dict(clip_skip=9), "--clip-skip must be below the text encoder's 4 layers (0 … 3; got 9)"),
    (dict(prompt_syntax="compel", negative_prompt="x.swap(y)"), "--negative-prompt compel's .swap()"),
])
def test_cli_errors_name_the_flag(sd15_dir, tmp_path, args, expected):
    from sdrt.cli.generate import RunOptions, generate
    from sdrt.runtime.errors import UserError

    out = tmp_path / "x.png"
    with pytest.raises(UserError) as e:
        generate(RunOptions(engine_dir=sd15_dir, prompts=("a cat",), steps=1, out=out, **args))
    assert str(e.value).startswith(expected) and not out.exists()


def test_cli_exits_2_with_one_line(sd15_dir, tmp_path):
    out = tmp_path / "x.png"
    r = run_sdrt("run", str(sd15_dir), "a cat", "--steps", "1", "-o", str(out), "--prompt-syntax", "bogus")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and lines == ["error: --prompt-syntax unknown prompt syntax 'bogus'; choose one of "
                                           "a1111, compel, plain"], r.stderr
    assert not out.exists()


# ---- the final layer norm for clip skip: the export's side file, or the ONNX graph ---------------------------

def test_final_norm_from_the_side_file_and_from_the_graph_agree(sd15_dir, tiny_pipeline, tmp_path):
    from test_parity import reference_pipeline

    norm = reference_pipeline(tiny_pipeline("sd15")).text_encoder.final_layer_norm
    side = prompt_encode.final_norm(str(sd15_dir / "text_encoder"))
    assert (sd15_dir / "text_encoder" / prompt_encode.TEXT_WEIGHTS).is_file()
    bare = tmp_path / "text_encoder"
    shutil.copytree(sd15_dir / "text_encoder", bare)
    (bare / prompt_encode.TEXT_WEIGHTS).unlink()
    graph = prompt_encode.final_norm(str(bare))
    for got in (side, graph):
        assert torch.equal(got[0], norm.weight.detach()) and torch.equal(got[1], norm.bias.detach())
        assert got[2] == pytest.approx(norm.eps)


# ---- TensorRT profiles: the UNet's sequence axis spans the prompt chunks -------------------------------------

def test_trt_profiles_cover_long_prompts_on_the_unet_only():
    (profile,) = tp.profiles(["512x512"], None, "1", True, 8, text_chunks="1-3")
    assert profile.name() == "b1_h512_w512_t1-3_cfg" and not profile.static
    inputs = {"encoder_hidden_states": ["batch_size", "sequence_length", 768]}
    shapes = tp.input_shapes("unet", inputs, profile, 8)["encoder_hidden_states"]
    assert [s[1] for s in shapes] == [77, 77, 231]
    text = tp.input_shapes("text_encoder", {"input_ids": ["batch_size", "sequence_length"]}, profile, 8)
    assert all(s[1] == 77 for s in text["input_ids"])
    (old,) = tp.profiles(["512x512"], None, "1", True, 8)
    assert old.name() == "b1_h512_w512_cfg" and old.static  # one chunk: names of earlier builds unchanged
    record = tp.profile_record(profile)
    assert tp._profile(record) == profile
    assert tp._profile({k: v for k, v in record.items() if k != "text_chunks"}).text_chunks == tp.Range(1, 1, 1)
