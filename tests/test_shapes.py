"""The embedded shapes model (issue 14): shipped weights checked by hash, and tests of meaning, not only parity.

The model (export/models/shapes.py, trained on this kind of CPU; record in export/models/shapes_model/training.json) draws what
its caption asks for: the background colour always, the shape colour and kind most of the time. bench/shapes_eval.py
classifies each generated image by pixels alone (background colour, shape colour, shape kind) over 36 fixed
captions, 12 of them colour/shape pairs the training set never drew. These tests run that check on every backend and
precision this machine has and through the runtime's other paths (samplers, img2img, inpainting, a LoRA and a
ControlNet trained for the model, `make demo`). The floors sit under what the shipped model measured (README, "The
embedded shapes model"), well above chance (1/8 for a colour, 1/4 for a kind), so a backend that computes the right
numbers in the wrong place fails.
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from sdrt.bench import shapes_eval
from sdrt.export.models import shapes, shapes_data
from sdrt.export.models.shapes_data import Spec

# The shipped weights measured background 100 %, shape colour 94 %, shape kind 75 % (held-out pairs: 100 / 92 / 75 %):
# ORT CPU fp32, 20 Euler steps, guidance 7.5, seed 0 (`python -m sdrt.bench.shapes_eval`); seeds 1 and 2 gave
# 100 / 97 / 75 % and 100 / 92 / 81 %. The floors leave room for a few images that another CPU's rounding flips.
FLOOR = {"background": 0.9, "colour": 0.83, "shape": 0.64}
MARGIN = 0.12  # other backends, precisions and samplers: at most this far below the fp32 Euler figure


def test_classifier_reads_rendered_ground_truth():
    rng = random.Random(123)
    specs = [shapes_data.random_spec(rng, held_out=i % 4 == 0) for i in range(120)]
    result = shapes_eval.score(specs, [shapes_data.render(s, rng) for s in specs])
    assert result["all"]["background"] >= 0.95 and result["all"]["colour"] >= 0.95
    assert result["all"]["shape"] >= 0.95, result["all"]


def test_captions_and_tokenizer_cover_the_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    shapes.write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    caption = Spec("star", "purple", "white", "small", "left").caption
    assert caption == "a small purple star on the left on a white background"
    ids = tok(caption).input_ids
    assert len(ids) == len(caption.split()) + 2  # every caption word is one token


def test_shipped_weights_are_hashed_small_and_refused_when_changed(tmp_path):
    hashes = shapes.verify()
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "model_index.json"} <= set(hashes)
    total = sum(p.stat().st_size for p in shapes.SHIPPED.rglob("*") if p.is_file())
    assert total < 40 * 2**20, f"{total / 2**20:.1f} MiB shipped"
    record = json.loads((shapes.SHIPPED / "training.json").read_text())
    assert record["seed"] == 0 and record["unet"]["steps"] > 0 and "versions" in record
    copy = tmp_path / "model"
    shutil.copytree(shapes.SHIPPED, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(shapes.TamperedWeights, match="unet/diffusion_pytorch_model.safetensors does not match"):
        shapes.write_shapes_pipeline(tmp_path / "out", copy)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The shipped model exported once per precision (fp32, fp16) into this module's folder."""
    folder = tmp_path_factory.mktemp("shapes")
    cache = {}

    def get(precision="fp32"):
        if precision not in cache:
            cache[precision] = shapes_eval.export_shipped(folder, precision)
        return cache[precision]

    return get


@pytest.fixture(scope="module")
def fp32_accuracy(engines):
    specs = shapes_eval.eval_specs()
    return shapes_eval.score(specs, shapes_eval.generate(engines("fp32"), specs))


def _assert_accuracy(result: dict, floor: dict, what: str) -> None:
    got = {k: result["all"][k] for k in floor}
    assert all(got[k] >= floor[k] for k in floor), f"{what}: {got} (floor {floor})"


def test_ort_fp32_draws_what_the_caption_asks(fp32_accuracy):
    _assert_accuracy(fp32_accuracy, FLOOR, "ORT CPU fp32, Euler 20")
    held_out = fp32_accuracy["held_out"]  # pairs never drawn in training: the model composes colour and shape
    assert held_out["background"] >= 0.9 and held_out["colour"] >= 0.67 and held_out["shape"] >= 0.5, held_out


