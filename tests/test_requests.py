"""Requests as plain data, their one validation, the resource limits, and per-image seeds (DESIGN.md §4a)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_sdrt
from sdrt.runtime.limits import Limits, estimate_bytes
from sdrt.runtime.loader import open_dir
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import Request, Sampling, Seeds, Size
from sdrt.runtime.fields import InvalidRequest, MAX_SEED
from sdrt.runtime.validate import validate


@pytest.fixture(scope="module")
def sd15_dir(exported):
    return exported("sd15", "fp32")


@pytest.fixture(scope="module")
def model(sd15_dir):
    return open_dir(sd15_dir)


def test_a_string_prompt_is_one_prompt(model):
    job = validate(Request(prompt="a cat"), model)
    assert job.prompt == ("a cat",) and job.count == 1
    assert validate(Request.of(prompt=["a cat", "a dog"], batch=2), model).count == 4


def test_groups_and_flat_keys_give_the_same_request():
    nested = Request.from_dict({"prompt": {"text": "a cat", "negative": "blurry"}, "sampling": {"steps": 8},
                                "size": {"width": 48, "batch": 2}, "seeds": {"seed": 5}})
    flat = Request.of(prompt="a cat", negative_prompt="blurry", steps=8, width=48, batch=2, seed=5)
    assert nested == flat
    assert flat.sampling == Sampling(steps=8) and flat.size == Size(width=48, batch=2) and flat.seeds == Seeds(5)


def test_json_round_trip_with_images():
    image = Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))
    mask = Image.new("L", (16, 16), 255)
    request = Request.of(prompt=["a", "b"], sampler="DPM++ 2M Karras", steps=7, seed=2**63, init_image=image,
                         mask=mask, strength=0.5)
    text = json.dumps(request.to_dict(encode_images=True))
    back = Request.from_dict(json.loads(text))
    assert back.to_dict(encode_images=True) == request.to_dict(encode_images=True)
    assert np.array_equal(np.asarray(back.images.init_image), np.asarray(image))
    assert back.seeds.seed == 2**63 and back.sampling.sampler == "DPM++ 2M Karras"


@pytest.mark.parametrize("data,field,fragment", [
    ({"prompt": "a", "stepz": 3}, "stepz", "not a request field"),
    ({"prompt": "a", "sampling": {"stepz": 3}}, "sampling.stepz", "not a field of sampling"),
    ({"steps": 3}, "prompt", "is required"),
    ({"prompt": "a", "init_image": "not base64!"}, "init_image", "base64"),
])
def test_from_dict_names_the_bad_key(data, field, fragment):
    with pytest.raises(InvalidRequest) as info:
        Request.from_dict(data)
    assert info.value.field == field and fragment in info.value.message


BAD = [
    (dict(prompt=[1, 2]), "prompt", "list of strings"),
    (dict(prompt=[]), "prompt", "at least one prompt"),
    (dict(prompt=None), "prompt", "string or a list"),
    (dict(prompt="a", negative_prompt=["x", "y", "z"]), "negative_prompt", "one per prompt"),
    (dict(prompt="a", guidance=float("nan")), "guidance", "finite"),
    (dict(prompt="a", guidance=float("inf")), "guidance", "finite"),
    (dict(prompt="a", guidance=-1), "guidance", "at least 0"),
    (dict(prompt="a", guidance_rescale=2), "guidance_rescale", "at most 1"),
    (dict(prompt="a", steps=0), "steps", "at least 1"),
    (dict(prompt="a", steps=2.5), "steps", "integer"),
    (dict(prompt="a", steps="8"), "steps", "integer"),
    (dict(prompt="a", steps=100000), "steps", "at most 1000"),
    (dict(prompt="a", sampler="lcm", steps=60), "steps", "at most 50"),
    (dict(prompt="a", sampler="euler", steps=1000), "steps", "two timesteps on one sigma"),
    (dict(prompt="a", seed=99999999999999999999999), "seed", "2**64"),
    (dict(prompt="a", seed=-2), "seed", "-1 for a random seed"),
    (dict(prompt="a", seed=MAX_SEED, batch=2), "seed", "seed + i"),
    (dict(prompt="a", sampler="Eulr a"), "sampler", "did you mean 'Euler a'"),
    (dict(prompt="a", sampler="DPM++ 2M Karras", schedule="exponential"), "schedule", "already selects"),
    (dict(prompt="a", schedule="cosine"), "schedule", "karras"),
    (dict(prompt="a", sampler="ddim", schedule="karras"), "sampler", "karras sigmas are not available for ddim"),
    (dict(prompt="a", width=31), "width", "multiple of 2"),
    (dict(prompt="a", height=0), "height", "at least 1"),
    (dict(prompt="a", width=1_000_000, height=64), "width", "at most 16,777,216"),
    (dict(prompt="a", batch=100000), "batch", "at most 16"),
    (dict(prompt=["a"] * 9, batch=2), "batch", "18 images"),
    (dict(prompt="a", strength=0), "strength", "above 0"),
    (dict(prompt="a", init_image="a path"), "init_image", "base64"),
    (dict(prompt="a", init_image=b"bytes"), "init_image", "must be an image"),
    (dict(prompt="a", init_image=Image.new("RGB", (4, 4))), "init_image", "at least 8x8"),
    (dict(prompt="a", mask=Image.new("L", (32, 32))), "mask", "needs an init image"),
    (dict(prompt="a", timestep_spacing="uniform"), "timestep_spacing", "leading"),
]


@pytest.mark.parametrize("kwargs,field,fragment", BAD, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD)])
def test_bad_values_raise_invalid_request(model, kwargs, field, fragment):
    with pytest.raises(InvalidRequest) as info:
        validate(Request.of(**kwargs), model)
    assert info.value.field == field, str(info.value)
    assert fragment in info.value.message, info.value.message


def test_random_seed_is_drawn_and_reported(model):
    job = validate(Request.of(prompt="a", seed=-1, batch=3), model)
    assert 0 <= job.seed <= MAX_SEED - 2 and job.seeds == (job.seed, job.seed + 1, job.seed + 2)


def test_a1111_names_select_sampler_and_schedule(model):
    job = validate(Request.of(prompt="a", sampler="DPM++ 2M Karras"), model)
    assert (job.sampler, job.schedule, job.sampler_label) == ("dpmpp_2m", "karras", "DPM++ 2M Karras")
    job = validate(Request.of(prompt="a", sampler="euler a"), model)
    assert (job.sampler, job.schedule) == ("euler_a", "default")
    assert validate(Request.of(prompt="a", karras=True, sampler="euler"), model).schedule == "karras"


def test_limits_refuse_what_would_not_fit(model):
    with pytest.raises(InvalidRequest) as info:
        validate(Request.of(prompt="a", width=512, height=512), model, Limits(max_memory_bytes=2**20))
    assert info.value.field == "width"
    assert "GiB" in info.value.message and "lower the size or the batch" in info.value.message
    validate(Request.of(prompt="a", width=32, height=32), model, Limits(max_memory_bytes=2**30))  # fits


def test_memory_estimate_of_sd15_at_512_with_guidance():
    # SD 1.5: attention at 64x64 latents, 8 heads (attention_head_dim 8); batch 2 with guidance:
    # 2 (scores+probs) * 2 * 8 * 4096**2 * 4 bytes = 2 GiB; the VAE's single-head 4096-token attention is smaller
    unet = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "block_out_channels": [320, 640, 1280, 1280],
            "attention_head_dim": 8}
    vae = {"block_out_channels": [128, 256, 512, 512]}
    estimate = estimate_bytes(unet, vae, 1, 2, 512, 512, 8)
    assert 2 * 2**30 <= estimate < 2.1 * 2**30
    assert estimate_bytes(unet, vae, 1, 2, 4096, 4096, 8) > 2**40  # the size that made ONNX Runtime ask for 35 TB


def test_batch_of_four_equals_four_single_requests(sd15_dir):
    """Per-image seeds: image i of a request seeded s is the image of a request seeded s + i (ancestral sampler)."""
    pipe = Pipeline.load(sd15_dir, backend="ort-cpu")
    common = dict(prompt="a castle", steps=4, guidance=5.0, sampler="euler_a", width=32, height=32)
    batched = pipe.generate(Request.of(**common, seed=7, batch=4))
    singles = [pipe.generate(Request.of(**common, seed=7 + i))[0] for i in range(4)]
    diffs = [int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()) for a, b in zip(batched, singles)]
    assert max(diffs) <= 1, diffs
    assert int(np.abs(np.asarray(batched[0], dtype=int) - np.asarray(batched[1], dtype=int)).max()) > 10


@pytest.mark.parametrize("args,fragment", [
    (("--width", "1000000", "--height", "64"), "--width"),
    (("--batch", "100000"), "--batch must be at most 16"),
    (("--width", "4096", "--height", "4096"), "GiB"),
    (("--seed", "99999999999999999999999"), "--seed must be in 0"),
    (("--guidance", "nan"), "--guidance must be a finite number"),
    (("--steps", "100000", "--preset", "lightning-4step"), "--steps must be at most 1000"),
    (("--sampler", "DPM++ 2M Krras"), "did you mean 'DPM++ 2M Karras'"),
])
def test_cli_refuses_with_one_line_and_writes_nothing(sd15_dir, tmp_path, args, fragment):
    result = run_sdrt("run", str(sd15_dir), "a cat", *args, "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


def test_cli_json_reports_each_images_seed(sd15_dir, tmp_path):
    result = run_sdrt("run", str(sd15_dir), "a cat", "--batch", "2", "--seed", "41", "--steps", "2", "--width", "32",
                      "--height", "32", "--sampler", "Euler a", "--json", "-o", str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [o["seed"] for o in out] == [41, 42] and out[0]["sampler"] == "euler_a"
    assert "Seed: 42" in Image.open(out[1]["path"]).text["parameters"]
    assert "Sampler: Euler a" in Image.open(out[1]["path"]).text["parameters"]


def test_the_cli_starts_without_torch():
    """`sdrt --help`, `sdrt info` … do not import torch: `sdrt run --help` reads the sampler names when it draws."""
    import subprocess
    import sys

    code = "import sys, sdrt.cli.main; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_run_help_lists_every_sampler_and_schedule():
    from sdrt.runtime.samplers.registry import NAMES
    from sdrt.runtime.samplers.schedules import SIGMA_SCHEDULES

    result = run_sdrt("run", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for name in NAMES + SIGMA_SCHEDULES:
        assert name in result.stdout, name


def test_samplers_command_lists_the_registry():
    from sdrt.runtime.samplers.registry import NAMES

    result = run_sdrt("samplers", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert tuple(r["name"] for r in rows) == NAMES
    assert next(r for r in rows if r["name"] == "dpmpp_2m")["a1111"] == ["DPM++ 2M", "DPM++ 2M Karras",
                                                                         "DPM++ 2M Exponential"]
    table = run_sdrt("samplers", env={"COLUMNS": "160"})
    assert table.returncode == 0 and "DPMSolverMultistep" in table.stdout and "UniPC" in table.stdout
