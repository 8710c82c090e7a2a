"""Engine protocol and the ONNX Runtime backend on small real ONNX graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from sdrt.engines.base import EngineInputError, TensorSpec, validate_feed
from sdrt.engines.ort import EngineLoadError, OrtConfig, OrtEngine, available_backends


@pytest.fixture()
def add_model(tmp_path):
    """out = x + y (float16 here to check the type mapping); ids passes int64 through."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 77])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["batch", 4])
    ids_out = helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch", 77])
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["out"]),
                               helper.make_node("Identity", ["ids"], ["ids_out"])], "g", [x, y, ids], [out, ids_out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def test_ort_engine_reads_specs_and_runs(add_model):
    engine = OrtEngine(add_model, OrtConfig(intra_op_threads=1))
    assert engine.inputs == {"x": TensorSpec("float16", ("batch", 4)), "y": TensorSpec("float16", ("batch", 4)),
                             "ids": TensorSpec("int64", ("batch", 77))}
    x = torch.arange(8, dtype=torch.float16).reshape(2, 4)
    ids = torch.arange(154).reshape(2, 77)
    out = engine({"x": x, "y": x, "ids": ids})
    assert torch.equal(out["out"], x * 2) and torch.equal(out["ids_out"], ids)


@pytest.mark.parametrize("feed,message", [
    ({"x": torch.zeros(2, 4, dtype=torch.float16)}, "missing inputs ['y', 'ids']"),
    ({"x": torch.zeros(2, 4), "y": torch.zeros(2, 4, dtype=torch.float16), "ids": torch.zeros(2, 77, dtype=torch.int64)},
     "input 'x': expected float16 [batch, 4], got float32 [2, 4]"),
    ({"x": torch.zeros(2, 5, dtype=torch.float16), "y": torch.zeros(2, 4, dtype=torch.float16),
      "ids": torch.zeros(2, 77, dtype=torch.int64)}, "input 'x': expected float16 [batch, 4], got float16 [2, 5]"),
    ({"x": torch.zeros(2, 4, dtype=torch.float16), "y": torch.zeros(3, 4, dtype=torch.float16),
      "ids": torch.zeros(2, 77, dtype=torch.int64)}, "dimension 'batch' is 3 but input 'x' has it 2"),
    ({"x": torch.zeros(4, dtype=torch.float16), "y": torch.zeros(2, 4, dtype=torch.float16),
      "ids": torch.zeros(2, 77, dtype=torch.int64)}, "expected float16 [batch, 4], got float16 [4]"),
    ({"x": torch.zeros(2, 4, dtype=torch.float16), "y": torch.zeros(2, 4, dtype=torch.float16),
      "ids": torch.zeros(2, 77, dtype=torch.int64), "z": torch.zeros(1)}, "unexpected inputs ['z']"),
])
def test_validation_names_the_tensor_and_the_mismatch(add_model, feed, message):
    engine = OrtEngine(add_model)
    with pytest.raises(EngineInputError) as e:
        engine(feed)
    assert message in str(e.value)


def test_rank_zero_input_stays_rank_zero(tmp_path):
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 3])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "t"], ["out"])], "g", [x, t], [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    engine = OrtEngine(tmp_path / "m.onnx")
    got = engine({"x": torch.ones(4, 3), "t": torch.tensor(2.5)})["out"]
    assert torch.equal(got, torch.full((4, 3), 2.5))


def test_missing_and_damaged_files_are_named(tmp_path):
    with pytest.raises(EngineLoadError, match="unet/model.onnx is missing"):
        OrtEngine(tmp_path / "unet" / "model.onnx")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(EngineLoadError, match="unet/model.onnx cannot be loaded by ONNX Runtime"):
        OrtEngine(tmp_path / "unet" / "model.onnx")


def test_validate_feed_accepts_matching_symbolic_dims():
    validate_feed({"a": TensorSpec("float32", ("n", 2)), "b": TensorSpec("float32", ("n",))},
                  {"a": torch.zeros(3, 2), "b": torch.zeros(3)})


def test_available_backends_on_this_machine():
    backends = available_backends()
    assert "ort-cpu" in backends
    assert ("ort-cuda" in backends) == (torch.cuda.is_available() and "CUDAExecutionProvider" in
                                         __import__("onnxruntime").get_available_providers())
    assert np.isin(backends, ["tensorrt", "ort-cuda", "ort-cpu", "torch"]).all()
