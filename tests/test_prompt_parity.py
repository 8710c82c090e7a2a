"""Prompt syntax, long prompts and clip skip: sdrt's images against diffusers fed with reference embeddings.

References, each computed here on the transformers text encoders of the tiny pipelines, independent of sdrt:
- `a1111`: a small torch re-statement of AUTOMATIC1111's chunking and "Original" emphasis
  (reference/customization.md §2.2-2.4): tokens → 75-token chunks (comma backtrack, BREAK) → BOS/EOS → text
  encoder → multiply → mean restore → concatenate; the parse is given as data (its tables are tested in
  test_prompt_syntax.py). diffusers then runs with prompt_embeds / negative_prompt_embeds (and pooled for SDXL).
- `compel`: the compel library itself (CompelForSD's settings; CompelForSDXL), with DownweightMode.REMOVE, the
  mode sdrt reproduces (its text encoders take no attention mask).
- clip skip: diffusers 0.42's SD path calls `text_encoder.text_model.final_layer_norm`, which transformers 5's
  flattened CLIPTextModel no longer has, so its rule is applied here by hand: hidden_states[-(N+1)] through the
  final layer norm for the prompt, last_hidden_state for the negative prompt (diffusers ignores clip skip there).
  SDXL's path (hidden_states[-(N+2)]) still works in diffusers and is used directly.
Bound: 1/255 per pixel, as tests/test_parity.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sdrt.runtime import batching
from sdrt.runtime.pipeline import Pipeline, Request
from test_parity import assert_same_images, generators, reference_pipeline, to_uint8

SIZE = dict(height=32, width=32)
STEPS = 3
LONG_TAIL = ", ".join(["a red sports car driving through the desert"] * 9)  # ~90 tokens: two chunks


@pytest.fixture(scope="module")
def sd15_biased(tiny_pipeline, exported, tmp_path_factory):
    """The tiny SD 1.5 with a final layer norm like a trained CLIP's (weights ≠ 1, biases ≠ 0): a freshly
    initialised one outputs zero-mean tokens, which leaves 'Original' emphasis (÷ mean) ill-defined. Only the
    text encoder is re-exported; the UNet and VAE are the standard tiny export's."""
    import shutil

    from sdrt.export.exporter import ExportConfig, export

    root = tmp_path_factory.mktemp("biased")
    pipe = reference_pipeline(tiny_pipeline("sd15"))
    g = torch.Generator().manual_seed(0)
    norm = pipe.text_encoder.final_layer_norm
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=g))
        norm.bias.copy_(0.5 + 0.5 * torch.randn(norm.bias.shape, generator=g))
    pipe.save_pretrained(root / "model")
    for name in ("tokenizer",):  # the tiny tokenizer's own files, as export/models/tiny.py writes them
        shutil.rmtree(root / "model" / name)
        shutil.copytree(tiny_pipeline("sd15") / name, root / "model" / name)
    export(ExportConfig(model=str(root / "model"), output=root / "engine", precision="fp32",
                        components=("text_encoder",)))
    standard = exported("sd15", "fp32")
    for name in ("unet", "vae_decoder", "vae_encoder"):
        shutil.copytree(standard / name, root / "engine" / name)
    return reference_pipeline(root / "model"), root / "engine"


@pytest.fixture(scope="module")
def ours(exported, sd15_biased):
    cache = {}

    def get(family: str) -> Pipeline:
        if family not in cache:
            path = sd15_biased[1] if family == "sd15" else exported(family, "fp32")
            cache[family] = Pipeline.load(path, backend="ort-cpu")
        return cache[family]

    return get


@pytest.fixture(scope="module")
def theirs(tiny_pipeline, sd15_biased):
    cache = {"sd15": sd15_biased[0]}

    def get(family: str):
        if family not in cache:
            cache[family] = reference_pipeline(tiny_pipeline(family))
        return cache[family]

    return get


def run_ours(pipe: Pipeline, prompt, negative=None, **kw) -> list:
    request = Request.of(prompt=prompt, negative_prompt=negative, steps=STEPS, guidance=6.0, seed=3, **SIZE, **kw)
    return pipe.generate(request)  # PIL images (to_uint8 treats arrays as floats in [0, 1])


