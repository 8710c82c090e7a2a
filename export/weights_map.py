"""weights_map.json: which ONNX initializer holds which torch weight (reference/customization.md §1.7).

Written at export next to each LoRA-targetable component's model.onnx (UNet or transformer, text encoders), so that the
runtime can replace weights without torch, diffusers or the onnx package: ONNX Runtime sessions with merged
initializers (`SessionOptions.add_external_initializers`), TensorRT refits by initializer name.

Built by value and checked by structure. For every Linear and Conv2d weight W of the component (the modules a
LoRA may patch), the initializers of the exported graph equal to W (transform "identity") or, for 2-D weights,
to Wᵀ ("transpose": the exporter folds a Linear on 3-D activations into MatMul(x, Wᵀ) under a new name such as
`onnx::MatMul_1234`) are candidates. A candidate is kept only if a MatMul/Gemm/Conv consumes it as its weight
input, inside the module's own scope (node names carry the module path: `/unet/down_blocks.1/…/to_q/MatMul`;
a dynamo export's nodes get it from their metadata first, scope_node_names),
and with the layout its op implies (MatMul: Wᵀ; Gemm: W when transB, else Wᵀ; Conv: W). Exactly one must
remain. Up-samplers rewritten into sub-pixel convolutions (export/rewrites.py) hold derived kernels instead of
W (sums and slices of its taps); those are matched by name and value against the rewrite's own buffers and
recorded with their transform ("subpixel:kernel_00", …), which the runtime re-applies to the LoRA delta.

The map also records where each initializer lies in model.onnx_data (offset, length, dtype, shape): every
mapped initializer is stored as external data (ONNX Runtime can only replace external initializers), and the
runtime reads the base values from there. `external` lists every initializer stored there, mapped or not (a
TensorRT refit may ask for weights fused with the ones a LoRA changes). A weight that cannot be mapped fails the export: a LoRA on it would
otherwise be silently ignored.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import external_data_helper, numpy_helper

from sdrt.runtime.errors import UserError
from sdrt.runtime.lora.keys import canonical
from sdrt.runtime.lora.weights import WEIGHTS_MAP_FORMAT, WEIGHTS_MAP_NAME

from sdrt.export.rewrites import SubpixelUpsample2D, is_subpixel_eligible

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")  # = lora/keys.COMPONENTS
SMALL_BYTES = 1024  # below this, unmapped initializers stay inside model.onnx (onnx's default threshold)
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1}


class WeightsMapError(UserError):
    """The exported graph does not let sdrt find a LoRA-targetable weight (an sdrt bug or an unusual model)."""


def _digest(array: np.ndarray) -> tuple:
    return (array.dtype.str, tuple(array.shape), hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest())


def _array(tensor: onnx.TensorProto, base_dir: str = "") -> np.ndarray:
    """The initializer's values, without a copy where they are raw bytes in memory; external data (a graph of
    over 2 GB kept on disk: export/onnx_export.py) is read from base_dir, one tensor at a time."""
    if tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor, base_dir)


def _scope(node_name: str) -> str:
    """`/unet/down_blocks.1/attentions.0/…/to_q/MatMul` → `.unet.down_blocks.1.attentions.0.….to_q.MatMul.`"""
    return "." + node_name.strip("/").replace("/", ".") + "."


def scope_node_names(model: onnx.ModelProto) -> int:
    """Give the nodes of a dynamo export (torch.onnx.export(dynamo=True): FLUX.1's transformer) the module path the
    TorchScript exporter puts in node names, `/transformer/x_embedder/node_MatMul_10`, from their
    `pkg.torch.onnx.name_scopes` metadata (the deepest module scope), so that _structural can read it: polygraphy's
    constant folding drops node metadata but keeps names. Run before folding; returns the nodes renamed."""
    renamed = 0
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes is None or node.name.startswith("/"):
            continue
        try:
            names = [s for s in ast.literal_eval(scopes)[:-1] if isinstance(s, str) and s]  # a Python list's repr
        except (ValueError, SyntaxError):
            continue
        if names:
            node.name = "/" + names[-1].replace(".", "/") + "/" + node.name
            renamed += 1
    return renamed


def targets(module: torch.nn.Module, component: str) -> dict[str, torch.nn.Module]:
    """Canonical module path → every Linear/Conv2d of the component (what a LoRA may patch), except inside modules
    marked `lora_target = False` (a baked hypernetwork's MLPs, export/extras/hypernetwork.py)."""
    excluded = [name + "." for name, m in module.named_modules() if getattr(m, "lora_target", True) is False]
    return {canonical(component, name): m for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name
            and not any(name.startswith(prefix) for prefix in excluded)}


class _LazyArrays:
    """name → an initializer's values (of rank ≥ 2), read when asked: a graph's weights are never all in memory."""

    def __init__(self, inits: dict, base_dir: str):
        self.inits = {n: t for n, t in inits.items() if len(t.dims) >= 2}
        self.base_dir = base_dir

    def __iter__(self):
        return iter(self.inits)

    def shape(self, name: str) -> tuple:
        return tuple(self.inits[name].dims)

    def __getitem__(self, name: str) -> np.ndarray:
        return _array(self.inits[name], self.base_dir)


class Mapper:
    """Builds the map for one component while the exporter holds its graph (in the export's dtype)."""

    def __init__(self, module: torch.nn.Module, component: str):
        self.module = module
        self.component = component
        self.entries: dict[str, dict] = {}

    # ---- matching ----------------------------------------------------------------------------------------
    def build(self, model: onnx.ModelProto, base_dir: str = "") -> set[str]:
        """Map every target to its initializers in `model` (external data read from base_dir, one tensor at a time:
        values are hashed, not kept); returns the initializer names to store externally."""
        inits = {t.name: t for t in model.graph.initializer}
        by_value: dict[tuple, list[str]] = {}
        for name, tensor in inits.items():
            if len(tensor.dims) >= 2:
                by_value.setdefault(_digest(_array(tensor, base_dir)), []).append(name)
        arrays = _LazyArrays(inits, base_dir)
        consumers: dict[str, list] = {}
        for node in model.graph.node:
            for index, name in enumerate(node.input):
                if name in inits:
                    consumers.setdefault(name, []).append((node, index))

        upsamplers = {name: m for name, m in self.module.named_modules() if is_subpixel_eligible(m)}
        unmapped = []
        for path, mod in targets(self.module, self.component).items():
            weight = mod.weight.detach().contiguous().numpy()
            found = self._direct(path, weight, by_value, consumers)
            if not found:
                parent = path.rsplit(".", 1)[0]
                owner = next((m for n, m in upsamplers.items() if canonical(self.component, n) == parent), None)
                if owner is not None and path.endswith(".conv"):
                    found = self._subpixel(parent, owner, inits, arrays, consumers)
            if not found:
                unmapped.append(path)
                continue
            self.entries[path] = {"shape": list(weight.shape), "module": type(mod).__name__, "initializers": found}
        if unmapped:
            raise WeightsMapError(
                f"{self.component}: {len(unmapped)} weight(s) that a LoRA may patch were not found in the exported "
                f"graph (first: {', '.join(unmapped[:3])}); LoRAs at load could not be applied to them. This is an "
                "sdrt bug for this model: please report it with the model's name")
        return {i["name"] for e in self.entries.values() for i in e["initializers"]}

    def _direct(self, path: str, weight: np.ndarray, by_value, consumers) -> list[dict]:
        candidates = [(n, "identity") for n in by_value.get(_digest(weight), [])]
        if weight.ndim == 2:
            candidates += [(n, "transpose") for n in by_value.get(_digest(weight.T), [])]
        kept = []
        for name, transform in candidates:
            if self._structural(name, path, transform, consumers):
                kept.append({"name": name, "transform": transform})
        if len(kept) > 1:
            raise WeightsMapError(f"{self.component}: the weight of {path} matches several initializers "
                                  f"({', '.join(k['name'] for k in kept)}); the weights map would be ambiguous")
        return kept

    def _structural(self, name: str, path: str, transform: str, consumers) -> bool:
        """Some MatMul/Gemm/Conv in the module's scope takes `name` as its weight, in the layout `transform` says."""
        for node, index in consumers.get(name, []):
            if _WEIGHT_INPUT.get(node.op_type) != index or f".{path}." not in _scope(node.name):
                continue
            if node.op_type == "Conv" and transform == "identity":
                return True
            if node.op_type == "MatMul" and transform == "transpose":
                return True
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                if (transform == "identity") == bool(trans_b):
                    return True
        return False

    def _subpixel(self, parent: str, upsampler, inits, arrays, consumers) -> list[dict]:
        """The derived kernels of a sub-pixel up-sampler: by name suffix, equal to the rewrite's own buffers."""
        with torch.no_grad():
            rewrite = SubpixelUpsample2D(upsampler)
        found = []
        for buffer, value in rewrite.named_buffers(recurse=False):
            if buffer == "bias":
                continue
            suffix = f"{parent}.{buffer}"
            names = [n for n in arrays if n == suffix or n.endswith("." + suffix)]
            expected = value.detach().contiguous().numpy()
            names = [n for n in names if arrays.shape(n) == expected.shape and np.array_equal(arrays[n], expected)
                     and any(node.op_type == "Conv" and index == 1 and f".{parent}." in _scope(node.name)
                             for node, index in consumers.get(n, []))]
            if len(names) != 1:
                return []
            found.append({"name": names[0], "transform": f"subpixel:{buffer}"})
        return found

    # ---- writing -----------------------------------------------------------------------------------------
    def write(self, out_dir: Path, data_file: str) -> str:
        """After model.onnx (+ data_file) is saved in out_dir: record each initializer's place; write the map."""
        model = onnx.load(str(out_dir / "model.onnx"), load_external_data=False)
        places = {}
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                places[tensor.name] = (info.get("location"), int(info.get("offset", 0)), int(info["length"]),
                                       onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name, list(tensor.dims))
        for path, entry in self.entries.items():
            for init in entry["initializers"]:
                place = places.get(init["name"])
                if place is None or place[0] != data_file:
                    raise WeightsMapError(f"{self.component}: initializer {init['name']} ({path}) is not stored in "
                                          f"{data_file}; ONNX Runtime could not replace it")
                _, init["offset"], init["length"], init["dtype"], init["shape"] = place
        external = {n: {"offset": p[1], "length": p[2], "dtype": p[3], "shape": p[4]}
                    for n, p in places.items() if p[0] == data_file}  # every stored weight (TensorRT refits)
        doc = {"format_version": WEIGHTS_MAP_FORMAT, "component": self.component, "data_file": data_file,
               "weights": self.entries, "external": external}
        (out_dir / WEIGHTS_MAP_NAME).write_text(json.dumps(doc, separators=(",", ":")))
        return WEIGHTS_MAP_NAME


def mark_external(model: onnx.ModelProto, names: set[str], location: str) -> None:
    """Store `names` and every initializer of at least SMALL_BYTES as external data in `location` (one file)."""
    for index, tensor in enumerate(model.graph.initializer):
        if not tensor.HasField("raw_data"):
            if tensor.name not in names:
                continue
            tensor = numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)
            model.graph.initializer[index].CopyFrom(tensor)
            tensor = model.graph.initializer[index]
        if tensor.name in names or len(tensor.raw_data) >= SMALL_BYTES:
            external_data_helper.set_external_data(tensor, location)
