"""`sdrt bench --startup` (bench/startup.py): whole fresh processes of `sdrt run` and of diffusers, same image."""

from __future__ import annotations

import json
import shutil

import pytest

from sdrt.bench import startup
from sdrt.runtime.errors import UserError


def test_startup_commands_make_the_same_request(exported, tiny_pipeline, tmp_path):
    engine = exported("sd15", "fp32")
    assert startup.source_of(engine) == tiny_pipeline("sd15")
    s = startup.StartupScenario(str(engine), str(startup.source_of(engine)), steps=3, guidance=0.0, seed=9)
    ours, theirs = startup.commands(s, tmp_path / "a.png", tmp_path / "b.png")
    assert ours[1:4] == ["-m", "sdrt.cli.main", "run"] and ours[ours.index("--seed") + 1] == "9"
    assert ours[ours.index("--width") + 1] == "32"  # the model's default size
    args = json.loads(theirs[-1])
    assert (args["scheduler"], args["steps"], args["guidance"], args["seed"], args["width"]) == \
        ("EulerDiscreteScheduler", 3, 0.0, 9, 32)


def test_startup_needs_the_source_folder(exported, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(exported("sd15", "fp32"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["location"] = str(tmp_path / "gone")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="does not exist here"):
        startup.source_of(copy)


@pytest.mark.slow
def test_startup_measures_both_and_compares_their_images(exported, tmp_path):
    engine = tmp_path / "engine"  # --ort-cache writes into the directory: a copy, not the session's export
    shutil.copytree(exported("sd15", "fp32"), engine)
    s = startup.StartupScenario(str(engine), str(startup.source_of(engine)), steps=2, runs=1, ort_cache=True)
    result = startup.measure(s)
    assert result["image_max_abs_diff_uint8"] <= 1
    assert len(result["seconds"]["sdrt"]) == len(result["seconds"]["diffusers"]) == len(result["seconds"][startup.FAST_EXIT]) == 1
    assert len(result["seconds"][startup.CACHED]) == 1 and result["diffusers_over_sdrt_cached"] > 0
    assert list((engine / "unet").glob("ort-optimized/*.onnx"))  # the first cached start wrote the unet's graph
    folder = startup.write(result, tmp_path / "out", "sdrt bench … --startup")
    assert "diffusers / sdrt" in (folder / "result.md").read_text()
