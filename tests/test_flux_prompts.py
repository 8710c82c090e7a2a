"""compel's syntax on FLUX.1 against the compel library itself: compel 2.5's CompelForFlux (CLIP pooled, T5 sequence
weighted, truncate_long_prompts=True) feeding prompt_embeds / pooled_prompt_embeds to diffusers' FluxPipeline on
the tiny FLUX.1 schnell (export/models/tiny_flow.py), batch 2 with per-image generators, DownweightMode.REMOVE on
both of its Compel objects (the mode sdrt reproduces: the exported T5 takes no attention mask). Bound 1/255.
The fast tests check the T5 chunking rule and the refusals without an engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.runtime.prompts import compel as prompt_compel, flux_compel

SIZE = dict(height=48, width=32)
STEPS = 4
SEED = 7
WEIGHTED = ("a red fox++ in the snow", "a (blue car)0.5 on a (sunny road)1.4")
STRONG = ("a red (fox)2 in the (snow)--", "a (blue car)0.3 on a (sunny road)1.8")
PLAIN = ("a red fox in the snow", "a blue car on a sunny road")
SHORT = 16  # a T5 chunk of 16: the tiny transformer barely reads 6 tokens among 512 (a weight of 20 moves 5/255)


# ---- fast: the T5 chunk as compel builds it, and what FLUX.1 refuses ---------------------------------------

def _t5_like(length: int) -> prompt_compel.Vocabulary:
    """A word-per-token vocabulary in T5's layout: no start marker, </s> = 1, <pad> = 0."""
    return prompt_compel.Vocabulary(lambda text: [10 + len(w) for w in text.split()], str, None, 1, 0,
                                    length=length, truncate=True)


