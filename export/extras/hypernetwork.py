"""AUTOMATIC1111 hypernetworks (`.pt`), baked into the UNet at export: they are small MLPs, not weight deltas.

Reproduces modules/hypernetworks/hypernetwork.py of AUTOMATIC1111's web UI:
- the file is a dict {dim (int): [state_dict_k, state_dict_v], "layer_structure": [1, 2, 1], "activation_func",
  "is_layer_norm", "activate_output", "dropout_structure"/"use_dropout", "name", …};
- HypernetworkModule(dim): Linear(dim·ls[i] → dim·ls[i+1]) for each step of the layer structure, the activation
  after every Linear but the last (the last too when activate_output, which defaults to true), LayerNorm after
  each when is_layer_norm, dropout (identity at inference); forward(x) = x + mlp(x) · multiplier (the tag's
  strength);
- in every attention layer (self- and cross-attention alike), context_k = h_k(context), context_v = h_v(context)
  when the hypernetwork has layers for the context's width (apply_single_hypernetwork keys them by
  context.shape[2]); several hypernetworks apply one after the other; k = to_k(context_k), v = to_v(context_v).
Here the MLP is put in front of the to_k / to_v projections of every diffusers Attention whose input width it
has; the projections keep their parameter names, so the weights map (LoRAs at load) is unchanged.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sdrt.runtime.errors import UserError

# AUTOMATIC1111's activation_dict: its named ones, then every class of torch.nn.modules.activation by lower-case name
ACTIVATIONS = {**{name.lower(): getattr(torch.nn.modules.activation, name)
                  for name in torch.nn.modules.activation.__all__},
               "linear": None, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
               "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
OLD_KEYS = {"linear1.bias": "linear.0.bias", "linear1.weight": "linear.0.weight",
            "linear2.bias": "linear.1.bias", "linear2.weight": "linear.1.weight"}  # fix_old_state_dict


class HypernetworkError(UserError):
    """A hypernetwork file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Hypernetwork:
    name: str  # the file's stem: what `<hypernet:NAME>` calls it
    path: str
    sha256: str
    layers: dict  # width → (module_k, module_v): x → mlp(x); the residual and strength join in front of to_k/to_v


class _Mlp(torch.nn.Module):
    """HypernetworkModule's layers under its attribute name, so the file's `linear.<index>.weight` keys load;
    x → mlp(x) (the residual and strength are added by HyperProjection). Not a LoRA target (export/weights_map.py)."""

    lora_target = False

    def __init__(self, linear: torch.nn.Sequential):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def dropout_structure(data: dict, structure: Sequence[float]) -> list[float]:
    """AUTOMATIC1111's parse_dropout_structure: where its Sequential holds Dropout modules (identity here, but
    they shift the state dict's indices)."""
    if data.get("dropout_structure") is not None:
        return list(data["dropout_structure"])
    if not data.get("use_dropout", False):
        return [0.0] * len(structure)
    return [0.0] + [0.3] * (len(structure) - 3) + [0.3 if data.get("last_layer_dropout", False) else 0.0, 0.0]


def _mlp(dim: int, state: dict, structure: Sequence[float], activation: str | None, layer_norm: bool,
         activate_output: bool, dropout: Sequence[float], label: str) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for i in range(len(structure) - 1):
        layers.append(torch.nn.Linear(int(dim * structure[i]), int(dim * structure[i + 1])))
        last = i >= len(structure) - 2
        if activation not in (None, "linear") and not (last and not activate_output):
            layers.append(ACTIVATIONS[activation]())
        if layer_norm:
            layers.append(torch.nn.LayerNorm(int(dim * structure[i + 1])))
        if dropout[i + 1] > 0:
            layers.append(torch.nn.Dropout(p=dropout[i + 1]))  # identity in eval()
    mlp = _Mlp(torch.nn.Sequential(*layers))
    state = {OLD_KEYS.get(k, k): v for k, v in state.items()}
    try:
        mlp.load_state_dict(state)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:200]
        raise HypernetworkError(f"{label}: its weights do not fit layer_structure {list(structure)} at width "
                                f"{dim} ({first})") from None
    return mlp.eval().requires_grad_(False)


