"""LoRA: files → deltas → engines rebuilt from the stored base weights (DESIGN.md §4a; customization.md §1).

Formats: kohya/AUTOMATIC1111 (`lora_unet_…`, `lora_te_…`, SDXL's `lora_te1_`/`lora_te2_` and sgm block names,
`alpha`), diffusers/PEFT (`unet.….lora_A/lora_B`, `text_encoder[_2].…`, optional `alpha` keys or PEFT's
`lora_adapter_metadata`), and LoCon (the same parts on convolutions, with an optional CP `lora_mid`). Files are
read with safetensors (never unpickled); LoHa, LoKr, DoRA and other LyCORIS kinds are refused by name.
Keys are matched to the model by runtime/lora/keys.py; shapes are checked; a file for another family is named
as such (from its keys, its metadata or its cross-attention width).

The math, per patched weight W (fp32, on the host), for the requested set of LoRAs i with scales s_i:
    W' = W + Σ_i s_i · (α_i / r_i) · up_i @ down_i
(α missing or 0: α = r; a k×k LoCon delta is Σ_r up[o, r] · down[r, i, y, x]; a CP middle as AUTOMATIC1111's
`rebuild_cp_decomposition`). W is always the stored base weight, so switching A → B → none gives exactly
B's and the base's weights ("ghosting" cannot happen).

Where W comes from: the ONNX initializers named by each component's weights_map.json (export/weights_map.py),
read from model.onnx_data. ONNX Runtime gets new sessions whose replaced initializers are the merged weights
(`SessionOptions.add_external_initializers`); TensorRT refits (engines/trt_refit.py); the torch reference
engine adds the deltas to a copy of its module. Adapted engines are cached per (component, LoRA set, scales),
at most MAX_ADAPTED_PER_COMPONENT per component beside the resident ones, least recently used first out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from sdrt.runtime.conditioning.graphs import LORA_UNET_VARIANTS
from sdrt.runtime.errors import UserError
from sdrt.runtime.lora.keys import COMPONENTS, LYCORIS_PARTS, Targets, UnetLayout, lookup_table, parse_key
from sdrt.runtime.fields import InvalidRequest

WEIGHTS_MAP_NAME = "weights_map.json"
WEIGHTS_MAP_FORMAT = 1
MAX_ADAPTED_PER_COMPONENT = 2
METADATA_KEY = "lora_adapter_metadata"  # diffusers' PEFT LoraConfig in the safetensors header
FAMILY_LABELS = {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "the SDXL refiner"}
_WIDTH_FAMILY = {768: "sd15", 1024: "sd21", 2048: "sdxl", 1280: "sdxl-refiner"}


class LoraError(UserError, ValueError):
    """A LoRA that cannot be applied to this model; the message names the file and says why."""


# ---- what a request names -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraRef:
    """One resolved LoRA of a request: the file (absolute path, content hash) and its scale."""

    name: str  # as the caller named it (a tag name, a file stem, a path)
    path: str
    sha256: str
    scale: float
    components: tuple[str, ...] = field(default=(), compare=False)  # which components it patches

    @property
    def key(self) -> tuple[str, float]:
        return (self.sha256, self.scale)


def check_scale(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoraError(f"{what}: the scale must be a number, not {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise LoraError(f"{what}: the scale must be a finite number (got {value})")
    return value


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` (the CLI's form; also NAME[:SCALE] for a name in the LoRA folder) → (file, scale)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan|infinity)", tail.strip(),
                                     re.IGNORECASE):
        return head, check_scale(float(tail), text)
    return text, 1.0


def normalize_entries(value, field_name: str = "loras") -> list[tuple[str, float]]:
    """A request's `loras` as (name or path, scale) pairs: accepts [name, scale] pairs, {"name", "scale"} objects
    and plain strings (`NAME` or `NAME:SCALE`)."""
    if value is None:
        return []
    if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for item in value:
        if isinstance(item, str):
            out.append(parse_lora_arg(item))
        elif isinstance(item, dict):
            unknown = set(item) - {"name", "path", "scale"}
            name = item.get("name", item.get("path"))
            if unknown or not isinstance(name, str):
                raise LoraError(f"each LoRA is [name, scale], \"name:scale\" or {{\"name\": …, \"scale\": …}}; "
                                f"got {item!r}")
            out.append((name, check_scale(item.get("scale", 1.0), name)))
        elif isinstance(item, (list, tuple)) and len(item) in (1, 2) and isinstance(item[0], str):
            out.append((item[0], check_scale(item[1], item[0]) if len(item) == 2 else 1.0))
        else:
            raise LoraError(f"each LoRA is [name, scale], \"name:scale\" or {{\"name\": …, \"scale\": …}}; "
                            f"got {item!r}")
    return out


# ---- files -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    """What a LoRA file holds, read without its tensors' data (only the tiny alpha scalars)."""

    path: str
    shapes: dict  # key → shape
    metadata: dict
    alphas: dict  # key → float, for keys ending in `.alpha`


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def read_header(path: str | Path) -> Header:
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    if path.suffix.lower() in (".pt", ".ckpt", ".bin", ".pth"):
        raise LoraError(f"{path}: sdrt reads LoRA files in the .safetensors format only (pickled {path.suffix} "
                        "files can run code when loaded); convert it to .safetensors")
    return _read_header(*_stat_key(path))


