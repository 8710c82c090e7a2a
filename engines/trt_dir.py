"""TensorRT plans of an engine directory: what a build would make (any machine), and the build itself."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import UserError
from sdrt.runtime.loader import MANIFEST_NAME, read_manifest

from sdrt.engines import trt_profiles as tp

BUILD_ORDER = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder",
               "vae_encoder")


@dataclass(frozen=True)
class PlannedPlan:
    component: str
    profile: tp.Profile
    file: str  # relative to the engine directory
    shapes: dict
    exists: bool


def plan(engine_dir: Path, profiles: list[tp.Profile], components: tuple[str, ...] | None,
         compute_capability: tuple[int, int] | None, trt_version: str | None) -> list[PlannedPlan]:
    """The plans a build would make for these profiles, and which already exist.

    Without a GPU or TensorRT (compute_capability / trt_version None) names carry "sm?" / "trt?".
    """
    manifest = read_manifest(engine_dir)
    if manifest is None:
        raise UserError(f"{engine_dir} has no manifest.json; TensorRT plans are built from `sdrt export` output")
    present = [c for c in BUILD_ORDER if c in manifest["components"]] + \
        [c for c in manifest["components"] if c in ("unet_controlnet", "image_encoder", "unet_ip", "unet_controlnet_ip",
                                                     "unet_pulid")
         or c.startswith(("controlnet/", "instantid/", "pulid/", "photomaker/"))]
    chosen = [c for c in present if components is None or c in components]
    if components and (unknown := set(components) - set(present)):
        raise UserError(f"{', '.join(sorted(unknown))} not in {engine_dir}; it has {', '.join(present)}")
    out = []
    for component in chosen:
        entry = manifest["components"][component]
        inputs = {i["name"]: i["shape"] for i in entry["inputs"]}
        for profile in profiles:
            name = tp.plan_file(component, profile, entry["precision"], compute_capability or ("?", ""),
                                trt_version or "?")
            rel = f"trt/{name}"
            shapes = tp.input_shapes(component, inputs, profile, manifest["vae_scale_factor"], manifest["family"])
            out.append(PlannedPlan(component, profile, rel, shapes, (Path(engine_dir) / rel).exists()))
    return out


def build(engine_dir: Path, planned: list[PlannedPlan], options, compute_capability: tuple[int, int],
          trt_version: str, on_plan=lambda plan, status: None) -> list[dict]:
    """Build the missing plans one at a time and record them in the manifest (rewritten atomically)."""
    from sdrt.engines.trt_build import build_plan

    engine_dir = Path(engine_dir)
    (engine_dir / "trt").mkdir(exist_ok=True)
    manifest = read_manifest(engine_dir)
    records = [r for r in manifest.get("trt", [])]
    for p in planned:
        if p.exists:
            on_plan(p, "exists")
            continue
        on_plan(p, "building")
        label = f"{p.component} at profile {p.profile.name()}"
        result = build_plan(engine_dir / p.component / "model.onnx", engine_dir / p.file, p.shapes, label, options)
        records = [r for r in records if r["file"] != p.file] + [{
            "component": p.component, "profile": p.profile.name(), **tp.profile_record(p.profile),
            "precision": manifest["components"][p.component]["precision"],
            "compute_capability": list(compute_capability), "trt_version": trt_version, "file": p.file,
            "optimization_level": options.optimization_level, "refittable": options.refittable, **result}]
        manifest["trt"] = records
        _write_manifest(engine_dir, manifest)
        on_plan(p, "built")
    return records


def _write_manifest(engine_dir: Path, manifest: dict) -> None:
    tmp = engine_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, engine_dir / MANIFEST_NAME)