def test_the_tiny_vae_trained_here_draws_what_the_full_vae_draws(engines, fp32_accuracy):
    """export/models/shapes_model/extras/tiny-vae (python -m sdrt.export.models.shapes_tiny_vae, an AutoencoderTiny trained here),
    exported beside the full VAE: the first 12 captions' latents are the fp32 run's (same seeds), decoded by the tiny
    VAE they read as the same background, shape colour and kind (measured: 12, 12 and 9 of 12; over all 36 captions
    100 / 92 / 69 % against the full VAE's 100 / 94 / 75 %, median PSNR 28.6 dB against the full VAE's images)."""
    specs = shapes_eval.eval_specs()[:12]
    tiny = shapes_eval.score(specs, shapes_eval.generate(engines("fp32"), specs, vae="tiny"))
    full = fp32_accuracy["rows"][:12]
    same = [sum(t["seen_as"][k] == f["seen_as"][k] for t, f in zip(tiny["rows"], full)) for k in range(3)]
    assert same[0] >= 11 and same[1] >= 10 and same[2] >= 7, (same, [r["seen_as"] for r in tiny["rows"]])


@pytest.mark.slow  # 36 images each; fp16 on a CPU and the torch modules are slow (about 1 min each here)
@pytest.mark.parametrize("backend,precision,sampler", [
    ("ort-cpu", "fp16", "euler"),
    ("torch", "fp32", "euler"),
    ("ort-cpu", "fp32", "dpmpp_2m"),
    ("ort-cpu", "fp32", "euler_a"),
])
def test_other_backends_precisions_and_samplers_keep_the_meaning(engines, fp32_accuracy, backend, precision, sampler):
    specs = shapes_eval.eval_specs()
    images = shapes_eval.generate(engines(precision), specs, backend, sampler=sampler)
    result = shapes_eval.score(specs, images)
    floor = {k: fp32_accuracy["all"][k] - MARGIN for k in FLOOR}
    _assert_accuracy(result, floor, f"{backend} {precision} {sampler}")


def test_img2img_and_inpainting_follow_the_new_prompt(engines):
    """img2img: a rendered red circle re-captioned with another colour takes that colour and keeps its background.
    Inpainting (the ordinary UNet with mask blending), the issue's "make the circle green": the left half holding a
    red shape is masked and the caption names another colour; the masked shape takes it, the rest stays (measured,
    seeds 0-3: 12 of 12 recoloured, masked change 27-44, the unmasked right ≤ 2.6)."""
    from sdrt.runtime.pipeline import Pipeline, Request

    pipe = Pipeline.load(engines("fp32"), backend="ort-cpu")
    cases = [("circle", "red", "green", "blue"), ("square", "yellow", "purple", "black"),
             ("triangle", "white", "orange", "green"), ("star", "orange", "white", "purple")]
    right = 0
    for i, (shape, before, after, bg) in enumerate(cases):
        source = Image.fromarray(shapes_data.render(Spec(shape, before, bg, size="large")))
        out = pipe.generate(Request.of(prompt=Spec(shape, after, bg, size="large").caption, init_image=source,
                                       strength=0.75, steps=20, guidance=7.5, sampler="euler", seed=i))[0]
        seen = shapes_eval.classify(out)
        right += seen.colour == after and seen.background == bg
    assert right >= 3, f"img2img recoloured {right}/4"

    recoloured = 0
    cases = (("circle", "blue", "green"), ("square", "black", "yellow"), ("circle", "yellow", "purple"))
    for shape, bg, after in cases:
        source = Image.fromarray(shapes_data.render(Spec(shape, "red", bg, position="left")))
        mask = Image.new("L", source.size, 0)
        mask.paste(255, (0, 16, 64, 112))  # the left half's middle, where the red shape is
        out = pipe.generate(Request.of(prompt=Spec(shape, after, bg, position="left").caption, init_image=source,
                                       mask=mask, steps=20, guidance=7.5, sampler="euler", seed=0))[0]
        pixels, before = np.asarray(out, dtype=int), np.asarray(source, dtype=int)
        assert np.abs(pixels - before)[np.asarray(mask) > 0].mean() > 20  # the masked region was repainted
        assert np.abs(pixels - before)[:, 72:].mean() <= 5  # away from the mask the picture stays
        seen = shapes_eval.classify(out)
        recoloured += seen.colour == after and seen.background == bg
    assert recoloured >= 2, f"inpainting recoloured {recoloured}/3"