@lru_cache(maxsize=64)
def _read_header(path: str, size: int, mtime: int) -> Header:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
            alphas = {k: float(f.get_tensor(k).float().reshape(-1)[0]) for k in shapes
                      if k.endswith(".alpha") and math.prod(shapes[k]) == 1}
    except Exception as e:  # safetensors' SafetensorError, OSError, a header that is not JSON, …
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LoraError(f"{path} is not a readable .safetensors LoRA file ({first})") from None
    if not shapes:
        raise LoraError(f"{path} holds no tensors; it is not a LoRA")
    return Header(path, shapes, metadata, alphas)


def file_sha256(path: str | Path) -> str:
    return _sha256(*_stat_key(Path(path)))


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensors(path: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k).float().numpy() for k in keys}


# ---- matching a file to a model --------------------------------------------------------------------------

@dataclass(frozen=True)
class Module:
    """One patched weight of a LoRA file."""

    component: str
    path: str  # canonical module path (runtime/lora/keys.py)
    down: str  # keys in the file
    up: str
    mid: str | None
    rank: int
    alpha_scale: float  # α / r (or α / √r with rsLoRA; 1 without α)


@dataclass(frozen=True)
class Model:
    """What LoRA matching needs to know of a model: its targets, UNet layout and family."""

    targets: Targets  # component → {canonical module path: weight shape}
    layout: UnetLayout | None
    family: str  # Family value: sd15 | sd21 | sdxl | sdxl-refiner

    @property
    def label(self) -> str:
        return FAMILY_LABELS.get(self.family, self.family)


