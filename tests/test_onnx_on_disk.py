"""Graphs of 2 GB or more (a full-size UNet, unet_pulid, T5-XXL) are finished on disk (export/onnx_export.py
_passes_on_disk): the weights are never all in memory. Checked here on a small module forced through that path
(the 2 GB threshold lowered), against the in-memory path and the torch weights."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdrt.export import onnx_export
from sdrt.export.onnx_export import EXTERNAL_DATA_NAME, run_passes, torch_to_onnx
from sdrt.export.weights_map import Mapper


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(32, 48)  # on 3-D input: MatMul(x, Wᵀ) under a new initializer name
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.gain = torch.nn.Parameter(torch.randn(3))  # under 1 KiB: stays inside model.onnx


class _Wrapper(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.unet = net  # node names carry /unet/…, as the UNet wrappers' do

    def forward(self, x, image):
        offset = torch.tensor([0.25 * i for i in range(48)])  # a Constant node's value (an attribute tensor)
        return self.unet.proj(x) * self.unet.gain.sum() + offset, self.unet.conv(image)


def _raw(tmp_path, wrapper, inputs, per_tensor_files: bool):
    raw = tmp_path / ("raw_files" if per_tensor_files else "raw")
    raw.mkdir()
    torch_to_onnx(wrapper, inputs, raw / "model.onnx", ("x", "image"), ("y", "z"),
                  {"x": {0: "B"}, "image": {0: "B"}})
    if per_tensor_files:  # as the TorchScript exporter writes a graph over 2 GB: one file per initializer
        model = onnx.load(str(raw / "model.onnx"))
        onnx.save(model, str(raw / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                  size_threshold=0, convert_attribute=True)  # Constant nodes' values too, as torch writes them
    return raw


def _run(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": inputs[0].numpy(), "image": inputs[1].numpy()})


def test_a_large_graph_is_finished_on_disk_like_the_in_memory_path(tmp_path, monkeypatch):
    net = _Net().eval()
    wrapper = _Wrapper(net).eval()
    inputs = (torch.randn(2, 5, 32), torch.randn(2, 4, 6, 6))
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper(*inputs)]

    in_memory = tmp_path / "in_memory"
    files, passes = run_passes(_raw(tmp_path, wrapper, inputs, False), in_memory, Mapper(net, "unet"))
    assert "polygraphy.fold_constants" in passes

    raw = _raw(tmp_path, wrapper, inputs, True)
    assert len([p for p in raw.iterdir()]) > 3  # the weights really are in files of their own
    from sdrt.export.onnx_export import _attribute_tensors

    raw_graph = onnx.load(str(raw / "model.onnx"), load_external_data=False).graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in _attribute_tensors(raw_graph))
    monkeypatch.setattr(onnx_export, "TWO_GB", 1)
    real_load = onnx.load

    def load_without_weights(path, *args, load_external_data=True, **kwargs):
        assert not load_external_data, "the on-disk path loaded a graph with its weights"
        return real_load(path, *args, load_external_data=False, **kwargs)

    monkeypatch.setattr(onnx, "load", load_without_weights)
    on_disk = tmp_path / "on_disk"
    files, passes = run_passes(raw, on_disk, Mapper(net, "unet"))
    monkeypatch.setattr(onnx, "load", real_load)
    assert passes == ["onnx.infer_shapes_path", "sdrt.weights_map"]
    assert sorted(files) == sorted(["model.onnx", EXTERNAL_DATA_NAME, "weights_map.json"])
    assert sorted(p.name for p in on_disk.iterdir()) == sorted(files)  # nothing left of the scratch files

    for got, want in zip(_run(on_disk / "model.onnx", inputs), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(_run(on_disk / "model.onnx", inputs), _run(in_memory / "model.onnx", inputs)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    # the weights map finds the same weights, and its offsets hold the torch values in the layout it names
    maps = [json.loads((d / "weights_map.json").read_text()) for d in (in_memory, on_disk)]
    assert sorted(maps[0]["weights"]) == sorted(maps[1]["weights"]) == ["conv", "proj"]
    data = (on_disk / EXTERNAL_DATA_NAME).read_bytes()
    for path, module in (("proj", net.proj), ("conv", net.conv)):
        [init] = maps[1]["weights"][path]["initializers"]
        stored = np.frombuffer(data[init["offset"]:init["offset"] + init["length"]], dtype=init["dtype"])
        weight = module.weight.detach().numpy()
        want = weight.T if init["transform"] == "transpose" else weight
        np.testing.assert_array_equal(stored.reshape(init["shape"]), want)
        if init["length"] >= 4096:
            assert init["offset"] % 4096 == 0  # page-aligned: ONNX Runtime can map it
    graph = onnx.load(str(on_disk / "model.onnx"), load_external_data=False)
    inline = [t.name for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) < 1024 for t in graph.graph.initializer if t.name in inline)


def test_external_data_that_ends_early_is_an_error_not_a_short_file(tmp_path, monkeypatch):
    net = _Net().eval()
    inputs = (torch.randn(1, 5, 32), torch.randn(1, 4, 6, 6))
    raw = _raw(tmp_path, _Wrapper(net).eval(), inputs, True)
    biggest = max((p for p in raw.iterdir() if p.name != "model.onnx"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    monkeypatch.setattr(onnx_export, "TWO_GB", 1)
    with pytest.raises(OSError, match="ends .* bytes early"):
        run_passes(raw, tmp_path / "out", None)
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.slow
def test_a_pulid_export_on_disk_generates_the_same_image(exported, tiny_pipeline, tmp_path, monkeypatch):
    """Every graph of a tiny SDXL + PuLID export through the on-disk path, the UNet and the VAE parked on disk
    while ONNX Runtime gates unet_pulid (export/exporter.py _park): the same images as the in-memory export."""
    from test_parity import to_uint8
    from test_pulid import PRESET, PROMPTS, SIZE, identity, write_tiny_pulid

    from sdrt.export import exporter
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.runtime.pipeline import Pipeline, Request

    pulid_file = write_tiny_pulid(tiny_pipeline("sdxl"), tmp_path / "pulid_v1.bin", seed=5)
    engines = {}
    parked = []
    real_park = exporter._park
    monkeypatch.setattr(exporter, "_park", lambda module, path: (parked.append(path.name), real_park(module, path)))
    for name, threshold in (("in_memory", onnx_export.TWO_GB), ("on_disk", 1)):
        monkeypatch.setattr(onnx_export, "TWO_GB", threshold)
        monkeypatch.setattr(exporter, "TWO_GB", threshold)
        export(ExportConfig(model=str(tiny_pipeline("sdxl")), output=tmp_path / name, pulid=str(pulid_file),
                            precision="fp32"))  # fp16 maps the fp32 weights from disk anyway
        engines[name] = Pipeline.load(tmp_path / name, backend="ort-cpu")
    assert ".unet_pulid.parked.pt" in parked  # the UNet waited on disk (it is traced again for `unet`)
    assert (tmp_path / "on_disk" / "unet" / "model.onnx_data").exists()
    request = Request.of(**PROMPTS, seed=4, batch=2, **PRESET, **SIZE, pulid_id=identity(1))
    images = {name: to_uint8(p.generate(request)).astype(int) for name, p in engines.items()}
    diff = np.abs(images["on_disk"] - images["in_memory"]).max()
    print(f"pulid export on disk vs in memory: {diff}/255")
    assert diff <= 1
