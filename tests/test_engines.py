"""Engine protocol and the ONNX Runtime backend on small real ONNX graphs."""

from __future__ import annotations

import gc
import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sdrt.engines.base import EngineInputError, TensorSpec, validate_feed
from sdrt.engines.ort import (ORT_DTYPES, EngineLoadError, OrtConfig, OrtConfigError, OrtEngine, _dlpack_ready,
    _to_torch, available_backends, numpy_dtype)

W = np.arange(24, dtype=np.float32).reshape(8, 3) / 10


def _save(path, nodes, inputs, outputs, initializers=(), **kwargs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path, **kwargs)
    return path


def _unet_like(path, **save_kwargs):
    """out_sample = sample · timestep; context = encoder_hidden_states @ W; ids_out = ids (int64 passthrough)."""
    vi = helper.make_tensor_value_info
    return _save(path, [helper.make_node("Mul", ["sample", "timestep"], ["out_sample"]),
                        helper.make_node("MatMul", ["encoder_hidden_states", "w"], ["context"]),
                        helper.make_node("Identity", ["ids"], ["ids_out"])],
                 [vi("sample", TensorProto.FLOAT, ["batch", 4, "height", "width"]),
                  vi("timestep", TensorProto.FLOAT, []),
                  vi("encoder_hidden_states", TensorProto.FLOAT, ["batch", "sequence", 8]),
                  vi("ids", TensorProto.INT64, ["batch", 77])],
                 [vi("out_sample", TensorProto.FLOAT, ["batch", 4, "height", "width"]),
                  vi("context", TensorProto.FLOAT, ["batch", "sequence", 3]),
                  vi("ids_out", TensorProto.INT64, ["batch", 77])],
                 [numpy_helper.from_array(W, "w")], **save_kwargs)


@pytest.fixture()
def unet(tmp_path):
    return _unet_like(tmp_path / "unet" / "model.onnx")


def _feed(batch=2, h=6, w=5, seq=7, dtype=torch.float32):
    return {"sample": torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(0)).to(dtype),
            "timestep": torch.tensor(2.5), "encoder_hidden_states": torch.randn(batch, seq, 8),
            "ids": torch.arange(batch * 77).reshape(batch, 77)}


def _check(out, feed):
    assert set(out) == {"out_sample", "context", "ids_out"}
    assert torch.allclose(out["out_sample"], feed["sample"] * 2.5)
    assert torch.allclose(out["context"], feed["encoder_hidden_states"] @ torch.from_numpy(W), atol=1e-5)
    assert torch.equal(out["ids_out"], feed["ids"]) and out["ids_out"].dtype == torch.int64


def test_ort_engine_reads_specs_and_runs(unet):
    engine = OrtEngine(unet, OrtConfig(intra_op_threads=1))
    assert engine.name == "unet" and engine.device == "cpu"
    assert engine.inputs == {"sample": TensorSpec("float32", ("batch", 4, "height", "width")),
                             "timestep": TensorSpec("float32", ()),
                             "encoder_hidden_states": TensorSpec("float32", ("batch", "sequence", 8)),
                             "ids": TensorSpec("int64", ("batch", 77))}
    assert engine.outputs["context"] == TensorSpec("float32", ("batch", "sequence", 3))
    for shape in ((2, 6, 5, 7), (1, 8, 8, 77)):  # symbolic dims take new sizes per call
        feed = _feed(*shape)
        _check(engine(feed), feed)


def test_outputs_are_new_tensors_owned_by_the_caller(unet):
    engine = OrtEngine(unet)
    feed = _feed()
    before = {n: x.clone() for n, x in feed.items()}
    first = engine(feed)
    second = engine(feed)
    assert first["out_sample"].data_ptr() != second["out_sample"].data_ptr()
    assert all(torch.equal(feed[n], before[n]) for n in feed)  # inputs only read
    assert not first["out_sample"].requires_grad


def test_io_binding_path_on_cpu(unet):
    """The binding code of the CUDA path (bind by pointer, ORT-allocated outputs, DLPack) run on the CPU."""
    engine = OrtEngine(unet)
    feed = _feed()
    out = engine._run_bound(feed)
    _check(out, feed)
    kept = out["out_sample"].clone()
    gc.collect()
    for _ in range(3):  # later runs must not reuse the buffers handed out before
        engine._run_bound(_feed(batch=2, seq=7) | {"timestep": torch.tensor(-1.0)})
    assert torch.equal(out["out_sample"], kept)


def test_dlpack_hand_over_through_the_c_binding(unet):
    """The fallback for onnxruntime wrappers without __dlpack__ (1.21 up to the release that added it)."""
    value = onnxruntime.OrtValue.ortvalue_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert _dlpack_ready()
    assert torch.equal(_to_torch(SimpleNamespace(_ortvalue=value._ortvalue)), torch.arange(6.0).reshape(2, 3))
    assert torch.equal(_to_torch(value), torch.arange(6.0).reshape(2, 3))


