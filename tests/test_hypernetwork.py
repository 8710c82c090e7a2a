"""AUTOMATIC1111 hypernetworks baked into the UNet at export (export/extras/hypernetwork.py), against AUTOMATIC1111's
algorithm re-created here over diffusers' UNet: an attention processor that feeds to_k / to_v with
context + mlp(context)·strength for every attention (self and cross) whose context width the file has
(modules/hypernetworks/hypernetwork.py: HypernetworkModule.forward, apply_single_hypernetwork). The MLPs are
rebuilt in this test by hand from the file's documented layout, not with sdrt's loader."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import run_sdrt
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.fields import InvalidRequest
from test_parity import assert_same_images, generators, reference_pipeline, to_uint8

SCALE = 0.7
PROMPT = "a fox in the snow"


def _widths(unet) -> list[int]:
    from diffusers.models.attention_processor import Attention

    return sorted({m.to_k.in_features for m in unet.modules() if isinstance(m, Attention)})


def _state(dim: int, g: torch.Generator) -> dict:
    """layer_structure [1, 2, 2, 1], relu, activate_output (default true), use_dropout → dropout [0, 0.3, 0, 0]:
    Sequential(Linear, ReLU, Dropout, Linear, ReLU, Linear, ReLU), so the Linears sit at 0, 3 and 5."""
    shapes = {0: (2 * dim, dim), 3: (2 * dim, 2 * dim), 5: (dim, 2 * dim)}
    out = {}
    for i, (o, n) in shapes.items():
        out[f"linear.{i}.weight"] = torch.randn(o, n, generator=g) * 0.4
        out[f"linear.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    return out


def _by_hand(state: dict) -> torch.nn.Module:
    w = {k: v for k, v in state.items()}
    layers = [("0", torch.nn.ReLU()), ("3", torch.nn.ReLU()), ("5", torch.nn.ReLU())]

    def forward(x):
        for index, act in layers:
            x = act(torch.nn.functional.linear(x, w[f"linear.{index}.weight"], w[f"linear.{index}.bias"]))
        return x

    return forward


class HypernetProcessor:
    """diffusers AttnProcessor2_0's arithmetic with AUTOMATIC1111's context_k / context_v."""

    def __init__(self, layers: dict, scale: float):
        self.layers, self.scale = layers, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k_in = v_in = context
        if context.shape[-1] in self.layers:
            mk, mv = self.layers[context.shape[-1]]
            k_in, v_in = context + mk(context) * self.scale, context + mv(context) * self.scale
        b = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(k_in), attn.to_v(v_in)
        heads = lambda t: t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3])
        return attn.to_out[1](attn.to_out[0](out))


@pytest.fixture(scope="module")
def hypernet(tiny_pipeline, tmp_path_factory):
    """(file, {width: (state_k, state_v)}) for the tiny SD 1.5: layers for every attention width it has."""
    ref = reference_pipeline(tiny_pipeline("sd15"))
    g = torch.Generator().manual_seed(3)
    states = {dim: (_state(dim, g), _state(dim, g)) for dim in _widths(ref.unet)}
    path = tmp_path_factory.mktemp("hypernet") / "frost.pt"
    torch.save({**{dim: list(pair) for dim, pair in states.items()}, "layer_structure": [1, 2, 2, 1],
                "activation_func": "relu", "is_layer_norm": False, "use_dropout": True, "name": "frost",
                "step": 100, "sd_checkpoint": None}, path)
    return path, states


@pytest.fixture(scope="module")
def baked(tiny_pipeline, hypernet, tmp_path_factory):
    from sdrt.export.exporter import ExportConfig, export

    out = tmp_path_factory.mktemp("hypernet-engine") / "sd15-frost"
    export(ExportConfig(model=str(tiny_pipeline("sd15")), output=out, precision="fp32",
                        hypernetworks=((str(hypernet[0]), SCALE),)))
    return out


def _ours(engine, prompt, **kw):
    return Pipeline.load(engine, backend="ort-cpu").generate(
        Request.of(prompt=prompt, negative_prompt="blurry", steps=3, guidance=6.0, seed=5, width=32, height=32, **kw))


def test_baked_hypernetwork_equals_automatic1111s_algorithm_on_diffusers(baked, hypernet, tiny_pipeline, exported):
    ref = reference_pipeline(tiny_pipeline("sd15"))
    layers = {dim: (_by_hand(k), _by_hand(v)) for dim, (k, v) in hypernet[1].items()}
    ref.unet.set_attn_processor(HypernetProcessor(layers, SCALE))
    theirs = ref(PROMPT, negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.0, height=32, width=32,
                 generator=generators(5, 1), output_type="np").images
    ours = _ours(baked, f"{PROMPT} <hypernet:frost:{SCALE}>")
    assert_same_images("sd15-hypernetwork", ours, theirs)
    assert np.array_equal(to_uint8(ours), to_uint8(_ours(baked, PROMPT)))  # the tag only confirms what is baked
    base = _ours(exported("sd15", "fp32"), PROMPT)
    assert np.abs(to_uint8(base).astype(int) - to_uint8(ours).astype(int)).max() > 8  # it visibly changes the image


@pytest.mark.parametrize("prompt,fragment", [
    ("x <hypernet:frost:0.3>", "<hypernet:frost:0.3> is not baked"),
    ("x <hypernet:other>", "it has: <hypernet:frost:0.7>"),
    ("x <hypernet::1>", "names no hypernetwork"),
])
def test_tags_that_do_not_match_what_is_baked_are_refused(baked, prompt, fragment):
    pipe = Pipeline.load(baked, backend="ort-cpu")
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(Request.of(prompt=prompt, steps=2, width=32, height=32))
    assert e.value.field == "prompt" and fragment in e.value.message


def test_bad_hypernetwork_files_are_one_line_and_exit_2(tiny_pipeline, hypernet, tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong_widths.pt"
    torch.save({24: [_state(24, torch.Generator()), _state(24, torch.Generator())], "layer_structure": [1, 2, 2, 1],
                "activation_func": "relu", "use_dropout": True}, wrong)  # no attention of the tiny model is 24 wide
    lora = tmp_path / "a_lora.pt"
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, lora)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a pickle")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    from diffusers import UNet2DConditionModel

    from sdrt.export.extras import hypernetwork

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline("sd15") / "unet")
    for path, fragment in [(wrong, "widths [24]"), (lora, "not an AUTOMATIC1111 hypernetwork"),
                           (corrupt, "not a readable")]:
        with pytest.raises(hypernetwork.HypernetworkError, match=re.escape(fragment)):
            hypernetwork.apply(unet, [(hypernetwork.load(path), 1.0)])
    for arg, fragment in [(str(tmp_path / "missing.pt"), "no such file"), (f"{hypernet[0]}:nan", "finite")]:
        out = tmp_path / "out"  # the CLI: one line, exit 2, nothing written
        done = run_sdrt("export", str(tiny_pipeline("sd15")), "-o", str(out), "--precision", "fp32",
                        "--hypernetwork", arg)
        assert done.returncode == 2, (arg, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], (arg, lines)
        assert not out.exists()
