"""The benchmark's model: an engine directory, or a random-weight full-size architecture exported once.

An architecture (sd15, sd21, sdxl; sdrt.bench.fullsize) is written and exported into the work folder on first
use and reused after; an engine directory is checked against the scenario (precision, step-caching graphs, tiny
VAE) before anything loads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import UserError

from sdrt.bench.scenarios import Progress, Scenario, silent


@dataclass(frozen=True)
class ModelPaths:
    engine_dir: Path
    source_dir: Path | None  # the diffusers folder it was exported from, when it exists here
    tiny_dir: Path | None = None  # the AutoencoderTiny folder its vae_decoder_tiny came from, when it exists here


def prepare_model(scenario: Scenario, workdir: Path, on_progress: Progress = silent) -> ModelPaths:
    if scenario.is_architecture:
        return prepare_architecture(scenario.model, scenario.precision, Path(workdir), on_progress,
                                    scenario.vae == "tiny", scenario.cache_interval > 1)
    engine_dir = Path(scenario.model)
    manifest = _manifest(engine_dir)
    if manifest is not None and manifest.get("precision") and manifest["precision"] != scenario.precision:
        raise UserError(f"{engine_dir} was exported in {manifest['precision']}, not {scenario.precision}; pass "
                        f"--precision {manifest['precision']} or export it again")
    location = (manifest or {}).get("source", {}).get("location")
    source = Path(location) if location and Path(location).is_dir() else None
    tiny = ((manifest or {}).get("tiny_vae") or {}).get("location")
    if scenario.cache_interval > 1 and not (engine_dir / "unet_deepcache_shallow" / "model.onnx").is_file():
        raise UserError(f"--cache-interval: {engine_dir} has no step-caching graphs; export it with sdrt export "
                        "--deepcache")
    if scenario.vae == "tiny" and not (engine_dir / "vae_decoder_tiny" / "model.onnx").is_file():
        raise UserError(f"--vae tiny: {engine_dir} has no vae_decoder_tiny; export it with sdrt export --tiny-vae")
    return ModelPaths(engine_dir, source, Path(tiny) if tiny and Path(tiny).is_dir() else None)


def _manifest(engine_dir: Path) -> dict | None:
    path = Path(engine_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def prepare_architecture(arch: str, precision: str, workdir: Path, on_progress: Progress,
                         tiny: bool = False, deepcache: bool = False) -> ModelPaths:
    from sdrt.bench import fullsize

    folder = workdir / arch / "model"
    engine_dir = workdir / arch / f"engine-{precision}"
    if not (folder / "model_index.json").is_file():
        on_progress(f"writing the random-weight {arch} pipeline to {folder}", 0, 0)
        partial = folder.with_name("model.partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier run that was killed
        try:
            fullsize.write(arch, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(folder)
    tiny_dir = workdir / arch / "taesd" if tiny else None
    if tiny_dir is not None and not (tiny_dir / "config.json").is_file():
        from sdrt.export.extras.tiny_vae import write_tiny_vae

        on_progress(f"writing a random-weight TAESD (AutoencoderTiny's default config) to {tiny_dir}", 0, 0)
        write_tiny_vae(tiny_dir, scale_factor=size_multiple_of_architecture(arch), full_size=True)
    manifest = _manifest(engine_dir)
    stale = manifest is None or manifest.get("precision") != precision
    missing_cache = deepcache and "unet_deepcache_shallow" not in (manifest or {}).get("components", {})
    if stale or (tiny and not manifest.get("tiny_vae")) or missing_cache:
        from sdrt.export.exporter import ExportConfig, export

        on_progress(f"exporting {folder} ({precision}) to {engine_dir}", 0, 0)
        export(ExportConfig(model=str(folder), output=engine_dir, precision=precision,
                            force=manifest is not None and stale, tiny_vae=str(tiny_dir) if tiny_dir else None,
                            deepcache=deepcache or "unet_deepcache" in (manifest or {}).get("components", {})),
               lambda name, status: on_progress(f"export {name}: {status}", 0, 0))
    return ModelPaths(engine_dir, folder, tiny_dir)


def size_multiple(engine_dir: Path) -> int:
    from sdrt.runtime.loader import open_dir

    d = open_dir(engine_dir)
    return d.vae_scale_factor * d.latent_multiple


def size_multiple_of_architecture(arch: str) -> int:
    """The VAE factor from the published configs, before anything is built: sdrt's exports take any latent size
    (the UNet resizes each up-sampler to its skip connection, as diffusers does)."""
    cfg = json.loads((Path(__file__).parent / "configs" / f"{arch}.json").read_text())
    patch = 2 if "transformer" in cfg else 1  # SD3's patch size, FLUX.1's 2×2 packing
    return 2 ** (len(cfg["vae"]["block_out_channels"]) - 1) * patch


def check_size(scenario: Scenario, multiple: int) -> None:
    if scenario.width % multiple or scenario.height % multiple:
        raise UserError(f"width and height must be multiples of {multiple} for this model "
                        f"(got {scenario.width}x{scenario.height})")