def test_float16_graph_and_rank_zero_input(tmp_path):
    vi = helper.make_tensor_value_info
    path = _save(tmp_path / "vae_decoder" / "model.onnx", [helper.make_node("Add", ["x", "y"], ["out"])],
                 [vi("x", TensorProto.FLOAT16, ["b", 3]), vi("y", TensorProto.FLOAT16, [])],
                 [vi("out", TensorProto.FLOAT16, ["b", 3])])
    engine = OrtEngine(path)
    assert engine.inputs["y"] == TensorSpec("float16", ())
    x = torch.arange(12, dtype=torch.float16).reshape(4, 3)
    out = engine({"x": x, "y": torch.tensor(0.5, dtype=torch.float16)})["out"]
    assert out.dtype == torch.float16 and torch.equal(out, x + 0.5)


@pytest.mark.parametrize("onnx_type,numpy_name", [
    (TensorProto.FLOAT, "float32"), (TensorProto.FLOAT16, "float16"), (TensorProto.DOUBLE, "float64"),
    (TensorProto.INT64, "int64"), (TensorProto.INT32, "int32"), (TensorProto.INT8, "int8"),
    (TensorProto.UINT8, "uint8"), (TensorProto.BOOL, "bool"),
])
def test_ort_type_mapping(tmp_path, onnx_type, numpy_name):
    vi = helper.make_tensor_value_info
    path = _save(tmp_path / "m.onnx", [helper.make_node("Identity", ["x"], ["y"])], [vi("x", onnx_type, ["n", 2])],
                 [vi("y", onnx_type, ["n", 2])])
    engine = OrtEngine(path)
    assert engine.inputs["x"].dtype == numpy_name == np.dtype(numpy_name).name
    x = torch.from_numpy(np.ones((3, 2), dtype=numpy_name))
    assert torch.equal(engine({"x": x})["y"], x)


def test_ort_type_names():
    assert numpy_dtype("tensor(float)") == "float32" and numpy_dtype("tensor(float16)") == "float16"
    assert numpy_dtype("seq(tensor(float))") == "seq(tensor(float))"  # not a tensor type: kept, never matches
    assert all(str(getattr(torch, name)).removeprefix("torch.") == name for name in ORT_DTYPES.values())


def test_unnamed_dynamic_dims_accept_any_size(tmp_path):
    vi = helper.make_tensor_value_info
    path = _save(tmp_path / "m.onnx", [helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [None, 3])],
                 [vi("y", TensorProto.FLOAT, [None, 3])])
    engine = OrtEngine(path)
    assert engine.inputs["x"] == TensorSpec("float32", (-1, 3)) and engine.inputs["x"].text() == "float32 [?, 3]"
    assert engine({"x": -torch.ones(5, 3)})["y"].abs().sum() == 0


S = (2, 4, 6, 5)  # a valid sample shape for _feed()


@pytest.mark.parametrize("change,message", [
    (lambda f: f.pop("timestep"),
     "unet input 'timestep': expected float32 [], got nothing (the engine takes sample, timestep, "
     "encoder_hidden_states, ids)"),
    (lambda f: f.update(z=torch.zeros(1)),
     "unet has no input 'z' (given float32 [1]); it takes sample, timestep, encoder_hidden_states, ids"),
    (lambda f: f.update(sample=torch.zeros(1, 4, 64, 64, dtype=torch.float16)),
     "unet input 'sample': expected float32 [batch, 4, height, width], got float16 [1, 4, 64, 64]"),
    (lambda f: f.update(ids=torch.zeros(2, 77, dtype=torch.int32)),
     "unet input 'ids': expected int64 [batch, 77], got int32 [2, 77]"),
    (lambda f: f.update(sample=torch.zeros(2, 4, 6)),
     "unet input 'sample': expected float32 [batch, 4, height, width], got float32 [2, 4, 6]"),
    (lambda f: f.update(timestep=torch.tensor([2.5])),
     "unet input 'timestep': expected float32 [], got float32 [1]"),
    (lambda f: f.update(sample=torch.zeros(2, 3, 6, 5)),
     "unet input 'sample': expected float32 [batch, 4, height, width], got float32 [2, 3, 6, 5]"),
    (lambda f: f.update(ids=torch.zeros(2, 76, dtype=torch.int64)),
     "unet input 'ids': expected int64 [batch, 77], got int64 [2, 76]"),
    (lambda f: f.update(encoder_hidden_states=torch.zeros(3, 7, 8)),
     "unet input 'encoder_hidden_states': expected float32 [batch, sequence, 8], got float32 [3, 7, 8]: "
     "'batch' is 3 here but 2 in input 'sample'"),
    (lambda f: f.update(sample=np.zeros(S, dtype=np.float32)),
     "unet input 'sample': expected float32 [batch, 4, height, width], got a numpy.ndarray, not a torch.Tensor"),
])
def test_validation_names_the_tensor_the_expected_and_the_given(unet, change, message):
    engine = OrtEngine(unet)
    feed = _feed()
    change(feed)
    with pytest.raises(EngineInputError) as e:
        engine(feed)
    assert str(e.value) == message
    assert isinstance(e.value, ValueError)


