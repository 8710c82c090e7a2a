"""Export stage: every tiny family in fp32 and fp16, optimum's layout and names, manifest schema, resume."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import onnx
import pytest

from sdrt.export.exporter import ExportConfig, export
from sdrt.export.models.tiny import FAMILIES

SCHEMA = json.loads((Path(__file__).parents[1] / "export" / "manifest.schema.json").read_text())

EXPECTED_COMPONENTS = {
    "sd15": {"text_encoder", "unet", "vae_decoder", "vae_encoder"},
    "sd21v": {"text_encoder", "unet", "vae_decoder", "vae_encoder"},
    "sd15-inpaint": {"text_encoder", "unet", "vae_decoder", "vae_encoder"},
    "sdxl": {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"},
    "sdxl-lightning": {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"},
    "sdxl-refiner": {"text_encoder_2", "unet", "vae_decoder", "vae_encoder"},
}
EXPECTED_FAMILY = {"sd15": "sd15", "sd21v": "sd21", "sd15-inpaint": "sd15", "sdxl": "sdxl",
                   "sdxl-lightning": "sdxl", "sdxl-refiner": "sdxl-refiner"}


def _io(path: Path) -> tuple[dict, dict]:
    graph = onnx.load(str(path), load_external_data=False).graph

    def table(values):
        return {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values}

    return table(graph.input), table(graph.output)


# fp16 exports of the families whose fp16 path is the SD 1.5 or SDXL UNet's again (sd15-fp16 and sdxl-fp16 run by
# default): slow
_FP16_AGAIN = {"sdxl-refiner", "sdxl-lightning", "sd21v", "sd15-inpaint"}
_FAMILY_PRECISIONS = [pytest.param(f, p, marks=pytest.mark.slow) if p == "fp16" and f in _FP16_AGAIN else (f, p)
                      for f in FAMILIES for p in ("fp32", "fp16")]


@pytest.mark.parametrize("family,precision", _FAMILY_PRECISIONS)
def test_every_family_exports_and_passes_its_gate(exported, family, precision):
    out = exported(family, precision)
    manifest = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["family"] == EXPECTED_FAMILY[family]
    assert manifest["prediction_type"] == ("v_prediction" if family == "sd21v" else "epsilon")
    assert manifest["inpaint"] == (family == "sd15-inpaint")
    assert set(manifest["components"]) == EXPECTED_COMPONENTS[family]
    for name, entry in manifest["components"].items():
        assert entry["gate"]["passed"], name
        assert len(entry["gate"]["cases"]) == 2
        batches = {case["shape"]["batch"] for case in entry["gate"]["cases"]}
        assert batches == {1, 2}
        for rel in entry["files"]:
            assert (out / name / rel).is_file()
        assert (out / name / "config.json").is_file()
        outs = [o for case in entry["gate"]["cases"] for o in case["outputs"]]
        if entry["precision"] == "fp32":
            assert max(o["rel_error"] for o in outs) <= 1e-4
        else:
            assert min(o["psnr_db"] for o in outs) >= 35
    sdxl_like = family.startswith("sdxl")
    for vae in ("vae_decoder", "vae_encoder"):
        entry = manifest["components"][vae]
        if precision == "fp16" and sdxl_like:  # force_upcast VAE stays fp32, and the manifest says why
            assert entry["precision"] == "fp32" and "force_upcast" in entry["kept_fp32_reason"]
        else:
            assert entry["precision"] == precision
    scheduler = manifest["scheduler"]
    assert scheduler["timestep_spacing"] == ("trailing" if family == "sdxl-lightning" else scheduler["timestep_spacing"])
    for versioned in ("torch", "diffusers", "onnx", "onnxruntime"):
        assert manifest["versions"][versioned]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sdxl_layout_and_tensor_names_are_optimums(exported, precision):
    out = exported("sdxl", precision)
    float_type = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    for f in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
              "tokenizer_2/vocab.json", "tokenizer_2/merges.txt"):
        assert (out / f).is_file(), f
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"

    inputs, outputs = _io(out / "text_encoder_2" / "model.onnx")
    assert inputs == {"input_ids": (onnx.TensorProto.INT64, ["batch_size", "sequence_length"])}
    assert list(outputs)[:2] == ["last_hidden_state", "text_embeds"]
    layers = json.loads((out / "text_encoder_2" / "config.json").read_text())["num_hidden_layers"]
    assert [n for n in outputs if n.startswith("hidden_states.")] == [f"hidden_states.{i}" for i in range(layers + 1)]
    assert list(_io(out / "text_encoder" / "model.onnx")[1])[:2] == ["last_hidden_state", "pooler_output"]

    inputs, outputs = _io(out / "unet" / "model.onnx")
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert inputs["sample"] == (float_type, ["batch_size", 4, "height", "width"])
    assert inputs["timestep"] == (onnx.TensorProto.FLOAT, [])  # rank-0 float32 even in fp16 exports
    assert inputs["encoder_hidden_states"][1] == ["batch_size", "sequence_length", 64]
    assert inputs["time_ids"][1] == ["batch_size", 6]
    assert outputs["out_sample"] == (float_type, ["batch_size", 4, "height", "width"])

    inputs, outputs = _io(out / "vae_decoder" / "model.onnx")
    assert list(inputs) == ["latent_sample"] and list(outputs) == ["sample"]
    inputs, outputs = _io(out / "vae_encoder" / "model.onnx")
    assert list(inputs) == ["sample"] and list(outputs) == ["latent_parameters"]
    assert outputs["latent_parameters"][1][1] == 8  # mean ‖ logvar


def test_refiner_unet_takes_five_time_ids(exported):
    inputs, _ = _io(exported("sdxl-refiner", "fp32") / "unet" / "model.onnx")
    assert inputs["time_ids"][1] == ["batch_size", 5]
    assert not (exported("sdxl-refiner", "fp32") / "text_encoder").exists()


def test_rerun_skips_unchanged_components_and_force_redoes_them(tiny_pipeline, tmp_path):
    out = tmp_path / "engine"
    model = str(tiny_pipeline("sd15"))
    cfg = ExportConfig(model=model, output=out, precision="fp32", components=("vae_decoder", "text_encoder"))
    first = export(cfg)
    events: list[tuple[str, str]] = []
    second = export(cfg, lambda name, status: events.append((name, status)))
    assert events == [("text_encoder", "skipped"), ("vae_decoder", "skipped")]
    assert second["components"] == first["components"]

    (out / "vae_decoder" / "model.onnx").write_bytes(b"damaged")
    events.clear()
    export(cfg, lambda name, status: events.append((name, status)))
    assert ("vae_decoder", "exported") in events and ("text_encoder", "skipped") in events
    onnx.checker.check_model(str(out / "vae_decoder" / "model.onnx"))

    events.clear()
    export(ExportConfig(**{**cfg.__dict__, "force": True}), lambda name, status: events.append((name, status)))
    assert [s for _, s in events if s != "start"] == ["exported", "exported"]
    assert not list(tmp_path.glob(".engine.sdrt-*"))


@pytest.mark.slow  # about 15 s: a whole export through the console entry point
def test_vae_swap_with_an_fp16_safe_vae_exports_it_in_fp16_and_json_summary(tiny_pipeline, tmp_path):
    """--vae with a VAE whose config clears force_upcast (like sdxl-vae-fp16-fix) lifts the fp32 fallback."""
    from diffusers import AutoencoderKL

    from conftest import run_sdrt

    vae_dir = tmp_path / "fp16-fix-vae"
    vae = AutoencoderKL.from_pretrained(tiny_pipeline("sdxl") / "vae")
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(vae_dir)
    out = tmp_path / "engine"
    result = run_sdrt("export", str(tiny_pipeline("sdxl")), "-o", str(out), "--vae", str(vae_dir),
                      "--components", "vae_decoder", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["family"] == "sdxl" and summary["precision"] == "fp16"
    assert summary["components"]["vae_decoder"]["precision"] == "fp16"
    assert summary["components"]["vae_decoder"]["kept_fp32_reason"] is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["vae"] == str(vae_dir)
