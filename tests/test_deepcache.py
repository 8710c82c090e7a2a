"""Step caching (DeepCache, branch 0): sdrt's two exported graphs against the DeepCache package's
DeepCacheSDHelper on the diffusers pipeline (the reference: it wraps diffusers' own modules), within 1/255."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from test_parity import assert_same_images, diffusers_scheduler, generators, reference_pipeline, to_uint8

from sdrt.runtime.request import Request
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.validate import validate


@pytest.fixture(scope="module")
def cached_pipe(exported, tiny_pipeline, tmp_path_factory):
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.runtime.pipeline import Pipeline

    out = tmp_path_factory.mktemp("deepcache") / "sd15"
    shutil.copytree(exported("sd15", "fp32"), out)
    manifest = export(ExportConfig(model=str(tiny_pipeline("sd15")), output=out, precision="fp32", deepcache=True))
    assert all(manifest["components"][n]["gate"]["passed"] for n in ("unet_deepcache", "unet_deepcache_shallow"))
    return Pipeline.load(out, backend="ort-cpu")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_step_caching_equals_deepcache_on_diffusers(cached_pipe, tiny_pipeline, sampler):
    DeepCache = pytest.importorskip("DeepCache")
    ref = reference_pipeline(tiny_pipeline("sd15"))
    ref.scheduler = diffusers_scheduler(ref, sampler)
    helper = DeepCache.DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    theirs = ref(["a cat", "a dog"], num_inference_steps=7, guidance_scale=7.5, height=32, width=32,
                 generator=generators(2, 2), output_type="np").images
    request = dict(prompt=("a cat", "a dog"), steps=7, guidance=7.5, height=32, width=32, seed=2, sampler=sampler)
    ours = cached_pipe.generate(Request.of(**request, cache_interval=3))
    assert_same_images(f"sd15-deepcache-{sampler}", ours, theirs)
    plain = cached_pipe.generate(Request.of(**request))
    assert np.abs(to_uint8(plain).astype(int) - to_uint8(ours).astype(int)).max() > 1  # the cache changed them


def test_step_caching_is_refused_without_its_graphs(exported):
    from sdrt.runtime.loader import open_dir

    d = open_dir(exported("sd15", "fp32"))
    with pytest.raises(InvalidRequest) as e:
        validate(Request.of(prompt="a cat", cache_interval=3), d)
    assert e.value.field == "cache_interval" and "unet_deepcache and unet_deepcache_shallow" in e.value.message
    with pytest.raises(InvalidRequest, match="cache_interval: must be at least 1"):
        validate(Request.of(prompt="a cat", cache_interval=0), d)
    assert validate(Request.of(prompt="a cat"), d).cache_interval == 1


def test_shallow_graph_with_a_cross_attention_last_block_equals_the_helper():
    """SD 1.5's last up block attends (the tiny models' does not): the two modules against DeepCacheSDHelper in torch."""
    from types import SimpleNamespace

    import torch
    from diffusers import UNet2DConditionModel

    from sdrt.export.extras.deepcache import _Full, _Shallow, deepcache_specs

    DeepCache = pytest.importorskip("DeepCache")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=32).eval()
    pipe = SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=torch.tensor([901.0, 601.0])),
                           config=SimpleNamespace(addition_embed_type=None))
    names = deepcache_specs(SimpleNamespace(unet=unet, config={}))["unet_deepcache_shallow"].input_names
    assert names == ("sample", "timestep", "encoder_hidden_states", "deep_feature")
    x0, x1, text = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    with torch.no_grad():
        _, feature = _Full(unet, False)(x0, torch.tensor(901.0), text)
        ours = _Shallow(unet, names)(x1, torch.tensor(601.0), text, feature)
        helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=2, cache_branch_id=0)
        helper.enable()
        unet(x0, torch.tensor(901.0), text)  # full step: every module's output cached
        theirs = unet(x1, torch.tensor(601.0), text).sample  # cached step
        helper.disable()
        plain = unet(x1, torch.tensor(601.0), text).sample
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.allclose(ours, plain, atol=1e-3)


@pytest.mark.slow
def test_bench_with_step_caching(cached_pipe, tmp_path):
    from sdrt.bench import report
    from sdrt.bench.harness import run
    from sdrt.bench.scenarios import HarnessConfig, Overrides, resolve

    pytest.importorskip("DeepCache")
    scenario = resolve("sd15-classic", Overrides(model=str(cached_pipe.dir.path), resolution="32", steps=4,
                                                 cache_interval=2, backends=("ort-cpu", "diffusers")))
    result = run(scenario, HarnessConfig(warmup=0, runs=1, workdir=tmp_path, isolate=False, peak_matmul_size=256))
    backends = result["backends"]
    assert list(backends) == ["ort-cpu+cache2", "diffusers+cache2", "diffusers"]
    calls = [c[0] for c in backends["ort-cpu+cache2"]["samples"][0]["calls"] if c[0].startswith("unet")]
    assert calls == ["unet_deepcache", "unet_deepcache_shallow"] * 2
    assert all(len(b["samples"][0]["unet_steps"]) == 4 for b in backends.values())
    quality = result["quality_psnr_db_vs_diffusers"]
    assert quality["ort-cpu+cache2"] == pytest.approx(quality["diffusers+cache2"], abs=3) and quality["ort-cpu+cache2"] < 60
    assert "Speed-ups of cache2" in report.markdown(result)


@pytest.mark.slow
def test_sdxl_step_caching_equals_deepcache_on_diffusers(exported, tiny_pipeline, tmp_path):
    """SDXL: the shallow graph also takes text_embeds and time_ids (the added time embedding)."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.runtime.pipeline import Pipeline

    DeepCache = pytest.importorskip("DeepCache")
    out = tmp_path / "sdxl"
    shutil.copytree(exported("sdxl", "fp32"), out)
    export(ExportConfig(model=str(tiny_pipeline("sdxl")), output=out, precision="fp32", deepcache=True))
    ref = reference_pipeline(tiny_pipeline("sdxl"))
    ref.scheduler = diffusers_scheduler(ref, "euler")
    helper = DeepCache.DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    helper.enable()
    theirs = ref("a lighthouse", num_inference_steps=5, guidance_scale=5.0, height=32, width=32,
                 generator=generators(1, 1), output_type="np").images
    ours = Pipeline.load(out, backend="ort-cpu").generate(
        Request.of(prompt="a lighthouse", steps=5, guidance=5.0, height=32, width=32, seed=1, sampler="euler",
                   cache_interval=2))
    assert_same_images("sdxl-deepcache", ours, theirs)
