"""LoRA fused at export (`sdrt export --lora FILE[:SCALE]`): parity with diffusers' fuse_lora, the manifest's
record, and bad files refused before anything is written. LoRA files are made as in tests/test_lora.py."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from test_lora import MIN_MOVE, diffusers_images, make_layers, moved, ours, write_diffusers, write_kohya
from test_parity import assert_same_images

from sdrt.export.exporter import ExportConfig, export
from sdrt.runtime.lora.files import file_sha256
from sdrt.runtime.pipeline import Pipeline

SCHEMA = json.loads((Path(__file__).parent.parent / "export" / "manifest.schema.json").read_text())


# SDXL LoRAs are also checked at load time by default (test_lora.py)
@pytest.mark.parametrize("family", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_loras_fused_at_export_equal_diffusers(tiny_pipeline, tmp_path, family):
    folder = tiny_pipeline(family)
    sdxl = family == "sdxl"
    text = {"text_encoder": (4, 0.1)} | ({"text_encoder_2": (4, 0.1)} if sdxl else {})
    kohya = write_kohya(tmp_path / "k.safetensors", make_layers(folder, {"unet": (4, 0.03)} | text, seed=11),
                        alpha=2.0, sdxl=sdxl)
    loras = [(kohya, 0.8)]
    if not sdxl:  # two at once, one in each format
        loras.append((write_diffusers(tmp_path / "d.safetensors", make_layers(folder, {"unet": (4, 0.02)}, seed=12)),
                      -0.6))
    out = tmp_path / "engine"
    names = ("text_encoder", "text_encoder_2", "unet", "vae_decoder") if sdxl else ("text_encoder", "unet", "vae_decoder")
    manifest = export(ExportConfig(model=str(folder), output=out, precision="fp32", components=names,
                                   loras=tuple((str(p), s) for p, s in loras)))
    jsonschema.validate(manifest, SCHEMA)
    assert [(r["file"], r["sha256"], r["scale"]) for r in manifest["loras"]] == \
        [(p.name, file_sha256(p), s) for p, s in loras]

    prompt, seed = "a paper crane", 13
    base = diffusers_images(folder, [], prompt, seed)
    theirs = diffusers_images(folder, loras, prompt, seed)
    mine = ours(Pipeline.load(out, backend="ort-cpu"), prompt, seed)
    assert moved(theirs, base) >= MIN_MOVE
    assert_same_images(f"lora-export-{family}-{len(loras)}", mine, theirs)


def test_export_refuses_a_bad_lora_and_writes_nothing(tiny_pipeline, tmp_path):
    from conftest import run_sdrt

    from sdrt.runtime.errors import UserError

    sdxl_file = write_kohya(tmp_path / "xl.safetensors", make_layers(tiny_pipeline("sdxl"), {"text_encoder_2": (2, 0.1)},
                                                                     seed=1), alpha=1.0, sdxl=True)
    out = tmp_path / "never"
    result = run_sdrt("export", str(tiny_pipeline("sd15")), "-o", str(out), "--precision", "fp32", "--lora",
                      f"{sdxl_file}:inf")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --lora") and "finite" in lines[0], result.stderr
    for path, fragment in ((sdxl_file, "is a LoRA for SDXL"), (tmp_path / "missing.safetensors", "no such LoRA file")):
        with pytest.raises(UserError, match=fragment):
            export(ExportConfig(model=str(tiny_pipeline("sd15")), output=out, precision="fp32",
                                loras=((str(path), 1.0),)))
    assert not out.exists() and not list(tmp_path.glob(".never*"))
