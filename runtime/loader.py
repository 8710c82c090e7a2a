"""Opening an engine directory (sdrt's or optimum's layout) once: its manifest.json (written by sdrt.export; schema in
export/manifest.schema.json), configs and the components it holds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import UserError
from sdrt.runtime.family import ModelInfo, denoiser_folder, detect


FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def read_manifest(engine_dir: Path) -> dict | None:
    """The manifest, or None for a folder without one (e.g. exported by optimum-cli)."""
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable manifest ({e}); re-export the model with `sdrt export`") from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{path} has manifest format version {version}, newer than this sdrt reads ({FORMAT_VERSION}); "
            "upgrade sdrt or re-export with this version")
    return manifest


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the engine directory is incomplete (re-export it)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}); re-export the engine directory") from None


def model_info(engine_dir: Path) -> ModelInfo:
    engine_dir = Path(engine_dir)
    model_index = _json(engine_dir / "model_index.json")
    return detect(model_index, _json(engine_dir / denoiser_folder(model_index) / "config.json"),
                  _json(engine_dir / "scheduler" / "scheduler_config.json"))


@dataclass(frozen=True)
class EngineDir:
    """What the runtime needs to know about a directory before opening any engine."""

    path: Path
    info: ModelInfo
    model_index: dict
    scheduler_config: dict
    unet_config: dict  # the denoiser's config: unet/ or, for the transformer families, transformer/
    vae_config: dict
    manifest: dict | None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)

    @property
    def latent_multiple(self) -> int:
        """Latent sizes must be multiples of this. sdrt's manifest records it: 1 for UNets exported to resize
        each up-sampler to its skip connection (any size, as diffusers), the UNet's down-sampling factor for
        earlier exports. Folders without a manifest (optimum's) keep that factor: their UNets were traced at a
        multiple of it and double at every up-sampler."""
        recorded = (self.manifest or {}).get("latent_multiple")
        if isinstance(recorded, int) and recorded >= 1:
            return recorded
        return 2 ** (len(self.unet_config["block_out_channels"]) - 1)

    @property
    def default_size(self) -> int:
        return int(self.unet_config.get("sample_size", 64)) * self.vae_scale_factor

    @property
    def text_encoder_names(self) -> list[str]:
        return [n for n in self.info.layout.text_encoders if self.has(n)]

    def has(self, component: str) -> bool:
        """Whether the directory holds `component`'s graph (component/model.onnx)."""
        return (self.path / component / "model.onnx").is_file()

    def onnx_path(self, component: str) -> Path:
        path = self.path / component / "model.onnx"
        if not path.is_file():
            raise UserError(f"{path} is missing; export this component (sdrt export --components {component})")
        return path


def open_dir(path: str | Path) -> EngineDir:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; give an engine directory written by `sdrt export`")
    manifest = read_manifest(path)
    if manifest is None and not (path / "model_index.json").exists():
        raise UserError(f"{path} is not an engine directory (no manifest.json or model_index.json); "
                        "create one with `sdrt export MODEL -o DIR`")
    model_index = _json(path / "model_index.json")
    unet_config = _json(path / denoiser_folder(model_index) / "config.json")
    scheduler_config = _json(path / "scheduler" / "scheduler_config.json")
    return EngineDir(path=path, info=detect(model_index, unet_config, scheduler_config), model_index=model_index,
                     scheduler_config=scheduler_config, unet_config=unet_config,
                     vae_config=_json(path / "vae_decoder" / "config.json"), manifest=manifest)