def guess_family(header: Header) -> tuple[set[str], str, str] | None:
    """(family codes, label, evidence) of a LoRA file, from its metadata, key names or cross-attention width."""
    version = str(header.metadata.get("ss_base_model_version", ""))
    if version.startswith("sdxl"):
        return {"sdxl", "sdxl-refiner"}, "SDXL", f"its metadata says ss_base_model_version={version}"
    if version.startswith("sd_v2") or str(header.metadata.get("ss_v2", "")).lower() == "true":
        return {"sd21"}, "SD 2.x", "its metadata says it was trained on SD 2.x"
    if version.startswith("sd_v1"):
        return {"sd15"}, "SD 1.x", f"its metadata says ss_base_model_version={version}"
    keys = list(header.shapes)
    if any(k.startswith(("lora_transformer_", "transformer.", "lora_unet_double_blocks", "lora_unet_single_blocks",
                         "lora_unet_joint_blocks")) for k in keys):
        return set(), "a transformer model (Flux or SD3)", "its keys name transformer blocks, not a UNet"
    for key, shape in header.shapes.items():
        if re.search(r"attn2[._]to_k[._](lora_down|lora_A|lora\.down)", key) and len(shape) >= 2:
            code = _WIDTH_FAMILY.get(shape[1])
            if code:
                return {code}, FAMILY_LABELS[code], f"its cross-attention keys take {shape[1]}-wide text embeddings"
    if any(k.startswith(("lora_te2_", "text_encoder_2.", "lora_te1_")) for k in keys):
        return {"sdxl"}, "SDXL", "it has keys for SDXL's two text encoders (lora_te1_/lora_te2_ or text_encoder_2.)"
    if any(re.search(r"(input_blocks|output_blocks)_\d+_1_transformer_blocks_[1-9]", k) for k in keys):
        return {"sdxl"}, "SDXL", "its UNet keys use SDXL's sgm block names with several transformer layers per block"
    if any(k.startswith("lora_te_") for k in keys):
        return {"sd15", "sd21"}, "SD 1.x or 2.x", "its text-encoder keys are lora_te_…, the one-encoder spelling"
    return None


def _wrong_family(header: Header, model: Model) -> str | None:
    guess = guess_family(header)
    if guess is not None and model.family not in guess[0]:
        return f"{Path(header.path).name} is a LoRA for {guess[1]} ({guess[2]}), but this model is {model.label}"
    return None


def _peft_alpha(config: dict, path: str, rank: int) -> float | None:
    """α / r of one module from a diffusers/PEFT LoraConfig (lora_alpha, alpha_pattern, use_rslora)."""
    if not config:
        return None
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    if alpha is None:
        return None
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _peft_configs(header: Header) -> dict[str, dict]:
    raw = header.metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraError(f"{header.path}: its {METADATA_KEY} metadata is not JSON") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    for component, config in configs.items():
        if config.get("use_dora"):
            raise LoraError(f"{header.path} is a DoRA file (use_dora in its metadata); sdrt applies plain LoRA "
                            "and LoCon only")
    return configs


def match(header: Header, model: Model) -> list[Module]:
    """Every patched weight of the file, matched to the model; LoraError for anything that does not fit."""
    name = Path(header.path).name
    groups: dict[tuple, dict[str, str]] = {}
    unknown, unsupported = [], {}
    for key in header.shapes:
        part = parse_key(key)
        if part is None:
            unknown.append(key)
            continue
        if part.role.startswith("other:") or part.role in ("dora", "bias"):
            suffix = part.role[6:] if part.role.startswith("other:") else part.role
            kind = {"dora": "DoRA", "bias": "LoRA-with-bias"}.get(part.role) or LYCORIS_PARTS.get(suffix)
            if kind is None:
                unknown.append(key)
            else:
                unsupported.setdefault(kind, key)
            continue
        groups.setdefault((part.style, part.component, part.module), {})[part.role] = key
    if unsupported:
        kinds = " and ".join(sorted(unsupported))
        example = next(iter(unsupported.values()))
        raise LoraError(f"{name} is a {kinds} file (key {example}); sdrt applies plain LoRA and LoCon files only")

    table = lookup_table(model.targets, model.layout)
    configs = _peft_configs(header)
    modules, unmatched = [], list(unknown)
    for (style, component, module), roles in groups.items():
        if style == "kohya":
            component, path = table.get(module, (None, None))
        else:
            path = module if module in model.targets.get(component, {}) else None
        if path is None:
            unmatched.extend(sorted(roles.values()))
            continue
        if "down" not in roles or "up" not in roles:
            missing = "down (lora_down/lora_A)" if "down" not in roles else "up (lora_up/lora_B)"
            raise LoraError(f"{name}: {module} has no {missing} weight; the file is incomplete")
        modules.append(_module(header, model, component, path, roles, configs.get(component, {})))
    if unmatched:
        wrong = _wrong_family(header, model)
        if wrong:
            raise LoraError(wrong)
        if not modules:
            raise LoraError(f"no key of {name} matches a module of this {model.label} model (first keys: "
                            f"{', '.join(unmatched[:3])}); it is not a LoRA for this model")
        raise LoraError(f"{len(unmatched)} key(s) of {name} match no module of this {model.label} model (first: "
                        f"{', '.join(unmatched[:3])}); it was made for another model")
    return modules