def run_theirs(pipe, **kw) -> np.ndarray:
    return pipe(num_inference_steps=STEPS, guidance_scale=6.0, generator=generators(3, 1), output_type="np",
                **SIZE, **kw).images


def moved(a, b) -> int:
    return int(np.abs(to_uint8(a).astype(int) - to_uint8(b).astype(int)).max())


# ---- AUTOMATIC1111 re-statement -----------------------------------------------------------------------------

def _chunks(tokenizer, fragments, backtrack=20):
    """AUTOMATIC1111's tokenize_line: [(ids[77], multipliers[77])]."""
    bos, eos, comma = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.get_vocab()[",</w>"]
    out, ids, mult, last_comma = [], [], [], -1

    def close():
        nonlocal ids, mult, last_comma
        fill = 75 - len(ids)
        out.append(([bos] + ids + [eos] * (fill + 1), [1.0] + mult + [1.0] * (fill + 1)))
        ids, mult, last_comma = [], [], -1

    for text, weight in fragments:
        if (text, weight) == ("BREAK", -1):
            close()
            continue
        for token in tokenizer(text, add_special_tokens=False, truncation=False).input_ids:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == 75 and last_comma != -1 and len(ids) - last_comma <= backtrack:
                moved_ids, moved_mult = ids[last_comma + 1:], mult[last_comma + 1:]
                ids, mult = ids[:last_comma + 1], mult[:last_comma + 1]
                close()
                ids, mult = moved_ids, moved_mult
            if len(ids) == 75:
                close()
            ids.append(token)
            mult.append(weight)
    if ids or not out:
        close()
    return out


def _encode_chunk(encoder, tokenizer, ids, skip, sdxl):
    ids = list(ids)
    if tokenizer.pad_token_id != tokenizer.eos_token_id:  # OpenCLIP-G: 0 after the first EOS
        end = ids.index(tokenizer.eos_token_id)
        ids = ids[:end + 1] + [tokenizer.pad_token_id] * (len(ids) - end - 1)
    with torch.no_grad():
        out = encoder(torch.tensor([ids]), output_hidden_states=True)
    if sdxl:
        return out.hidden_states[-(skip + 2)], getattr(out, "text_embeds", None)
    if skip == 0:
        return out.last_hidden_state, None
    return encoder.final_layer_norm(out.hidden_states[-(skip + 1)]), None


def a1111_embeds(pipe, fragments, skip=0):
    """([1, 77k, C], pooled or None) for one prompt, encoders concatenated on the channel axis."""
    sdxl = hasattr(pipe, "text_encoder_2")
    pairs = [(pipe.text_encoder, pipe.tokenizer)] + ([(pipe.text_encoder_2, pipe.tokenizer_2)] if sdxl else [])
    states, pooled = [], None
    for encoder, tokenizer in pairs:
        zs = []
        for i, (ids, mult) in enumerate(_chunks(tokenizer, fragments)):
            z, p = _encode_chunk(encoder, tokenizer, ids, skip, sdxl)
            m = torch.tensor(mult)[None, :, None]
            mean = z.mean()
            z = z * m
            zs.append(z * (mean / z.mean()))
            if i == 0 and p is not None:
                pooled = p
        states.append(torch.cat(zs, dim=1))
    return torch.cat(states, dim=-1), pooled


def pad_to(z, empty, length):
    while z.shape[1] < length:
        z = torch.cat([z, empty], dim=1)
    return z


