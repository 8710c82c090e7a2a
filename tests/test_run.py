"""`sdrt run` end to end: lean imports, PNG parameters, optimum-layout folders, presets, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import run_sdrt
from sdrt.runtime.pipeline import Pipeline, Request


def _one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_run_on_ort_imports_neither_diffusers_nor_transformers(exported, tmp_path):
    engine_dir = exported("sdxl-lightning", "fp16")
    out = tmp_path / "lean.png"
    code = (
        "import sys\n"
        "from sdrt.cli.main import app\n"
        f"sys.argv = ['sdrt', 'run', {str(engine_dir)!r}, 'a photo of a cat', '--preset', 'lightning-4step',"
        f" '--backend', 'ort-cpu', '--width', '32', '--height', '32', '-o', {str(out)!r}]\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers'))\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    assert out.is_file()


def test_png_carries_a1111_parameters(exported, tmp_path):
    out = tmp_path / "cat.png"
    result = run_sdrt("run", str(exported("sd15", "fp32")), "a photo of a cat", "--negative-prompt", "blurry",
                      "--steps", "3", "--guidance", "6.5", "--seed", "1234", "--width", "48", "--height", "32",
                      "--sampler", "dpmpp_2m", "--karras", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    image = Image.open(out)
    assert image.size == (48, 32)
    assert image.text["parameters"] == (
        "a photo of a cat\nNegative prompt: blurry\n"
        f"Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 48x32, Model: {exported('sd15', 'fp32').name}")


def test_batch_writes_one_png_per_image(exported, tmp_path):
    result = run_sdrt("run", str(exported("sdxl-lightning", "fp32")), "a cat", "a dog", "--batch", "2",
                      "--preset", "lightning-2step", "--width", "32", "--height", "32", "-o", str(tmp_path / "b.png"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["b-0.png", "b-1.png", "b-2.png", "b-3.png"]


def test_refiner_hand_off_from_the_cli(exported, tmp_path):
    out = tmp_path / "refined.png"
    result = run_sdrt("run", str(exported("sdxl", "fp32")), "a lighthouse", "--steps", "5", "--guidance", "5",
                      "--width", "32", "--height", "32", "--refiner", str(exported("sdxl-refiner", "fp32")),
                      "--refiner-start", "0.6", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (32, 32)


def test_optimum_layout_folder_runs_like_our_own(exported, tmp_path):
    """optimum-cli writes the same layout without manifest.json; the runtime reads configs and graphs only."""
    ours = exported("sdxl", "fp32")
    optimum_like = tmp_path / "optimum"
    shutil.copytree(ours, optimum_like, ignore=shutil.ignore_patterns("manifest.json"))
    request = Request.of(prompt=("a cozy library",), steps=3, guidance=5.0, seed=2, width=32, height=32)
    a = np.asarray(Pipeline.load(ours, backend="ort-cpu").generate(request)[0])
    b = np.asarray(Pipeline.load(optimum_like, backend="ort-cpu").generate(request)[0])
    assert np.array_equal(a, b)
    info = run_sdrt("info", str(optimum_like))
    assert info.returncode == 0, info.stderr
    assert "sdxl" in info.stdout and "no manifest" in info.stdout


def test_info_on_an_sdrt_directory(exported):
    result = run_sdrt("info", str(exported("sdxl", "fp16")))
    assert result.returncode == 0, result.stderr
    for text in ("family sdxl", "unet", "fp16", "fp32 (kept fp32)", "PSNR", "none built", "ort-cpu"):
        assert text in result.stdout, text


@pytest.fixture()
def sd15(exported):
    return str(exported("sd15", "fp32"))


def test_width_not_a_multiple(sd15, tmp_path):
    _one_line_error(run_sdrt("run", sd15, "cat", "--width", "31", "-o", str(tmp_path / "x.png")),
                    "--width must be a multiple of", "got 31")
    assert not list(tmp_path.iterdir())


def test_unknown_sampler_lists_valid_ones(sd15, tmp_path):
    _one_line_error(run_sdrt("run", sd15, "cat", "--sampler", "dpm_fast", "-o", str(tmp_path / "x.png")),
                    "--sampler", "dpm_fast", "euler_a", "dpmpp_2m_sde", "DPM++ 2M Karras")


def test_steps_below_one(sd15, tmp_path):
    _one_line_error(run_sdrt("run", sd15, "cat", "--steps", "0", "-o", str(tmp_path / "x.png")), "steps must be at least 1")


def test_strength_outside_range(sd15, tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(image)
    _one_line_error(run_sdrt("run", sd15, "cat", "--init-image", str(image), "--strength", "1.5",
                             "-o", str(tmp_path / "x.png")), "--strength must be at most 1 (got 1.5)")


def test_mask_without_init_image(sd15, tmp_path):
    mask = tmp_path / "mask.png"
    Image.new("L", (32, 32)).save(mask)
    _one_line_error(run_sdrt("run", sd15, "cat", "--mask", str(mask), "-o", str(tmp_path / "x.png")),
                    "--mask needs an init image")


def test_unreadable_image(sd15, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    _one_line_error(run_sdrt("run", sd15, "cat", "--init-image", str(bad), "-o", str(tmp_path / "x.png")),
                    "cannot read the image", "bad.png")


def test_long_prompt_is_truncated_with_a_warning(sd15, tmp_path):
    # diffusers' truncation is the plain syntax's; a1111 (the default) and compel encode long prompts in chunks
    prompt = " ".join(["a very detailed photograph of a castle"] * 20)
    result = run_sdrt("run", sd15, prompt, "--steps", "1", "--width", "32", "--height", "32",
                      "--prompt-syntax", "plain", "-o", str(tmp_path / "long.png"))
    assert result.returncode == 0, result.stderr
    assert "truncated" in result.stderr and "77 tokens" in result.stderr


def test_missing_or_damaged_component(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported("sd15", "fp32"), broken)
    (broken / "unet" / "model.onnx").unlink()
    _one_line_error(run_sdrt("run", str(broken), "cat", "-o", str(tmp_path / "x.png")), "unet/model.onnx")
    (broken / "unet" / "model.onnx").write_bytes(b"garbage")
    _one_line_error(run_sdrt("run", str(broken), "cat", "-o", str(tmp_path / "x.png")), "unet")


def test_newer_manifest_version(exported, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(exported("sd15", "fp32"), newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["format_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(run_sdrt("run", str(newer), "cat", "-o", str(tmp_path / "x.png")), "format version 99",
                    "upgrade sdrt")


def test_unwritable_output(sd15, tmp_path):
    _one_line_error(run_sdrt("run", sd15, "cat", "-o", str(tmp_path / "missing" / "x.png")), "does not exist")
    _one_line_error(run_sdrt("run", sd15, "cat", "--steps", "1", "--width", "32", "--height", "32",
                             "-o", "/proc/x.png"), "/proc/x.png")


def test_unknown_preset(sd15, tmp_path):
    _one_line_error(run_sdrt("run", sd15, "cat", "--preset", "lightning-3step", "-o", str(tmp_path / "x.png")),
                    "lightning-4step", "turbo")


def test_python_api_loads_once_and_generates_many(exported):
    pipe = Pipeline.load(exported("sdxl-lightning", "fp32"), backend="ort-cpu")
    request = Request.of(prompt=("a horse",), steps=2, guidance=0.0, sampler="euler", timestep_spacing="trailing",
                      seed=5, width=32, height=32)
    first, second = pipe.generate(request)[0], pipe.generate(request)[0]
    assert np.array_equal(np.asarray(first), np.asarray(second))
    steps = list(pipe.denoise(request))
    assert len(steps) == 2 and steps[-1].shape == (1, 4, 16, 16)


def test_torch_reference_backend_gives_the_same_image(exported):
    engine_dir = exported("sdxl-lightning", "fp32")
    request = Request.of(prompt=("a horse",), steps=2, guidance=0.0, sampler="euler", timestep_spacing="trailing",
                      seed=5, width=32, height=32)
    ort_image = np.asarray(Pipeline.load(engine_dir, backend="ort-cpu").generate(request)[0]).astype(int)
    torch_image = np.asarray(Pipeline.load(engine_dir, backend="torch").generate(request)[0]).astype(int)
    assert np.abs(ort_image - torch_image).max() <= 1
