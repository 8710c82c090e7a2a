"""engines/ort_cache.py: ONNX Runtime's optimized graph saved on the first load, used by later ones, same outputs."""

from __future__ import annotations

import shutil

import torch

from sdrt.engines.ort import OrtConfig, OrtEngine
from sdrt.engines.ort_cache import FOLDER


def test_second_load_uses_the_saved_graph_and_gives_the_same_outputs(exported, tmp_path):
    folder = tmp_path / "vae_decoder"
    shutil.copytree(exported("sd15", "fp32") / "vae_decoder", folder)
    model = folder / "model.onnx"
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    plain = OrtEngine(model)({"latent_sample": latents})["sample"]
    assert not (folder / FOLDER).exists()  # off by default

    first = OrtEngine(model, OrtConfig(cache_optimized=True))
    saved = sorted(p.name for p in (folder / FOLDER).iterdir())
    assert len(saved) == 2 and saved[0].endswith(".onnx") and saved[1].endswith(".onnx_data")  # no temporary left
    second = OrtEngine(model, OrtConfig(cache_optimized=True))
    assert second.session._model_path.endswith(saved[0])  # the optimized graph, not the source
    for engine in (first, second):
        assert torch.equal(engine({"latent_sample": latents})["sample"], plain)

    (folder / FOLDER / saved[0]).write_bytes(b"damaged")  # refused, removed, rebuilt from the model
    third = OrtEngine(model, OrtConfig(cache_optimized=True))
    assert torch.equal(third({"latent_sample": latents})["sample"], plain)
    assert sorted(p.name for p in (folder / FOLDER).iterdir()) == saved


def test_where_nothing_can_be_written_the_engine_loads_uncached(exported, tmp_path):
    folder = tmp_path / "blocked"
    shutil.copytree(exported("sd15", "fp32") / "vae_decoder", folder)
    (folder / FOLDER).write_text("a file where the cache folder would go")  # (root ignores read-only modes)
    engine = OrtEngine(folder / "model.onnx", OrtConfig(cache_optimized=True))
    assert engine.session._model_path.endswith("model.onnx")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in (exported("sd15", "fp32") / "vae_decoder").iterdir()) + [FOLDER]