def test_t5_chunk_has_no_start_marker_is_padded_to_its_length_and_truncated_keeping_eos():
    v = _t5_like(8)
    ids, weights = prompt_compel.token_chunks([prompt_compel.Fragment("a bb", 1.0),
                                               prompt_compel.Fragment("ccc", 1.5)], v)
    assert ids == [[11, 12, 13, 1, 0, 0, 0, 0]] and weights == [[1, 1, 1.5, 1, 1, 1, 1, 1]]
    ids, _ = prompt_compel.token_chunks([prompt_compel.Fragment(" ".join(["w"] * 20))], v)
    assert ids == [[11] * 7 + [1]]  # one chunk: 7 tokens and </s>, the rest dropped (truncate_long_prompts)
    empty = prompt_compel.Embedder(v, lambda rows: torch.tensor(rows, dtype=torch.float32)[..., None]).empty
    assert empty[:, 0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # [</s>, <pad>…]


@pytest.mark.parametrize("prompt", ['("a fox", "a car").blend(0.7, 0.3)', '("a fox", "a car").and()'])
def test_flux_refuses_blend_and_conjunction(prompt):
    with pytest.raises(prompt_compel.PromptSyntaxError, match="FLUX.1"):
        flux_compel.parse(prompt)
    assert flux_compel.fragments(flux_compel.parse("a fox++ (in snow)0.5")) == (
        prompt_compel.Fragment("a", 1.0), prompt_compel.Fragment("fox", 1.1 ** 2),
        prompt_compel.Fragment("in snow", 0.5))


# ---- slow: images against CompelForFlux + FluxPipeline ---------------------------------------------------

@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_flow import write_tiny_flux

    root = tmp_path_factory.mktemp("flux_prompts")
    write_tiny_flux(root / "model", "schnell")
    export(ExportConfig(model=str(root / "model"), output=root / "engine", precision="fp32",
                        components=("text_encoder", "text_encoder_2", "transformer", "vae_decoder")))
    return root / "model", root / "engine"


def _theirs(folder, prompts, length: int = 512) -> np.ndarray:
    import diffusers
    from compel import CompelForFlux, DownweightMode

    pipe = diffusers.FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.tokenizer_2.model_max_length = length  # CompelForFlux's T5 chunk: the tokenizer's (FLUX.1: 512)
    compel = CompelForFlux(pipe)
    for c in (compel.compel_1, compel.compel_2):
        c.conditioning_provider.downweight_mode = DownweightMode.REMOVE
    with torch.no_grad():
        out = compel(list(prompts))
    assert out.embeds.shape[:2] == (2, length) and out.pooled_embeds.shape[0] == 2
    images = pipe(prompt_embeds=out.embeds, pooled_prompt_embeds=out.pooled_embeds, num_inference_steps=STEPS,
                  output_type="np", generator=[torch.Generator().manual_seed(SEED + i) for i in range(2)],
                  **SIZE).images
    return (images * 255).round().astype(int)


def _ours(pipe, prompts, syntax="compel", length: int = 512) -> np.ndarray:
    from sdrt.runtime.request import Request

    images = pipe.generate(Request.of(prompt=list(prompts), steps=STEPS, seed=SEED, prompt_syntax=syntax,
                                      max_sequence_length=length, **SIZE))
    return np.stack([np.asarray(im) for im in images]).astype(int)


@pytest.mark.slow
def test_compel_on_flux_equals_compel_for_flux_and_the_weights_move_the_image(schnell):
    from sdrt.runtime.fields import InvalidRequest
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.request import Request

    folder, engine = schnell
    pipe = Pipeline.load(engine, backend="ort-cpu")
    mine = _ours(pipe, WEIGHTED)
    figure = int(np.abs(mine - _theirs(folder, WEIGHTED)).max())
    short = _ours(pipe, STRONG, length=SHORT)
    figure_short = int(np.abs(short - _theirs(folder, STRONG, SHORT)).max())
    moved = int(np.abs(short - _ours(pipe, PLAIN, length=SHORT)).max())
    print(f"FLUX.1 compel: {figure}/255 (T5 512) and {figure_short}/255 (T5 {SHORT}) from CompelForFlux + "
          f"FluxPipeline; the weights move pixels by {moved}/255")
    assert figure <= 1 and figure_short <= 1
    assert moved > 4  # measured 8: eight times the parity bound
    plain = _ours(pipe, PLAIN, "plain")  # no syntax: compel's encoding is diffusers' own
    assert int(np.abs(_ours(pipe, PLAIN) - plain).max()) <= 1
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(Request.of(prompt='("a", "b").blend(1, 1)', prompt_syntax="compel", **SIZE))
    assert e.value.field == "prompt" and "FLUX.1" in str(e.value)


# ---- AUTOMATIC1111's syntax on FLUX.1 (Forge's reading; runtime/prompts/flux_a1111.py) ----------------------

A1111 = ("a red (fox:1.5) in the [snow]", "a (blue car) on a [[sunny road]] BREAK at night")
A1111_STRONG = ("a red (fox:4) in the (snow:0.2)", "a (blue car:0.1) on a (sunny road:4)")


def _a1111_reference(pipe, prompts, length: int):
    """The documented rule restated over the transformers encoders (no sdrt code but the parse, whose tables
    test_prompt_syntax.py checks against AUTOMATIC1111's): CLIP's pooled vector of the first chunk [BOS, tokens up
    to BREAK, EOS…] (the prompts here are under 75 tokens); T5: each piece tokenized alone with its weight, BREAK
    dropped, </s>, <pad> to `length`, last_hidden_state · w per token, then × mean before / mean after."""
    from sdrt.runtime.prompts.a1111 import parse_attention

    tok, tok2 = pipe.tokenizer, pipe.tokenizer_2
    pooled, sequences = [], []
    for prompt in prompts:
        parsed = parse_attention(prompt)
        clip_ids = []
        for text, weight in parsed:
            if weight == -1:
                break
            clip_ids += tok(text, add_special_tokens=False).input_ids
        row = [tok.bos_token_id] + clip_ids + [tok.eos_token_id] * (76 - len(clip_ids))
        pooled.append(pipe.text_encoder(torch.tensor([row])).pooler_output[0])
        ids, weights = [], []
        for text, weight in parsed:
            if weight != -1:
                piece = tok2(text, add_special_tokens=False).input_ids
                ids, weights = ids + piece, weights + [weight] * len(piece)
        ids, weights = ids[: length - 1] + [tok2.eos_token_id], weights[: length - 1] + [1.0]
        ids, weights = ids + [tok2.pad_token_id] * (length - len(ids)), weights + [1.0] * (length - len(weights))
        z = pipe.text_encoder_2(torch.tensor([ids])).last_hidden_state[0]
        before = z.mean()
        z = z * torch.tensor(weights)[:, None]
        sequences.append(z * (before / z.mean()))
    return torch.stack(sequences), torch.stack(pooled)


def _a1111_theirs(folder, prompts, length: int = 512) -> np.ndarray:
    import diffusers

    pipe = diffusers.FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds, pooled = _a1111_reference(pipe, prompts, length)
    images = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=STEPS, output_type="np",
                  generator=[torch.Generator().manual_seed(SEED + i) for i in range(2)], **SIZE).images
    return (images * 255).round().astype(int)


@pytest.mark.slow
def test_a1111_on_flux_equals_the_restated_rule_and_is_the_default(schnell):
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.request import Request

    folder, engine = schnell
    pipe = Pipeline.load(engine, backend="ort-cpu")
    assert pipe.validate(Request.of(prompt="a", **SIZE)).syntax == "a1111"
    mine = _ours(pipe, A1111, "a1111")
    figure = int(np.abs(mine - _a1111_theirs(folder, A1111)).max())
    short = _ours(pipe, A1111_STRONG, "a1111", length=SHORT)
    figure_short = int(np.abs(short - _a1111_theirs(folder, A1111_STRONG, SHORT)).max())
    moved = int(np.abs(short - _ours(pipe, PLAIN, "a1111", length=SHORT)).max())
    print(f"FLUX.1 a1111: {figure}/255 (T5 512) and {figure_short}/255 (T5 {SHORT}) from the restated rule + "
          f"FluxPipeline; the weights move pixels by {moved}/255")
    assert figure <= 1 and figure_short <= 1
    assert moved > 4
    assert int(np.abs(_ours(pipe, PLAIN, "a1111") - _ours(pipe, PLAIN, "plain")).max()) == 0
