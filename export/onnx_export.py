"""torch module → ONNX file, then the passes that leave a clean graph for TensorRT and ONNX Runtime.

The TorchScript-based exporter (dynamo=False) is used: it handles diffusers' UNet with dynamic batch,
height and width, as optimum does. Passes: constant folding (in the exporter, then polygraphy's folder,
which evaluates constant subgraphs with ONNX Runtime) and ONNX shape inference. Graphs over 2 GB keep
their weights in one external file, `model.onnx_data`, as optimum writes it; so do the UNet (or transformer) and
the text encoders at any size, beside their weights_map.json (export/weights_map.py): ONNX Runtime can replace only
external initializers, which is how LoRAs are applied at load.
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
_TWO_GB = 2**31 - 1


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


def _byte_size(model: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def run_passes(raw_dir: Path, out_dir: Path, mapper=None) -> tuple[list[str], list[str]]:
    """Load the exporter's output from raw_dir/model.onnx, fold constants, infer shapes, save into out_dir.

    With a weights-map `mapper` (export/weights_map.py: LoRA-targetable components), every mapped weight and
    every initializer of 1 KiB or more go to model.onnx_data, and weights_map.json is written beside.
    Returns the files written (relative to out_dir) and the passes applied.
    """
    model = onnx.load(str(raw_dir / "model.onnx"), load_external_data=True)
    passes = []
    if mapper is not None:  # a dynamo export's module scopes into node names, for the weights map
        from sdrt.export.weights_map import scope_node_names

        scope_node_names(model)
    if _byte_size(model) < _TWO_GB:
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
    # Over 2 GB: shape inference must go through files (onnx's in-memory API is limited to 2 GB protos).
    out_dir.mkdir(parents=True, exist_ok=True)
    if mapper is not None:
        from sdrt.export.weights_map import mark_external

        mark_external(model, mapper.build(model), EXTERNAL_DATA_NAME)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        tmp = Path(scratch) / "model.onnx"
        onnx.save(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=EXTERNAL_DATA_NAME)
        del model
        onnx.shape_inference.infer_shapes_path(str(tmp), str(tmp))
        passes.append("onnx.infer_shapes_path")
        for name in ("model.onnx", EXTERNAL_DATA_NAME):
            os.replace(Path(scratch) / name, out_dir / name)
    _same_mode(out_dir)
    if mapper is not None:
        return ["model.onnx", EXTERNAL_DATA_NAME, mapper.write(out_dir, EXTERNAL_DATA_NAME)], \
            passes + ["sdrt.weights_map"]
    return ["model.onnx", EXTERNAL_DATA_NAME], passes


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