def a1111_reference(pipe, fragments, negative_fragments, skip=0):
    pos, pooled = a1111_embeds(pipe, fragments, skip)
    neg, neg_pooled = a1111_embeds(pipe, negative_fragments, skip)
    empty, _ = a1111_embeds(pipe, [("", 1.0)], skip)
    length = max(pos.shape[1], neg.shape[1])
    kw = dict(prompt_embeds=pad_to(pos, empty, length), negative_prompt_embeds=pad_to(neg, empty, length))
    if pooled is not None:
        kw |= dict(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
    return run_theirs(pipe, **kw), length // 77


A1111_PROMPT = "a photo of a (cat:1.6) on the ((moon)), [blurry] stars BREAK a castle, " + LONG_TAIL
A1111_FRAGMENTS = [("a photo of a ", 1.0), ("cat", 1.6), (" on the ", 1.0), ("moon", 1.1 * 1.1), (", ", 1.0),
                   ("blurry", 1 / 1.1), (" stars", 1.0), ("BREAK", -1), ("a castle, " + LONG_TAIL, 1.0)]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a1111_weights_break_and_long_prompts_equal_the_restated_reference(ours, theirs, family):
    ref = theirs(family)
    expected, chunks = a1111_reference(ref, A1111_FRAGMENTS, [("low quality", 1.0)])
    assert chunks == 3  # BREAK closes chunk 1; the tail needs two more
    pipe = ours(family)
    job = pipe.validate(Request.of(prompt=A1111_PROMPT, negative_prompt="low quality"))
    assert job.syntax == "a1111" and job.text_chunks == 3
    got = run_ours(pipe, A1111_PROMPT, "low quality")
    assert_same_images(f"{family}-a1111-long-weighted", got, expected)
    # the feature is not a no-op: diffusers' truncated encoding of the same text is another image
    plain = run_ours(pipe, A1111_PROMPT, "low quality", prompt_syntax="plain")
    assert moved(got, plain) > 1


def test_a1111_weights_move_pixels_and_clip_skip_applies_to_both_prompts(ours, theirs):
    ref = theirs("sd15")
    fragments = [("a photo of a ", 1.0), ("cat", 1.8), (" on the moon", 1.0)]
    expected, _ = a1111_reference(ref, fragments, [("blurry", 1.0)], skip=1)
    got = run_ours(ours("sd15"), "a photo of a (cat:1.8) on the moon", "blurry", clip_skip=1)
    assert_same_images("sd15-a1111-clip-skip-1", got, expected)
    unweighted = run_ours(ours("sd15"), "a photo of a cat on the moon", "blurry", clip_skip=1)
    assert moved(got, unweighted) > 1


# ---- compel --------------------------------------------------------------------------------------------

COMPEL_PROMPTS = [
    "a photo of a cat+++ on the (moon)1.4, dust--, (bright stars)0.7",
    '("a red car", "a blue boat at sea").blend(0.7, 0.3)',
    '("a red car", "a quiet lake at dawn").and(1, 0.6)',
    "a castle on a hill. " + ". ".join(["a red car on a long road"] * 12) + ". the end",  # sentence splits
]


def _compel_sd(ref):
    from compel import Compel, DownweightMode

    return Compel(tokenizer=ref.tokenizer, text_encoder=ref.text_encoder, truncate_long_prompts=False,
                  downweight_mode=DownweightMode.REMOVE)


@pytest.mark.parametrize("prompt", COMPEL_PROMPTS, ids=["weights", "blend", "and", "long"])
def test_compel_sd15_equals_diffusers_driven_by_compel(ours, theirs, prompt):
    ref = theirs("sd15")
    compel = _compel_sd(ref)
    with torch.no_grad():
        pos, neg = compel.pad_conditioning_tensors_to_same_length([compel(prompt), compel("ugly, (blurry)0.5")])
    expected = run_theirs(ref, prompt_embeds=pos, negative_prompt_embeds=neg)
    pipe = ours("sd15")
    assert pipe.validate(Request.of(prompt=prompt, negative_prompt="ugly", prompt_syntax="compel")).text_chunks \
        == pos.shape[1] // 77
    got = run_ours(pipe, prompt, "ugly, (blurry)0.5", prompt_syntax="compel")
    name = ["weights", "blend", "and", "long"][COMPEL_PROMPTS.index(prompt)]
    assert_same_images(f"sd15-compel-{name}", got, expected)
    if name == "weights":
        assert moved(got, run_ours(pipe, "a photo of a cat on the moon, dust, bright stars", "ugly, blurry",
                                   prompt_syntax="compel")) > 1


def test_compel_sdxl_equals_compel_for_sdxl(ours, theirs):
    from compel import CompelForSDXL, DownweightMode

    ref = theirs("sdxl")
    compel = CompelForSDXL(ref)
    for c in (compel.compel_1, compel.compel_2):
        c.conditioning_provider.downweight_mode = DownweightMode.REMOVE
    prompt = "a cozy library with a (fireplace)1.5, books--, " + LONG_TAIL
    with torch.no_grad():
        out = compel([prompt], negative_prompt=["(low quality)0.6"])
    pos, neg = compel.compel_1.pad_conditioning_tensors_to_same_length([out.embeds, out.negative_embeds])
    expected = run_theirs(ref, prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=out.pooled_embeds,
                          negative_pooled_prompt_embeds=out.negative_pooled_embeds)
    assert pos.shape[1] == 154
    got = run_ours(ours("sdxl"), prompt, "(low quality)0.6", prompt_syntax="compel")
    assert_same_images("sdxl-compel-long-weighted", got, expected)


# ---- plain, clip skip, and the three syntaxes on a plain prompt ---------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_plain_prompt_gives_diffusers_image_in_all_three_syntaxes(ours, theirs, family):
    prompt = "a photo of an astronaut riding a horse on the moon"
    expected = run_theirs(theirs(family), prompt=prompt, negative_prompt="blurry")
    for syntax in ("a1111", "compel", "plain"):
        got = run_ours(ours(family), prompt, "blurry", prompt_syntax=syntax)
        assert_same_images(f"{family}-{syntax}-plain-prompt", got, expected)


def test_clip_skip_sd15_plain_follows_diffusers_rule(ours, theirs):
    ref = theirs("sd15")
    prompt, negative, skip = "a photo of a cat on the moon", "blurry", 2
    tok = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = ref.text_encoder(ref.tokenizer(prompt, **tok).input_ids, output_hidden_states=True)
        pos = ref.text_encoder.final_layer_norm(out.hidden_states[-(skip + 1)])
        neg = ref.text_encoder(ref.tokenizer(negative, **tok).input_ids)[0]  # diffusers: no clip skip here
    expected = run_theirs(ref, prompt_embeds=pos, negative_prompt_embeds=neg)
    got = run_ours(ours("sd15"), prompt, negative, prompt_syntax="plain", clip_skip=skip)
    assert_same_images("sd15-plain-clip-skip-2", got, expected)
    assert moved(got, run_ours(ours("sd15"), prompt, negative, prompt_syntax="plain")) > 1


def test_clip_skip_sdxl_plain_equals_diffusers(ours, theirs):
    prompt = "a cozy library"
    expected = run_theirs(theirs("sdxl"), prompt=prompt, negative_prompt="blurry", clip_skip=1)
    got = run_ours(ours("sdxl"), prompt, "blurry", prompt_syntax="plain", clip_skip=1)
    assert_same_images("sdxl-plain-clip-skip-1", got, expected)
    assert moved(got, run_ours(ours("sdxl"), prompt, "blurry", prompt_syntax="plain")) > 1


# ---- batches -----------------------------------------------------------------------------------------------

def test_batched_jobs_give_their_standalone_images_and_chunk_counts_keep_them_apart(ours):
    pipe = ours("sd15")
    short = pipe.validate(Request.of(prompt="a (red:1.3) car", steps=STEPS, seed=1, **SIZE))
    other = pipe.validate(Request.of(prompt="a quiet lake", steps=STEPS, seed=2, **SIZE))
    long = pipe.validate(Request.of(prompt="a boat, " + LONG_TAIL, steps=STEPS, seed=3, **SIZE))
    assert (short.text_chunks, long.text_chunks) == (1, 2)
    assert batching.compatibility_key(short) == batching.compatibility_key(other)
    assert batching.compatibility_key(short) != batching.compatibility_key(long)
    alone = [pipe.generate(j) for j in (short, other)]
    together = pipe.generate(batching.merge([short, other]))
    for i, a in enumerate(alone):
        assert moved(together[i:i + 1], a) <= 1
    # why the key: padded to the long prompt's two chunks, the short prompt's image changes
    padded = pipe.generate(replace(short, text_chunks=2))
    assert moved(padded, alone[0]) > 1
