"""torch module → ONNX file, then the passes that leave a clean graph for TensorRT and ONNX Runtime.

The TorchScript-based exporter (dynamo=False) is used: it handles diffusers' UNet with dynamic batch,
height and width, as optimum does. Passes: constant folding (in the exporter, then polygraphy's folder,
which evaluates constant subgraphs with ONNX Runtime) and ONNX shape inference. Graphs over 2 GB keep
their weights in one external file, `model.onnx_data`, as optimum writes it (finished on disk, never
loaded whole: _passes_on_disk); so do the UNet (or transformer) and the text encoders at any size, beside their
weights_map.json (export/weights_map.py): ONNX Runtime can replace only external initializers, which is how LoRAs
are applied at load.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter's (torch.onnx.export(dynamo=True)): RMSNorm decomposed
EXTERNAL_DATA_NAME = "model.onnx_data"
TWO_GB = 2**31 - 1


def torch_to_onnx(module: torch.nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    """Trace `module(*args)` into `path` (ONNX, opset OPSET). A module with a `dynamic_shapes()` method (torch.export
    dims per input: the Flux transformer, whose torch.nn.RMSNorm TorchScript refuses) goes through the dynamo
    exporter at DYNAMO_OPSET instead; its weights land in `path`.data, which run_passes reads."""
    if hasattr(module, "dynamic_shapes"):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=list(input_names), output_names=list(output_names),
                              dynamic_shapes=module.dynamic_shapes(), opset_version=DYNAMO_OPSET, dynamo=True,
                              verbose=False)
        return
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings on shape-dependent Python branches
        torch.onnx.export(
            module, args, str(path), input_names=list(input_names), output_names=list(output_names),
            dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )


def run_passes(raw_dir: Path, out_dir: Path, mapper=None) -> tuple[list[str], list[str]]:
    """Load the exporter's output from raw_dir/model.onnx, fold constants, infer shapes, save into out_dir.

    With a weights-map `mapper` (export/weights_map.py: LoRA-targetable components), every mapped weight and
    every initializer of 1 KiB or more go to model.onnx_data, and weights_map.json is written beside.
    A graph of 2 GB or more is never loaded whole (_passes_on_disk). Returns the files written (relative to
    out_dir) and the passes applied.
    """
    if files_bytes(raw_dir) >= TWO_GB:
        return _passes_on_disk(raw_dir, out_dir, mapper)
    model = onnx.load(str(raw_dir / "model.onnx"), load_external_data=True)
    passes = []
    if mapper is not None:  # a dynamo export's module scopes into node names, for the weights map
        from sdrt.export.weights_map import scope_node_names

        scope_node_names(model)
    import onnxruntime
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    onnxruntime.set_default_logger_severity(3)
    # its symbolic shape inference warns that it cannot compare the dynamic sizes of the any-size UNet's
    # crops (2*floor(h/2 - 1/2) + 2 vs h); the graph is right either way, and the warning is noise to a user
    logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.ERROR)
    model = fold_constants(model, num_passes=2, fold_shapes=True, error_ok=False)
    passes.append("polygraphy.fold_constants")
    # The folder's symbolic shape inference leaves value_info that gives an any-size up-sampler's doubled tensor
    # the size of its skip-size crop (2m and 2m - 1 get one symbol); ONNX Runtime's memory planner then reuses a
    # buffer of the wrong size at odd latent sizes ("Shape mismatch attempting to re-use buffer" at
    # up_blocks.N/upsamplers.0/Slice_4). Dropped here; ONNX's own inference below names such sizes apart.
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    passes.append("onnx.infer_shapes")
    out_dir.mkdir(parents=True, exist_ok=True)
    if mapper is None:
        onnx.save(model, str(out_dir / "model.onnx"))
        return ["model.onnx"], passes
    from sdrt.export.weights_map import mark_external

    mark_external(model, mapper.build(model), EXTERNAL_DATA_NAME)
    onnx.save(model, str(out_dir / "model.onnx"))
    _same_mode(out_dir)
    return ["model.onnx", EXTERNAL_DATA_NAME, mapper.write(out_dir, EXTERNAL_DATA_NAME)], \
        passes + ["sdrt.weights_map"]


def files_bytes(raw_dir: Path) -> int:
    """The exporter's output on disk: model.onnx and any external data files it wrote beside it."""
    return sum(p.stat().st_size for p in raw_dir.iterdir() if p.is_file())