def _module(header: Header, model: Model, component: str, path: str, roles: dict, peft: dict) -> Module:
    shape = tuple(model.targets[component][path])
    down, up = header.shapes[roles["down"]], header.shapes[roles["up"]]
    mid = roles.get("mid")
    rank = down[0] if down else 0
    fits = (len(down) in (2, 4) and len(up) in (2, 4) and up[0] == shape[0] and up[1] == rank
            and down[1] == shape[1] and all(d == 1 for d in up[2:]))
    if fits and mid is None and len(down) == 4:
        fits = tuple(down[2:]) == tuple(shape[2:]) or (len(shape) == 2 and tuple(down[2:]) == (1, 1))
    if fits and len(down) == 2 and len(shape) == 4:
        fits = tuple(shape[2:]) == (1, 1)
    if fits and mid is not None:
        m = header.shapes[mid]
        fits = len(m) == 4 and m[0] == up[1] and m[1] == rank and tuple(m[2:]) == tuple(shape[2:])
    if not fits:
        wrong = _wrong_family(header, model)
        raise LoraError(wrong or f"{Path(header.path).name}: {roles['down']} has shape {list(down)} and "
                                 f"{roles['up']} {list(up)}, which do not fit {component} {path} (weight "
                                 f"{list(shape)}); the LoRA was made for another model")
    alpha = header.alphas.get(roles["alpha"]) if "alpha" in roles else None
    if alpha is not None and alpha != 0:
        alpha_scale = alpha / rank
    elif alpha is None and peft:
        alpha_scale = _peft_alpha(peft, path, rank) or 1.0
    else:
        alpha_scale = 1.0  # kohya: a missing or zero alpha means alpha = rank
    return Module(component, path, roles["down"], roles["up"], mid, rank, alpha_scale)


# ---- deltas ----------------------------------------------------------------------------------------------

def module_delta(module: Module, tensors: dict[str, np.ndarray], shape: tuple) -> np.ndarray:
    """(α / r) · up @ down in the weight's shape, fp32 (the LoRA scale not applied)."""
    down, up = tensors[module.down], tensors[module.up]
    out, rank = up.shape[0], down.shape[0]
    up2 = up.reshape(out, up.shape[1])
    if module.mid is not None:  # CP/Tucker: ΔW[i, j] = Σ_{n,m} M[n, m] · U[i, n] · D[m, j]
        delta = np.einsum("nmhw,in,mj->ijhw", tensors[module.mid], up2, down.reshape(rank, -1))
    elif down.ndim == 4 and tuple(down.shape[2:]) != (1, 1):  # LoCon k×k
        delta = np.einsum("or,rihw->oihw", up2, down)
    else:
        delta = up2 @ down.reshape(rank, -1)
    return (delta.reshape(shape) * np.float32(module.alpha_scale)).astype(np.float32)


def deltas(refs: Sequence[LoraRef], model: Model, component: str) -> dict[str, np.ndarray]:
    """Σ scale · ΔW per module path of `component`, over the LoRAs of `refs` (in their order), fp32."""
    out: dict[str, np.ndarray] = {}
    for ref in refs:
        if ref.scale == 0:
            continue
        modules = [m for m in match(read_header(ref.path), model) if m.component == component]
        if not modules:
            continue
        keys = {k for m in modules for k in (m.down, m.up, m.mid) if k}
        tensors = _tensors(ref.path, keys)
        for m in modules:
            d = module_delta(m, tensors, tuple(model.targets[component][m.path])) * np.float32(ref.scale)
            out[m.path] = out[m.path] + d if m.path in out else d
    return out


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
    if not maps:
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


