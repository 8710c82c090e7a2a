"""`sdrt export` on bad input: one line on stderr, exit 2, nothing left on disk; and the kill test."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_sdrt


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _nothing_written(folder: Path, name: str = "out") -> None:
    assert not (folder / name).exists()
    assert not list(folder.glob(f".{name}.sdrt-*"))


def test_missing_path(tmp_path):
    result = run_sdrt("export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"))
    _assert_one_line_error(result, "no such file or directory", "diffusers folder")
    _nothing_written(tmp_path)


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "readme.txt").write_text("hello")
    result = run_sdrt("export", str(tmp_path / "model"), "-o", str(tmp_path / "out"))
    _assert_one_line_error(result, "not a diffusers pipeline folder", "model_index.json")
    _nothing_written(tmp_path)


def test_unsupported_pipeline_class(tmp_path):
    (tmp_path / "svd").mkdir()
    (tmp_path / "svd" / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    result = run_sdrt("export", str(tmp_path / "svd"), "-o", str(tmp_path / "out"))
    _assert_one_line_error(result, "StableVideoDiffusionPipeline", "SD 1.x, SD 2.x, SDXL")
    _nothing_written(tmp_path)


def test_incomplete_folder_of_a_supported_class(tmp_path):
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    result = run_sdrt("export", str(tmp_path / "flux"), "-o", str(tmp_path / "out"))
    _assert_one_line_error(result, "cannot load", "model_index.json")
    _nothing_written(tmp_path)


def test_corrupt_safetensors(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    result = run_sdrt("export", str(bad), "-o", str(tmp_path / "out"))
    _assert_one_line_error(result, "model.safetensors", "not a valid safetensors file")
    _nothing_written(tmp_path)


def test_single_file_of_unknown_family_asks_for_family(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "mystery.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, str(path))
    result = run_sdrt("export", str(path), "-o", str(tmp_path / "out"))
    _assert_one_line_error(result, "--family", "sdxl")
    _nothing_written(tmp_path)


def test_hub_id_offline_fails_with_one_line(tmp_path):
    result = run_sdrt("export", "stabilityai/sdxl-turbo", "-o", str(tmp_path / "out"), env={"HF_HUB_OFFLINE": "1"})
    _assert_one_line_error(result, "stabilityai/sdxl-turbo", "hub")
    _nothing_written(tmp_path)


def test_output_holding_another_model_is_refused(tmp_path, exported, tiny_pipeline):
    out = tmp_path / "out"
    shutil.copytree(exported("sd15", "fp32"), out)
    before = sorted(p.name for p in out.iterdir())
    result = run_sdrt("export", str(tiny_pipeline("sd21v")), "-o", str(out), "--components", "vae_decoder")
    _assert_one_line_error(result, "another model", "--force")
    assert sorted(p.name for p in out.iterdir()) == before
    assert not list(tmp_path.glob(".out.sdrt-*"))


def test_output_holding_unrelated_files_is_refused(tmp_path, tiny_pipeline):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_sdrt("export", str(tiny_pipeline("sd15")), "-o", str(out), "--components", "vae_decoder")
    _assert_one_line_error(result, "not an sdrt engine directory", "--force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_unwritable_output(tiny_pipeline):
    # /proc refuses new entries even for root, where chmod-based tests would pass silently.
    result = run_sdrt("export", str(tiny_pipeline("sd15")), "-o", "/proc/sdrt-out", "--components", "vae_decoder")
    _assert_one_line_error(result, "/proc")
    assert not Path("/proc/sdrt-out").exists()


def test_unknown_component_and_precision(tmp_path, tiny_pipeline):
    result = run_sdrt("export", str(tiny_pipeline("sd15")), "-o", str(tmp_path / "out"), "--components", "unet,vae")
    _assert_one_line_error(result, "vae", "vae_decoder")
    result = run_sdrt("export", str(tiny_pipeline("sd15")), "-o", str(tmp_path / "out"), "--precision", "int8")
    _assert_one_line_error(result, "int8", "fp16")
    _nothing_written(tmp_path)


def test_parity_gate_failure_names_component_and_figure(tmp_path, tiny_pipeline):
    """A VAE decoder whose activations overflow fp16 (as SDXL's real VAE does) fails the fp16 gate."""
    from diffusers import AutoencoderKL

    model = tmp_path / "overflowing"
    shutil.copytree(tiny_pipeline("sd15"), model)
    vae = AutoencoderKL.from_pretrained(model / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1e5)  # outputs ≫ 65504, the largest fp16 value
    vae.save_pretrained(model / "vae")
    result = run_sdrt("export", str(model), "-o", str(tmp_path / "out"), "--components", "vae_decoder",
                      "--precision", "fp16")
    _assert_one_line_error(result, "parity gate failed for vae_decoder", "PSNR", "35")
    _nothing_written(tmp_path)


def _wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGKILL])
def test_export_killed_midway_leaves_no_partial_directory(tmp_path, tiny_pipeline, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli.main", "export", str(tiny_pipeline("sdxl")),
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Wait until the first component is written into the temporary sibling, i.e. truly midway.
    midway = _wait_for(lambda: any(tmp_path.glob(".out.sdrt-tmp-*/text_encoder/model.onnx")), timeout=120)
    assert midway, proc.communicate(timeout=60)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    if sig != signal.SIGKILL:
        assert not list(tmp_path.glob(".out.sdrt-*"))
    else:  # nothing can clean up after SIGKILL; the next export removes the dead process's leftovers
        assert list(tmp_path.glob(".out.sdrt-tmp-*"))
        result = run_sdrt("export", str(tiny_pipeline("sdxl")), "-o", str(out), "--components", "vae_decoder")
        assert result.returncode == 0, result.stderr
        assert (out / "manifest.json").exists()
        assert not list(tmp_path.glob(".out.sdrt-*"))
