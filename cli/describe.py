"""What an engine directory holds, as a plain dict for `sdrt info` (and tests)."""

from __future__ import annotations

from pathlib import Path

from sdrt.runtime.errors import UserError
from sdrt.runtime.loader import read_manifest

_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


def _worst(c: dict) -> str:
    outs = [o for case in c["gate"]["cases"] for o in case["outputs"]]
    if c["precision"] == "fp32":
        return f"rel. error {max(o['rel_error'] for o in outs):.2g}"
    return f"PSNR {min(o['psnr_db'] for o in outs):.1f} dB"


def describe(engine_dir: Path) -> dict:
    from sdrt.engines.ort import available_backends

    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise UserError(f"{engine_dir} is not a directory; give an engine directory written by `sdrt export`")
    manifest = read_manifest(engine_dir)
    if manifest is None:
        found = [n for n in _COMPONENTS if (engine_dir / n / "model.onnx").exists()]
        if not found:
            raise UserError(f"{engine_dir} holds neither manifest.json nor <component>/model.onnx files; "
                            "export a model into it with `sdrt export`")
        from sdrt.runtime.loader import model_info

        info = model_info(engine_dir)
        return {
            "engine_dir": str(engine_dir.absolute()), "writer": "another exporter (no manifest; e.g. optimum-cli)",
            "family": info.family.value, "inpaint": info.inpaint, "prediction_type": info.prediction_type,
            "pipeline_class": info.pipeline_class,
            "components": {n: {"precision": "?", "files": ["model.onnx"], "gate": "not recorded", "figure": "-"}
                           for n in found},
            "plans": [], "backends": available_backends(),
        }
    components = {
        name: {
            "precision": c["precision"] + (" (kept fp32)" if c.get("kept_fp32_reason") else ""),
            "files": c["files"],
            "gate": ("passed" if c["gate"]["passed"] else "FAILED") + f" ({c['gate']['bound']})",
            "figure": _worst(c),
        }
        for name, c in manifest["components"].items()
    }
    plans = [f"{p.get('component')} {p.get('profile')} ({p.get('file')})" for p in manifest.get("trt", [])]
    return {
        "engine_dir": str(engine_dir.absolute()), "writer": f"sdrt {manifest['sdrt_version']}",
        "family": manifest["family"], "inpaint": manifest["inpaint"], "prediction_type": manifest["prediction_type"],
        "pipeline_class": manifest.get("pipeline_class", ""), "components": components, "plans": plans, "backends": available_backends(),
    }