# ---- naming LoRAs: paths and the LoRA folder -------------------------------------------------------------

def available(lora_dir: Path | None) -> dict[str, Path]:
    """stem → file for every .safetensors under the LoRA folder (sub-folders included; first found wins)."""
    if lora_dir is None or not Path(lora_dir).is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(Path(lora_dir).rglob("*.safetensors")):
        found.setdefault(path.stem, path)
    return found


def locate(name: str, lora_dir: Path | None) -> Path:
    """A LoRA named by path, or by name in the LoRA folder; LoraError naming what the folder has otherwise."""
    if lora_dir is not None:
        named = available(lora_dir)
        if name in named:
            return named[name].absolute()
        if name.endswith(".safetensors") and Path(name).stem in named and os.sep not in name:
            return named[Path(name).stem].absolute()
    path = Path(name).expanduser()
    if path.is_file():
        return path.absolute()
    if lora_dir is None:
        raise LoraError(f"{name!r} is not a file, and no LoRA folder was given to look names up in")
    names = sorted(available(lora_dir))
    listing = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
    raise LoraError(f"no LoRA named {name!r} in {lora_dir}; it has: {listing or 'no .safetensors files'}")


def resolve(entries: Sequence[tuple[str, float]], model: Model, lora_dir: Path | None) -> tuple[LoraRef, ...]:
    """(name or path, scale) pairs → LoraRefs, each file checked against the model (LoraError otherwise)."""
    refs, seen = [], {}
    for name, scale in entries:
        scale = check_scale(scale, name)
        path = locate(name, lora_dir)
        modules = match(read_header(path), model)
        sha = file_sha256(path)
        if sha in seen:
            raise LoraError(f"{name!r} is named twice (also as {seen[sha]!r}); name each LoRA once")
        seen[sha] = name
        refs.append(LoraRef(name, str(path), sha, scale, tuple(sorted({m.component for m in modules}))))
    return tuple(refs)


def combine(base: Sequence[LoraRef], extra: Sequence[LoraRef]) -> tuple[LoraRef, ...]:
    """The pipeline's resident set with a request's set on top (a request's scale replaces the resident one
    for the same file); LoRAs of scale 0 change nothing and are left out."""
    extra_by_sha = {r.sha256: r for r in extra}
    merged = [extra_by_sha.pop(r.sha256, r) for r in base] + [r for r in extra if r.sha256 in extra_by_sha]
    return tuple(r for r in merged if r.scale != 0)


def touching(refs: Sequence[LoraRef], component: str) -> tuple[LoraRef, ...]:
    return tuple(r for r in refs if component in r.components and r.scale != 0)


def set_key(refs: Sequence[LoraRef], component: str) -> tuple:
    return tuple(r.key for r in touching(refs, component))


# ---- the request's side (called by runtime/validate.py) --------------------------------------------------

