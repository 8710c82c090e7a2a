"""The engine directory's side of LoRA: each component's weights map (export/weights_map.py: which ONNX
initializers hold which module's weight, and how a delta is laid into them), the stored base values, and base + deltas
merged per initializer."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from sdrt.runtime.conditioning.graphs import LORA_UNET_VARIANTS
from sdrt.runtime.errors import UserError
from sdrt.runtime.lora.keys import COMPONENTS, UnetLayout
from sdrt.runtime.lora.files import LoraError, Model, _stat_key

WEIGHTS_MAP_NAME = "weights_map.json"
WEIGHTS_MAP_FORMAT = 1


# ---- the engine directory's side -------------------------------------------------------------------------



def lora_component(name: str) -> str:
    """The component whose LoRA deltas apply to graph `name` (a UNet variant takes the UNet's)."""
    return "unet" if name in LORA_UNET_VARIANTS else name  # runtime/conditioning/graphs.py


def weights_map(engine_dir: Path, name: str) -> dict:
    """Graph `name`'s weights_map.json (a UNet variant's included)."""
    path = Path(engine_dir) / name / WEIGHTS_MAP_NAME
    if not path.is_file():
        raise LoraError(f"{path.parent} {NO_MAPS}")
    return _read_map(*_stat_key(path))


def read_weights_maps(engine_dir: Path) -> dict[str, dict]:
    """component → its weights_map.json, for the components that have one."""
    maps = {}
    for component in COMPONENTS:
        path = Path(engine_dir) / component / WEIGHTS_MAP_NAME
        if path.is_file():
            maps[component] = _read_map(*_stat_key(path))
    return maps


@lru_cache(maxsize=16)
def _read_map(path: str, size: int, mtime: int) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}); re-export the engine directory") from None
    if doc.get("format_version") != WEIGHTS_MAP_FORMAT:
        raise UserError(f"{path} has weights-map format {doc.get('format_version')}, not {WEIGHTS_MAP_FORMAT}; "
                        "re-export the engine directory with this sdrt")
    return doc


NO_MAPS = ("was exported without weights maps (by an older sdrt or another tool), so LoRAs cannot be applied "
           "at load; re-export it with this sdrt, or fuse the LoRAs into the export")


def model_for(engine_dir) -> Model:
    """The Model of an opened engine directory (runtime/loader.EngineDir); LoraError when it has no maps."""
    maps = read_weights_maps(engine_dir.path)
    denoiser = engine_dir.info.layout.denoiser  # SD3 / FLUX.1 transformers exported before they had maps
    if not maps or (denoiser not in maps and engine_dir.has(denoiser)):
        raise LoraError(f"{engine_dir.path} {NO_MAPS}")
    targets = {c: {p: tuple(e["shape"]) for p, e in m["weights"].items()} for c, m in maps.items()}
    return Model(targets, UnetLayout.from_config(engine_dir.unet_config), engine_dir.info.family.value)


def transform(delta: np.ndarray, kind: str) -> np.ndarray:
    """A weight's delta in the layout of one of its initializers (export/weights_map.py's transforms).

    The sub-pixel kernels of export/rewrites.py are sums and slices of the 3×3 taps, linear in the weight,
    so the delta of each is the same sum of the delta's taps."""
    if kind == "identity":
        return delta
    if kind == "transpose":
        return delta.T
    if not kind.startswith("subpixel:"):
        raise UserError(f"unknown weights-map transform {kind!r}; re-export the engine directory with this sdrt")
    part = kind.removeprefix("subpixel:")

    def phases(t0, t1, t2, axis):  # 3 taps → the 2-tap kernels of output phases 2i and 2i+1
        return [np.stack([t0, t1 + t2], axis), np.stack([t0 + t1, t2], axis)]

    if part.startswith("kernel_"):
        a, b = int(part[-2]), int(part[-1])
        rows = phases(delta[:, :, 0], delta[:, :, 1], delta[:, :, 2], 2)[a]  # [O, I, 2, 3]
        return phases(rows[..., 0], rows[..., 1], rows[..., 2], 3)[b]  # [O, I, 2, 2]
    if part.startswith("last_row_"):
        row = delta[:, :, 2]  # [O, I, 3]
        return phases(row[..., 0], row[..., 1], row[..., 2], 2)[int(part[-1])][:, :, None, :]
    if part.startswith("last_col_"):
        col = delta[:, :, :, 2]
        return phases(col[..., 0], col[..., 1], col[..., 2], 2)[int(part[-1])][:, :, :, None]
    if part == "corner":
        return delta[:, :, 2:3, 2:3]
    raise UserError(f"unknown weights-map transform {kind!r}; re-export the engine directory with this sdrt")


def base_initializer(component_dir: Path, doc: dict, init: dict) -> np.ndarray:
    """The stored base value of one mapped initializer, read from the component's external data file."""
    data = component_dir / doc["data_file"]
    count = math.prod(init["shape"])
    try:
        array = np.fromfile(data, dtype=np.dtype(init["dtype"]), count=count, offset=init["offset"])
    except (OSError, ValueError) as e:
        raise UserError(f"{data} cannot be read ({e}); re-export the engine directory") from None
    if array.size != count:
        raise UserError(f"{data} is shorter than its weights map says; the engine directory is damaged "
                        "(re-export it)")
    return array.reshape(init["shape"])


def merged_initializers(component_dir: Path, doc: dict, component_deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{initializer name: base + delta in the initializer's layout and dtype} for every patched weight."""
    out = {}
    for path, delta in component_deltas.items():
        entry = doc["weights"].get(path)
        if entry is None or not entry["initializers"]:
            raise LoraError(f"{doc['component']} {path} is not in the exported graph's weights map")
        for init in entry["initializers"]:
            base = base_initializer(component_dir, doc, init)
            merged = base.astype(np.float32) + transform(delta, init["transform"]).reshape(base.shape)
            out[init["name"]] = np.ascontiguousarray(merged.astype(base.dtype))
    return out