def test_validate_feed_on_its_own():
    specs = {"a": TensorSpec("float32", ["n", 2]), "b": TensorSpec("float32", ("n", -1, "")),
             "c": TensorSpec("int64", ())}
    assert specs["a"].shape == ("n", 2)  # lists (from JSON) become tuples
    validate_feed(specs, {"a": torch.zeros(3, 2), "b": torch.zeros(3, 9, 1), "c": torch.tensor(1)})
    with pytest.raises(EngineInputError, match=r"^engine input 'b': .* 'n' is 4 here but 3 in input 'a'$"):
        validate_feed(specs, {"a": torch.zeros(3, 2), "b": torch.zeros(4, 9, 1), "c": torch.tensor(1)})
    assert specs["b"].text() == "float32 [n, ?, ?]"


def test_missing_and_damaged_files_are_named(tmp_path):
    with pytest.raises(EngineLoadError, match="unet/model.onnx is missing; re-export"):
        OrtEngine(tmp_path / "unet" / "model.onnx")
    (tmp_path / "unet").mkdir()
    with pytest.raises(EngineLoadError, match="unet is not a file"):
        OrtEngine(tmp_path / "unet")
    (tmp_path / "unet" / "model.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(EngineLoadError, match="unet/model.onnx cannot be loaded by ONNX Runtime .*damaged"):
        OrtEngine(tmp_path / "unet" / "model.onnx")


def test_missing_external_data_is_named(tmp_path):
    path = _unet_like(tmp_path / "unet" / "model.onnx", save_as_external_data=True, location="model.onnx_data",
                      size_threshold=0)
    OrtEngine(path)
    (tmp_path / "unet" / "model.onnx_data").unlink()
    with pytest.raises(EngineLoadError, match=r"unet/model.onnx cannot be loaded .*model\.onnx_data"):
        OrtEngine(path)


def test_config_is_checked_and_applied(unet):
    for bad in ({"provider": "rocm"}, {"graph_optimization_level": "max"}, {"intra_op_threads": -1}):
        with pytest.raises(OrtConfigError, match="rocm|max|intra_op_threads"):
            OrtConfig(**bad)
    engine = OrtEngine(unet, OrtConfig(intra_op_threads=2, graph_optimization_level="disabled"))
    options = engine.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CUDA provider present")
def test_cuda_provider_without_onnxruntime_gpu_is_refused(unet):
    with pytest.raises(EngineLoadError, match="unet/model.onnx: the cuda provider needs onnxruntime-gpu"):
        OrtEngine(unet, OrtConfig(provider="cuda"))


def test_available_backends_on_this_machine():
    backends = available_backends()
    cuda = torch.cuda.is_available()
    assert "ort-cpu" in backends
    assert ("ort-cuda" in backends) == (cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers())
    assert ("tensorrt" in backends) == (cuda and importlib.util.find_spec("tensorrt") is not None)
    assert ("torch" in backends) == (importlib.util.find_spec("diffusers") is not None)
    order = ["tensorrt", "ort-cuda", "ort-cpu", "torch"]
    assert backends == [b for b in order if b in backends]


def test_engine_modules_import_neither_diffusers_nor_transformers():
    code = ("import sys, sdrt.engines.ort; available = sdrt.engines.ort.available_backends(); "
            "print(sorted(m for m in ('transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_reason() is not None, reason=_cuda_reason() or "")
def test_cuda_io_binding_keeps_tensors_on_the_device(unet):
    engine = OrtEngine(unet, OrtConfig(provider="cuda"))
    assert engine.device == "cuda:0"
    feed = _feed()
    out = engine({n: x.cuda() for n, x in feed.items()})
    assert all(t.device.type == "cuda" for t in out.values())
    _check({n: t.cpu() for n, t in out.items()}, feed)
    kept = out["out_sample"].clone()
    engine({n: x.cuda() for n, x in _feed(batch=2, seq=7).items()} | {"timestep": torch.tensor(-1.0, device="cuda")})
    torch.cuda.synchronize()
    assert torch.equal(out["out_sample"], kept)  # handed-out buffers are the caller's
    _check({n: t.cpu() for n, t in engine(feed).items()}, feed)  # CPU inputs are moved to the device