def request_loras(request, prompts: tuple[str, ...], negative: tuple[str, ...] | None, model_dir,
                  lora_dir: Path | None):
    """(prompts and negative prompts without their <lora:…> tags, the request's resolved LoRAs).

    The set is the request's `loras` followed by the tags of its prompts (AUTOMATIC1111 applies a prompt's
    tags to the whole batch): every prompt of a request must carry the same tags. Raises InvalidRequest."""
    from sdrt.runtime.prompts.tags import TagError, strip_lora_tags

    adapters = getattr(request, "adapters", None)
    try:
        entries = normalize_entries(getattr(adapters, "loras", ()) if adapters is not None else ())
    except LoraError as e:
        raise InvalidRequest("loras", str(e)) from None

    def strip(field_name: str, text: str):
        try:
            return strip_lora_tags(text)
        except TagError as e:
            raise InvalidRequest(field_name, str(e)) from None

    stripped_prompts, per_prompt = zip(*(strip("prompt", t) for t in prompts)) if prompts else ((), ())
    if any(t != per_prompt[0] for t in per_prompt):
        raise InvalidRequest("prompt", "every prompt of one request must carry the same <lora:…> tags (they apply "
                                       "to the whole request); split it into requests")
    tags = list(per_prompt[0]) if per_prompt else []
    stripped_negative = None
    if negative is not None:  # tags in negative prompts apply too, as in AUTOMATIC1111
        stripped_negative, per_negative = zip(*(strip("negative_prompt", t) for t in negative))
        tags += [t for found in per_negative for t in found if t not in tags]
    if not entries and not tags:
        return prompts, negative, ()
    try:
        model = model_for(model_dir)
    except LoraError as e:
        raise InvalidRequest("loras" if entries else "prompt", str(e)) from None
    refs = []
    for field_name, items in (("loras", entries), ("prompt", tags)):
        if field_name == "prompt" and lora_dir is None and items:
            raise InvalidRequest("prompt", f"<lora:{items[0][0]}> names a LoRA, but no LoRA folder was given to "
                                           "look names up in")
        try:
            refs.extend(resolve(items, model, lora_dir))
        except LoraError as e:
            raise InvalidRequest(field_name, str(e)) from None
    shas = [r.sha256 for r in refs]
    if len(set(shas)) != len(shas):
        twice = next(r.name for r in refs if shas.count(r.sha256) > 1)
        raise InvalidRequest("loras", f"{twice!r} is named twice (in loras and in a <lora:…> tag); name it once")
    return tuple(stripped_prompts), (tuple(stripped_negative) if negative is not None else None), tuple(refs)


def resolve_at_load(engine_dir, loras, lora_dir) -> tuple[LoraRef, ...]:
    """Pipeline.load's `loras` resolved and checked against the model (InvalidRequest("loras", …) otherwise)."""

    if not loras:
        return ()
    try:
        return resolve(normalize_entries(loras), model_for(engine_dir), Path(lora_dir) if lora_dir else None)
    except LoraError as e:
        raise InvalidRequest("loras", str(e)) from None


# ---- engines ---------------------------------------------------------------------------------------------

