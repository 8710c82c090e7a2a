"""unCLIP image variations (StableUnCLIPImg2ImgPipeline): export of the CLIP image encoder and the UNet with its
projected class labels, parity with diffusers at two noise levels, per-image seeds, and the bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_sdrt
from sdrt.runtime.conditioning import image_processors
from sdrt.runtime.loader import open_dir
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.validate import validate
from test_parity import assert_same_images, generators, reference_pipeline


@pytest.fixture(scope="module")
def unclip_model(tmp_path_factory):
    """(diffusers folder, engine directory) of a tiny unCLIP pipeline, exported once."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.tiny_pipelines import write_tiny

    root = tmp_path_factory.mktemp("unclip")
    folder = write_tiny("unclip", root / "model")
    manifest = export(ExportConfig(model=str(folder), output=root / "engine", precision="fp32",
                                   components=("text_encoder", "unet", "vae_decoder", "image_encoder")))
    assert manifest["pipeline_class"] == "StableUnCLIPImg2ImgPipeline"
    assert [i["name"] for i in manifest["components"]["unet"]["inputs"]][-1] == "class_labels"
    return folder, root / "engine"


@pytest.fixture(scope="module")
def pipe(unclip_model):
    return Pipeline.load(unclip_model[1], backend="ort-cpu")


@pytest.fixture(scope="module")
def ref(unclip_model):
    return reference_pipeline(unclip_model[0])


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8))


def test_encoder_input_equals_the_image_processor(unclip_model, ref):
    image = _image(1)
    theirs = ref.feature_extractor(images=[image], return_tensors="pt").pixel_values
    assert torch.equal(image_processors.ClipInput.of(unclip_model[1] / "image_encoder").tensor(image), theirs)


def test_equals_diffusers_at_two_noise_levels(ref, pipe):
    image, outputs = _image(), []
    for level in (0, 300):
        theirs = ref(image, "a lantern", num_inference_steps=3, guidance_scale=7.5, noise_level=level,
                     generator=generators(3, 1), output_type="np").images
        ours = pipe.generate(Request.of(prompt="a lantern", init_image=image, steps=3, guidance=7.5,
                                        noise_level=level, seed=3))
        assert ours[0].size == (32, 32)  # the model's size, as diffusers
        assert_same_images(f"unclip-noise-{level}", ours, theirs)
        outputs.append(np.asarray(ours[0], int))
    assert np.abs(outputs[0] - outputs[1]).max() > 8  # the noise level moves the pixels


def test_each_variation_is_its_own_seed(pipe):
    request = dict(prompt="", init_image=_image(2), steps=2, guidance=5.0, noise_level=100)
    batch = pipe.generate(Request.of(**request, seed=10, batch=2))
    alone = pipe.generate(Request.of(**request, seed=11))
    assert np.abs(np.asarray(batch[1], int) - np.asarray(alone[0], int)).max() <= 1
    assert np.abs(np.asarray(batch[0], int) - np.asarray(batch[1], int)).max() > 8


@pytest.mark.parametrize("fields,field,fragment", [
    ({"noise_level": 1000}, "noise_level", "at most 999"),
    ({"noise_level": -1}, "noise_level", "at least 0"),
    ({"init_image": None}, "init_image", "give the image to make variations of"),
    ({"strength": 0.5}, "strength", "take no strength"),
])
def test_bad_requests(unclip_model, fields, field, fragment):
    with pytest.raises(InvalidRequest, match=fragment) as e:
        validate(Request.of(**{"prompt": "x", "init_image": _image(), **fields}), open_dir(unclip_model[1]))
    assert e.value.field == field


def test_cli_variations_and_the_wrong_kind_of_directory(unclip_model, pipe, exported, tmp_path):
    from sdrt.cli.generate import RunOptions, generate

    source = tmp_path / "in.png"
    _image(3).save(source)
    _, written = generate(RunOptions(engine_dir=unclip_model[1], prompts=("",), init_image=source, noise_level=50,
                                     steps=2, guidance=10.0, batch=2, seed=5, needs="variations",
                                     backend="ort-cpu", out=tmp_path / "v.png"))
    assert [w.path.name for w in written] == ["v-0.png", "v-1.png"]
    direct = pipe.generate(Request.of(prompt="", init_image=_image(3), noise_level=50, steps=2, guidance=10.0,
                                      seed=6))
    assert np.abs(np.asarray(Image.open(written[1].path).convert("RGB"), int) - np.asarray(direct[0], int)).max() <= 1
    bad = run_sdrt("variations", str(exported("sd15", "fp32")), str(source), "-o", str(tmp_path / "bad.png"))
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("error: ") and "sdrt variations needs an unCLIP engine directory" in lines[0]
    assert not (tmp_path / "bad.png").exists()