def _passes_on_disk(raw_dir: Path, out_dir: Path, mapper) -> tuple[list[str], list[str]]:
    """A graph of 2 GB or more: its weights stay on disk. The graph is read without them (onnx's in-memory API is
    limited to 2 GB protos, and a full-size UNet's weights next to its torch module would double the export's
    memory); the weights map hashes one initializer at a time; the initializers are copied, one at a time, into
    one model.onnx_data; shape inference goes through files. No constant folding (the exporter's own ran)."""
    model = onnx.load(str(raw_dir / "model.onnx"), load_external_data=False)
    names: set[str] = set()
    if mapper is not None:
        from sdrt.export.weights_map import scope_node_names

        scope_node_names(model)
        names = mapper.build(model, str(raw_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        tmp = Path(scratch) / "model.onnx"
        _gather_external(model, raw_dir, Path(scratch) / EXTERNAL_DATA_NAME, names)
        onnx.save(model, str(tmp))
        del model
        onnx.shape_inference.infer_shapes_path(str(tmp), str(tmp))
        for name in ("model.onnx", EXTERNAL_DATA_NAME):
            os.replace(Path(scratch) / name, out_dir / name)
    _same_mode(out_dir)
    passes = ["onnx.infer_shapes_path"]
    if mapper is not None:
        return ["model.onnx", EXTERNAL_DATA_NAME, mapper.write(out_dir, EXTERNAL_DATA_NAME)], \
            passes + ["sdrt.weights_map"]
    return ["model.onnx", EXTERNAL_DATA_NAME], passes


_PAGE = 4096  # initializers of a page or more start on a page boundary, where ONNX Runtime can map them
_CHUNK = 64 * 2**20


def _attribute_tensors(graph: onnx.GraphProto):
    """Tensors held by node attributes (Constant values: the TorchScript exporter writes large ones as external data
    too), subgraphs included."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _attribute_tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _attribute_tensors(sub)


def _gather_external(model: onnx.ModelProto, raw_dir: Path, data_path: Path, names: set[str]) -> None:
    """Move into `data_path` every initializer that is external in raw_dir, mapped (`names`) or of SMALL_BYTES or
    more, and every attribute tensor that is external there, streaming the bytes (never more than _CHUNK in memory),
    and point the graph at the new places."""
    from onnx import numpy_helper

    from sdrt.export.weights_map import SMALL_BYTES

    external_attributes = [t for t in _attribute_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    with open(data_path, "wb") as out:
        for tensor in [*model.graph.initializer, *external_attributes]:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                source, start = raw_dir / info["location"], int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else source.stat().st_size - start
                write = _copier(source, start, length)
            else:
                if not tensor.HasField("raw_data") and tensor.name in names:  # typed fields → raw bytes
                    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
                if not tensor.HasField("raw_data") or (tensor.name not in names and len(tensor.raw_data) < SMALL_BYTES):
                    continue
                length, raw = len(tensor.raw_data), tensor.raw_data
                write = (lambda f, raw=raw: f.write(raw))
            if length >= _PAGE and out.tell() % _PAGE:
                out.write(b"\0" * (_PAGE - out.tell() % _PAGE))
            offset = out.tell()
            write(out)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", EXTERNAL_DATA_NAME), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value


def _copier(source: Path, start: int, length: int):
    def copy(out) -> None:
        with open(source, "rb") as f:
            f.seek(start)
            left = length
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise OSError(f"{source}: external data ends {left} bytes early")
                out.write(chunk)
                left -= len(chunk)
    return copy


def _same_mode(out_dir: Path) -> None:
    """onnx writes external data readable by its owner only (0600); give it model.onnx's mode (the umask's)."""
    os.chmod(out_dir / EXTERNAL_DATA_NAME, (out_dir / "model.onnx").stat().st_mode & 0o777)


def io_specs(path: Path) -> dict:
    """Inputs and outputs of an ONNX file: name, element type and (symbolic) dims, read from the graph."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output), "opset": opset}
