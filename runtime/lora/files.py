"""LoRA files: what a request names, reading files, matching their keys to a model, and the deltas
(DESIGN.md §4a; customization.md §1). runtime/lora/weights.py, refs.py and adapters.py build on this.

Formats: kohya/AUTOMATIC1111 (`lora_unet_…`, `lora_te_…`, SDXL's `lora_te1_`/`lora_te2_` and sgm block names,
`alpha`), diffusers/PEFT (`unet.….lora_A/lora_B`, `text_encoder[_2].…`, optional `alpha` keys or PEFT's
`lora_adapter_metadata`), and LoCon (the same parts on convolutions, with an optional CP `lora_mid`); for SD3 and
FLUX.1 `transformer.…` and the T5 encoder, and FLUX.1's kohya files over BFL's names, whose fused q/k/v Linears
split by rows (runtime/lora/flow_keys.py). Files are
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
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from sdrt.runtime.errors import UserError
from sdrt.runtime.lora.keys import LYCORIS_PARTS, Targets, UnetLayout, lookup_table, parse_key

METADATA_KEY = "lora_adapter_metadata"  # diffusers' PEFT LoraConfig in the safetensors header
FAMILY_LABELS = {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "the SDXL refiner",
                 "sd3": "SD3 / SD3.5", "flux": "FLUX.1"}
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
    rows: tuple[int, int] | None = None  # a fused Linear's up rows that are this module's (FLUX.1's BFL qkv)
    swap: bool = False  # the up weight's row halves exchanged (FLUX.1's final adaLN: shift, scale → scale, shift)


@dataclass(frozen=True)
class Model:
    """What LoRA matching needs to know of a model: its targets, UNet layout and family."""

    targets: Targets  # component → {canonical module path: weight shape}
    layout: UnetLayout | None
    family: str  # Family value: sd15 | sd21 | sdxl | sdxl-refiner | sd3 | flux

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
    if any(k.startswith(("lora_unet_double_blocks", "lora_unet_single_blocks")) or "single_transformer_blocks" in k
           for k in keys):
        return {"flux"}, "FLUX.1", "its keys name FLUX.1's double/single-stream blocks"
    if any(k.startswith(("lora_unet_joint_blocks", "lora_unet_context_embedder", "lora_unet_x_embedder")) for k in keys):
        return {"sd3"}, "SD3", "its keys name SD3's joint blocks (Stability AI's names)"
    if any(k.startswith(("lora_transformer_", "transformer.")) for k in keys):
        return {"sd3", "flux"}, "a transformer model (SD3 or FLUX.1)", "its keys name transformer blocks, not a UNet"
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

    table = lookup_table(model.targets, model.layout, model.family)
    configs = _peft_configs(header)
    modules, unmatched = [], list(unknown)
    for (style, component, module), roles in groups.items():
        if style == "kohya":
            component, paths, swap = table.get(module, (None, (), False))
        else:
            paths, swap = ((module,) if module in model.targets.get(component, {}) else ()), False
        if not paths:
            unmatched.extend(sorted(roles.values()))
            continue
        if "down" not in roles or "up" not in roles:
            missing = "down (lora_down/lora_A)" if "down" not in roles else "up (lora_up/lora_B)"
            raise LoraError(f"{name}: {module} has no {missing} weight; the file is incomplete")
        sizes = [model.targets[component][p][0] for p in paths]
        start = 0
        for path, size in zip(paths, sizes):  # a fused Linear (FLUX.1's BFL qkv): each module its rows
            rows = (start, start + size) if len(paths) > 1 else None
            modules.append(_module(header, model, component, path, roles, configs.get(component, {}), rows,
                                   sum(sizes), swap))
            start += size
    if unmatched:
        wrong = _wrong_family(header, model)
        if wrong:
            raise LoraError(wrong)
        if model.family == "sd3" and any(k.startswith("lora_unet_") for k in unmatched):
            raise LoraError(f"{name} names SD3's modules as kohya/sd-scripts does (lora_unet_joint_blocks_…, Stability "
                            "AI's MMDiT names), which sdrt does not convert; it reads SD3 LoRAs in diffusers/PEFT "
                            "names (transformer.transformer_blocks.N.attn.to_q.lora_A.weight, …)")
        if not modules:
            raise LoraError(f"no key of {name} matches a module of this {model.label} model (first keys: "
                            f"{', '.join(unmatched[:3])}); it is not a LoRA for this model")
        raise LoraError(f"{len(unmatched)} key(s) of {name} match no module of this {model.label} model (first: "
                        f"{', '.join(unmatched[:3])}); it was made for another model")
    return modules


def _module(header: Header, model: Model, component: str, path: str, roles: dict, peft: dict,
            rows: tuple[int, int] | None = None, fused_out: int = 0, swap: bool = False) -> Module:
    shape = tuple(model.targets[component][path])
    down, up = header.shapes[roles["down"]], header.shapes[roles["up"]]
    mid = roles.get("mid")
    rank = down[0] if down else 0
    out = fused_out if rows is not None else shape[0]
    fits = (len(down) in (2, 4) and len(up) in (2, 4) and up[0] == out and up[1] == rank
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
        fused = f" and the modules fused with it ({fused_out} rows in all)" if rows is not None else ""
        raise LoraError(wrong or f"{Path(header.path).name}: {roles['down']} has shape {list(down)} and "
                                 f"{roles['up']} {list(up)}, which do not fit {component} {path} (weight "
                                 f"{list(shape)}){fused}; the LoRA was made for another model")
    alpha = header.alphas.get(roles["alpha"]) if "alpha" in roles else None
    if alpha is not None and alpha != 0:
        alpha_scale = alpha / rank
    elif alpha is None and peft:
        alpha_scale = _peft_alpha(peft, path, rank) or 1.0
    else:
        alpha_scale = 1.0  # kohya: a missing or zero alpha means alpha = rank
    return Module(component, path, roles["down"], roles["up"], mid, rank, alpha_scale, rows, swap)


# ---- deltas ----------------------------------------------------------------------------------------------

def module_delta(module: Module, tensors: dict[str, np.ndarray], shape: tuple) -> np.ndarray:
    """(α / r) · up @ down in the weight's shape, fp32 (the LoRA scale not applied)."""
    down, up = tensors[module.down], tensors[module.up]
    out, rank = up.shape[0], down.shape[0]
    up2 = up.reshape(out, up.shape[1])
    if module.rows is not None:  # this module's rows of a fused Linear's delta (runtime/lora/flow_keys.py)
        up2 = up2[module.rows[0]:module.rows[1]]
    if module.swap:  # BFL's (shift, scale) halves → diffusers' (scale, shift)
        up2 = np.concatenate([up2[len(up2) // 2:], up2[:len(up2) // 2]])
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