def load(path: str | Path) -> Hypernetwork:
    p = Path(path).expanduser()
    label = f"hypernetwork {p}"
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise HypernetworkError(f"{label}: no such file") from None
    except Exception as e:  # noqa: BLE001 — pickles with code, truncated or foreign files
        raise HypernetworkError(f"{label}: not a readable AUTOMATIC1111 hypernetwork .pt "
                                f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    if not isinstance(data, dict) or not any(isinstance(k, int) for k in data):
        raise HypernetworkError(f"{label}: not an AUTOMATIC1111 hypernetwork (it has no per-width layers; a LoRA "
                                "or an embedding goes to --lora / --embedding)")
    structure = data.get("layer_structure") or [1, 2, 1]
    activation = data.get("activation_func")
    if activation is not None and activation not in ACTIVATIONS:
        raise HypernetworkError(f"{label}: activation {activation!r} is not supported; sdrt knows "
                                f"{', '.join(ACTIVATIONS)}")
    if not all(isinstance(x, (int, float)) and x > 0 for x in structure) or structure[0] != 1 or structure[-1] != 1:
        raise HypernetworkError(f"{label}: layer_structure {structure!r} must start and end with 1")
    dropout = dropout_structure(data, structure)
    if len(dropout) != len(structure):
        raise HypernetworkError(f"{label}: dropout_structure {dropout!r} does not match layer_structure {structure!r}")
    layers = {}
    for dim, pair in data.items():
        if not isinstance(dim, int):
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, dict) for s in pair):
            raise HypernetworkError(f"{label}: width {dim} must hold [k state dict, v state dict]")
        layers[dim] = tuple(_mlp(dim, s, structure, activation, bool(data.get("is_layer_norm", False)),
                                 bool(data.get("activate_output", True)), dropout, label) for s in pair)
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    return Hypernetwork(p.stem, str(p.absolute()), sha, layers)


class HyperProjection(torch.nn.Linear):
    """to_k / to_v with hypernetwork MLPs in front: x → x + mlp(x)·scale for each (mlp, scale), then the Linear.
    `weight` and `bias` are the original projection's parameters (same names in the UNet's state dict)."""

    def __init__(self, linear: torch.nn.Linear, mlps: Sequence[tuple[torch.nn.Module, float]]):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.hyper = torch.nn.ModuleList(m for m, _ in mlps)
        self.scales = [float(s) for _, s in mlps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mlp, scale in zip(self.hyper, self.scales):
            x = x + mlp(x) * scale
        return torch.nn.functional.linear(x, self.weight, self.bias)


def apply(unet: torch.nn.Module, hypernets: Sequence[tuple[Hypernetwork, float]]) -> int:
    """Put the hypernetworks in front of every attention's to_k / to_v of matching width; returns how many
    projections changed. Raises HypernetworkError when a hypernetwork fits no attention of this UNet."""
    from diffusers.models.attention_processor import Attention

    changed, used = 0, {h.name: 0 for h, _ in hypernets}
    for module in unet.modules():
        if not isinstance(module, Attention):
            continue
        for index, attr in ((0, "to_k"), (1, "to_v")):
            linear = getattr(module, attr)
            mlps = []
            for h, scale in hypernets:
                if linear.in_features in h.layers:
                    mlps.append((h.layers[linear.in_features][index], scale))
                    used[h.name] += 1
            if mlps:
                setattr(module, attr, HyperProjection(linear, mlps))
                changed += 1
    widths = sorted({m.to_k.in_features for m in unet.modules() if isinstance(m, Attention)})
    for h, _ in hypernets:
        if not used[h.name]:
            raise HypernetworkError(f"hypernetwork {h.name}: made for attention widths {sorted(h.layers)}, this "
                                    f"model's are {widths} (another model family)")
    return changed


def check_scale(scale, path) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise HypernetworkError(f"hypernetwork {path}: the scale must be a finite number (got {scale!r})")
    return float(scale)