class Adapters:
    """The engines of one pipeline per LoRA set: resident ones (the base, or the set given at load) and a
    bounded LRU of adapted ones, each built from the stored base weights plus the set's deltas."""

    def __init__(self, engine_dir, engines: Callable[[], dict], lora_dir: Path | None = None,
                 max_per_component: int = MAX_ADAPTED_PER_COMPONENT):
        self.dir = engine_dir
        self._engines = engines  # the pipeline's current engine dict (callers may wrap or replace its engines)
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.max_per_component = max_per_component
        self.base: tuple[LoraRef, ...] = ()
        self.resident: dict[str, tuple] = {}  # component → LoRA set key its resident engine holds (absent: none)
        self.cache: OrderedDict[tuple, object] = OrderedDict()
        self._model: Model | None = None

    @property
    def model(self) -> Model:
        if self._model is None:
            self._model = model_for(self.dir)
        return self._model

    def resolve(self, entries: Sequence) -> tuple[LoraRef, ...]:
        return resolve(normalize_entries(entries), self.model, self.lora_dir)

    def use(self, refs: Sequence[LoraRef], lora_dir: Path | None) -> None:
        """Pipeline.load's settings: the LoRA folder, and the set every request starts from."""
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        if refs:
            self.set_base(refs)

    def set_base(self, refs: Sequence[LoraRef]) -> None:
        """Make `refs` the set every request starts from: the resident engines are rebuilt with it."""
        self.base = tuple(refs)
        engines = self._engines()
        for name in list(engines):
            key = set_key(self.base, lora_component(name))
            if key != self.resident.get(name, ()):
                engines[name] = self._build(name, touching(self.base, name), engines[name])
                self.resident[name] = key

    def engine(self, name: str, refs: Sequence[LoraRef] = ()):
        """The engine of component `name` for a job whose own LoRAs are `refs`."""
        resident = self._engines()[name]
        if lora_component(name) not in COMPONENTS:
            return resident
        wanted = combine(self.base, refs)
        key = set_key(wanted, lora_component(name))
        if key == self.resident.get(name, ()):  # (a refitted TensorRT engine is resident with its set's key)
            return resident
        cached = self.cache.get((name, key))
        if cached is not None:
            self.cache.move_to_end((name, key))
            return cached
        engine = self._build(name, touching(wanted, lora_component(name)), resident)
        if engine is resident:  # refitted in place (TensorRT): one engine per component, resident with this set
            self.resident[name] = key
            return resident
        self.cache[(name, key)] = engine
        mine = [k for k in self.cache if k[0] == name]
        for k in mine[:max(0, len(mine) - self.max_per_component)]:
            del self.cache[k]
        return engine

    # ---- building ----
    def merged(self, name: str, refs: Sequence[LoraRef]) -> dict[str, np.ndarray]:
        """{initializer: base + Σ deltas} for component `name` and the set `refs` (empty for no LoRA)."""
        component_deltas = deltas(refs, self.model, lora_component(name))
        doc = weights_map(self.dir.path, name)
        return merged_initializers(self.dir.path / name, doc, component_deltas)

    def _build(self, name: str, refs: Sequence[LoraRef], template):
        """`template`'s engine holding the base weights plus `refs`' deltas: the backend's own swap (ONNX Runtime: a
        new session; TensorRT: a refit in place, which returns `template`; torch: a module copy), engines/base.py."""
        adapt = getattr(template, "adapted", None)
        if adapt is None:
            raise LoraError(f"LoRAs at load need the ONNX Runtime, TensorRT or torch backend, not "
                            f"{type(template).__name__}")
        doc = lambda: weights_map(self.dir.path, name)  # noqa: E731 (read when a backend needs it)
        return adapt(AdaptedWeights(
            onnx_path=self.dir.onnx_path(name),
            merged=lambda: self.merged(name, refs),
            base=lambda init: base_initializer(self.dir.path / name, doc(), doc().get("external", {})[init]),
            module_deltas=lambda: deltas(refs, self.model, name)))


@dataclass(frozen=True)
class AdaptedWeights:
    """What an engine's `adapted` may read to take a LoRA set (each computed only when called): the component's
    ONNX file, its merged initializers (ONNX names, as the weights map and TensorRT's refit name them), one
    initializer's stored base value (what a refit pushes back), and the deltas by torch module path."""

    onnx_path: Path
    merged: Callable[[], dict[str, np.ndarray]]
    base: Callable[[str], np.ndarray]
    module_deltas: Callable[[], dict[str, np.ndarray]]


# ---- export: fusing into the torch modules before they are traced ----------------------------------------

def model_from_modules(modules: dict, unet_config: dict, family: str) -> Model:
    """The Model of torch components ({"unet": module, "text_encoder": module, …}) for export-time fusing."""
    import torch

    from sdrt.runtime.lora.keys import canonical

    targets = {}
    for component, module in modules.items():
        targets[component] = {canonical(component, n): tuple(m.weight.shape) for n, m in module.named_modules()
                              if n and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return Model(targets, UnetLayout.from_config(unet_config), family)


def fuse_into_modules(modules: dict, model: Model, entries: Sequence[tuple[str, float]]) -> list[dict]:
    """W += Σ scale · ΔW (fp32) in the torch modules; returns the manifest's record of each file."""
    import torch

    refs = resolve([(str(Path(p).expanduser()), s) for p, s in entries], model, None)
    for component, module in modules.items():
        names = {n for n, _ in module.named_modules()}
        with torch.no_grad():
            for path, delta in deltas(refs, model, component).items():
                target = module.get_submodule(path if path in names else "text_model." + path)
                w = target.weight
                target.weight.copy_((w.float() + torch.from_numpy(delta).reshape(w.shape)).to(w.dtype))
    return [{"file": Path(r.path).name, "sha256": r.sha256, "scale": r.scale, "components": list(r.components)}
            for r in refs]