def test_make_demo_writes_pictures_of_its_prompts(engines, tmp_path):
    from sdrt.cli import demo

    shutil.copytree(engines("fp32"), tmp_path / "demo" / "engine")  # the same model: the export reuses every component
    paths = demo.main(tmp_path / "demo")
    assert [p.name for p in paths] == [f"demo-{i}-{k}.png" for i in range(3) for k in range(4)]
    assert Image.open(tmp_path / "demo" / "demo.png").size == (4 * 128 + 330, 3 * 128)
    asked = [(p.split()[-2], p.split()[1 + ("large" in p or "small" in p)]) for p in demo.PROMPTS]  # background, colour
    seen = [shapes_eval.classify(Image.open(p).convert("RGB")) for p in paths]
    backgrounds = sum(s.background == asked[i // 4][0] for i, s in enumerate(seen))
    colours = sum(s.colour == asked[i // 4][1] for i, s in enumerate(seen))
    # measured: 12 of 12 backgrounds, 11 of 12 shape colours (a yellow star drawn white); chance 12 / 8 = 1.5
    assert backgrounds >= 10 and colours >= 9, list(zip(seen, [asked[i // 4] for i in range(12)]))


def test_a_lora_trained_here_recolours_what_it_was_trained_on(engines):
    """export/models/shapes_model/extras/red-to-green.safetensors (python -m sdrt.export.models.shapes_lora, 7 min here, 569 steps
    on the current base): with it, shapes captioned red stop being red (measured: 5 of 6 green, one black); three of
    the four shapes of other colours keep the colour they had without it; without it, 6 of 6 red shapes are red."""
    from sdrt.runtime.pipeline import Pipeline, Request

    lora = shapes.SHIPPED / "extras" / "red-to-green.safetensors"
    pipe = Pipeline.load(engines("fp32"), backend="ort-cpu")
    red = [Spec("circle", "red", "blue"), Spec("square", "red", "black"), Spec("triangle", "red", "yellow"),
           Spec("star", "red", "white"), Spec("circle", "red", "purple", size="large"), Spec("square", "red", "orange")]
    others = [Spec("circle", "blue", "yellow"), Spec("square", "yellow", "black"), Spec("star", "white", "purple"),
              Spec("triangle", "orange", "blue")]
    request = dict(prompt=tuple(s.caption for s in red + others), steps=20, guidance=7.5, sampler="euler", seed=0)
    colours = lambda images: [shapes_eval.classify(im).colour for im in images]  # noqa: E731
    with_lora = colours(pipe.generate(Request.of(**request, loras=[(str(lora), 1.0)])))
    without = colours(pipe.generate(Request.of(**request)))
    n = len(red)
    assert sum(c == "red" for c in without[:n]) >= n - 2, without
    assert sum(c == "red" for c in with_lora[:n]) <= 1, with_lora
    assert sum(a == b for a, b in zip(with_lora[n:], without[n:])) >= len(others) - 1, (with_lora, without)


def _centre_x(image, colour: str) -> float:
    """Mean column (0 … 1) of the pixels nearest to `colour` in the palette (within the classifier's distance)."""
    px = np.asarray(image, dtype=np.float32)
    target = np.array(shapes_data.COLOURS[colour], dtype=np.float32)
    xs = np.nonzero(np.linalg.norm(px - target, axis=-1) < 80)[1]
    return float(xs.mean() / px.shape[1]) if len(xs) else float("nan")


@pytest.mark.slow  # exports the ControlNet and a residual UNet (about 30 s here)
def test_the_mask_controlnet_trained_here_places_the_shape(engines, tmp_path):
    """export/models/shapes_model/extras/controlnet-mask (python -m sdrt.export.models.shapes_controlnet, 12 min here), exported
    with `--controlnet`: a mask on the right rather than the left moves shapes whose captions name no position
    to the right (for some of them: the ControlNet is lightly trained)."""
    from sdrt.bench.experiments.controlnet_picture import control_image
    from sdrt.export.exporter import add_controlnets
    from sdrt.runtime.pipeline import Pipeline, Request

    engine = tmp_path / "engine"
    shutil.copytree(engines("fp32"), engine)
    model = json.loads((engine / "manifest.json").read_text())["source"]["location"]
    add_controlnets(engine, (f"{model}/extras/controlnet-mask=mask",))
    pipe = Pipeline.load(engine, backend="ort-cpu")
    prompts = ("a red star on a blue background", "a yellow circle on a black background",
               "a white square on a green background", "a orange triangle on a purple background")
    common = dict(prompt=prompts, steps=20, guidance=7.5, sampler="euler", seed=0)
    right, left = control_image("circle", "large", "right"), control_image("circle", "large", "left")
    colours = [p.split()[1] for p in prompts]
    on_right = [_centre_x(im, c) for im, c in
                zip(pipe.generate(Request.of(**common, controls=[("mask", right, 1.0)])), colours)]
    on_left = [_centre_x(im, c) for im, c in
               zip(pipe.generate(Request.of(**common, controls=[("mask", left, 1.0)])), colours)]
    # measured on the final base: the yellow circle and the white square move by 0.50 and 0.44 of the width, the red star
    # and the orange triangle by 0.08 and 0.11
    moved = [r - l for r, l in zip(on_right, on_left)]
    assert sum(m > 0.15 for m in moved) >= 2, (on_right, on_left)
