"""Tiny VAE (TAESD as diffusers' AutoencoderTiny): export beside the full VAE, `vae="tiny"` per request, previews.

Parity reference: the diffusers pipeline with `pipe.vae = AutoencoderTiny(...)` (the same random-weight tiny VAE),
within 1/255 on uint8 pixels; the tiny VAE's images must also differ visibly from the full VAE's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_sdrt
from test_parity import assert_same_images, diffusers_scheduler, generators, reference_pipeline, to_uint8

from sdrt.runtime.errors import UserError
from sdrt.runtime.request import Request


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    from sdrt.export.extras.tiny_vae import write_tiny_vae

    return write_tiny_vae(tmp_path_factory.mktemp("taesd") / "taesd", scale_factor=2)


@pytest.fixture(scope="module")
def with_tiny(exported, tiny_pipeline, taesd, tmp_path_factory):
    """A copy of the session's sd15 fp32 export with the tiny VAE added (the other components are reused)."""
    from sdrt.export.exporter import ExportConfig, export

    out = tmp_path_factory.mktemp("tiny-engines") / "sd15-tiny"
    shutil.copytree(exported("sd15", "fp32"), out)
    manifest = export(ExportConfig(model=str(tiny_pipeline("sd15")), output=out, precision="fp32",
                                   tiny_vae=str(taesd)))
    assert {"vae_decoder_tiny", "vae_encoder_tiny"} <= set(manifest["components"])
    assert all(manifest["components"][n]["gate"]["passed"] for n in ("vae_decoder_tiny", "vae_encoder_tiny"))
    assert manifest["tiny_vae"]["location"] == str(taesd)
    jsonschema.validate(manifest, json.loads((Path(__file__).parents[1] / "export" / "manifest.schema.json").read_text()))
    return out


@pytest.fixture(scope="module")
def pipe(with_tiny):
    from sdrt.runtime.pipeline import Pipeline

    return Pipeline.load(with_tiny, backend="ort-cpu")


def _reference(tiny_pipeline, taesd, cls=None):
    from diffusers import AutoencoderTiny

    ref = reference_pipeline(tiny_pipeline("sd15"), cls)
    ref.vae = AutoencoderTiny.from_pretrained(taesd)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    return ref


def test_tiny_vae_txt2img_equals_diffusers_with_autoencoder_tiny(pipe, tiny_pipeline, taesd):
    ref = _reference(tiny_pipeline, taesd)
    theirs = ref(["a cat", "a dog"], num_inference_steps=3, guidance_scale=7.5, height=32, width=48,
                 generator=generators(5, 2), output_type="np").images
    request = dict(prompt=("a cat", "a dog"), steps=3, guidance=7.5, height=32, width=48, seed=5, sampler="euler")
    ours = pipe.generate(Request.of(**request, vae="tiny"))
    assert_same_images("sd15-tiny-vae", ours, theirs)
    full = pipe.generate(Request.of(**request))
    assert np.abs(to_uint8(full).astype(int) - to_uint8(ours).astype(int)).max() > 20  # the tiny VAE decoded
    assert to_uint8(ours).std() > 10  # real pixel values, not a saturated image


def test_tiny_vae_img2img_encodes_with_the_tiny_encoder(pipe, tiny_pipeline, taesd):
    ref = _reference(tiny_pipeline, taesd, "StableDiffusionImg2ImgPipeline")
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    theirs = ref("a watercolor", image=image, strength=0.6, num_inference_steps=4, guidance_scale=7.5,
                 generator=generators(1, 1), output_type="np").images
    ours = pipe.generate(Request.of(prompt="a watercolor", init_image=image, strength=0.6, steps=4, guidance=7.5,
                                    sampler="euler", seed=1, vae="tiny"))
    assert_same_images("sd15-img2img-tiny-vae", ours, theirs)


def test_tiny_vae_request_field_round_trips_and_splits_batches(pipe):
    from sdrt.runtime.batching import compatibility_key

    request = Request.of(prompt="a cat", vae="tiny")
    assert request.to_dict() == {"prompt": {"text": "a cat"}, "decode": {"vae": "tiny"}}
    assert Request.from_dict(request.to_dict()) == request
    tiny, full = pipe.validate(request), pipe.validate(Request.of(prompt="a dog"))
    assert tiny.vae == "tiny" and full.vae == "full"
    assert compatibility_key(tiny) != compatibility_key(full)  # one VAE decodes a batch
    with pytest.raises(UserError, match="vae: must be one of full, tiny"):
        pipe.validate(Request.of(prompt="a cat", vae="huge"))


def test_tiny_vae_refused_where_none_was_exported(exported):
    from sdrt.runtime.loader import open_dir
    from sdrt.runtime.fields import InvalidRequest
    from sdrt.runtime.validate import validate

    with pytest.raises(InvalidRequest) as e:
        validate(Request.of(prompt="a cat", vae="tiny"), open_dir(exported("sd15", "fp32")))
    assert e.value.field == "vae"
    assert "no vae_decoder_tiny" in e.value.message and "it has vae_decoder, vae_encoder" in e.value.message


def test_tiny_vae_of_another_scale_factor_is_refused(tiny_pipeline, tmp_path):
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.extras.tiny_vae import write_tiny_vae

    wrong = write_tiny_vae(tmp_path / "taesd8", scale_factor=8)
    with pytest.raises(UserError, match="scales by 8, the model's VAE by 2"):
        export(ExportConfig(model=str(tiny_pipeline("sd15")), output=tmp_path / "out", tiny_vae=str(wrong),
                            components=("vae_decoder",)))
    assert not (tmp_path / "out").exists()


def test_cli_vae_tiny_with_previews(with_tiny, exported, tmp_path):
    out = tmp_path / "x.png"
    result = run_sdrt("run", str(with_tiny), "a cat", "--steps", "2", "--vae", "tiny", "--preview",
                      "--sampler", "euler", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-step-1.png", "x-step-2.png", "x.png"]
    # the last step's latents decoded by the tiny VAE are the final image
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "x-step-2.png")))

    plain = str(exported("sd15", "fp32"))
    bad = run_sdrt("run", plain, "a cat", "--vae", "tiny", "-o", str(tmp_path / "y.png"))
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --vae is tiny, "), bad.stderr
    assert "no vae_decoder_tiny" in lines[0] and "it has vae_decoder, vae_encoder" in lines[0]
    assert not (tmp_path / "y.png").exists()

    from sdrt.cli.generate import _check_preview

    with pytest.raises(UserError, match="--preview decodes every step with the tiny VAE.*no vae_decoder_tiny"):
        _check_preview(plain)  # checked before any engine loads


def test_bench_vae_tiny_against_diffusers_with_the_same_and_the_full_vae(with_tiny, tmp_path):
    from sdrt.bench import report
    from sdrt.bench.harness import run
    from sdrt.bench.scenarios import HarnessConfig, Overrides, resolve

    scenario = resolve("sd15-classic", Overrides(model=str(with_tiny), resolution="32", steps=2, vae="tiny",
                                                 backends=("ort-cpu", "diffusers")))
    result = run(scenario, HarnessConfig(warmup=0, runs=1, workdir=tmp_path, isolate=False, peak_matmul_size=256))
    backends = result["backends"]
    assert list(backends) == ["ort-cpu+tiny-vae", "diffusers+tiny-vae", "diffusers"]
    assert all(b["status"] == "ok" for b in backends.values()), backends
    decoders = {name: [c[0] for c in b["samples"][0]["calls"] if c[0].startswith("vae")] for name, b in backends.items()}
    assert decoders == {"ort-cpu+tiny-vae": ["vae_decoder_tiny"], "diffusers+tiny-vae": ["vae_decoder_tiny"],
                        "diffusers": ["vae_decoder"]}
    per_image = result["flops"]["per_image"]
    assert 0 < per_image["vae_decoder_tiny"] < per_image["vae_decoder"]
    md = report.markdown(result)
    assert "## Speed-ups of tiny-vae" in md and "| ort-cpu+tiny-vae | VAE decode |" in md and "PSNR" in md


def test_openai_body_carries_the_vae_fields():
    from sdrt.serve.fields import ModelContext
    from sdrt.serve.openai import openai_plan

    ctx = ModelContext("m", 32, 2, 1000, 4, 4096 * 4096)
    plan = openai_plan({"prompt": "a cat", "vae": "tiny", "vae_tiling": "off"}, ctx)
    assert plan.requests[0].decode.vae == "tiny" and plan.requests[0].decode.vae_tiling == "off"


def test_openai_streaming_sends_tiny_vae_partial_images_then_the_image(with_tiny, pipe):
    """`stream: true, partial_images: 2` over HTTP: server-sent events in OpenAI's shape, the partial images equal
    sdrt's tiny-VAE previews of the latents after the steps runtime/service.preview_steps picks, the completed
    image equals the same request unstreamed."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from sdrt.runtime.service import preview_steps
    from sdrt.serve.app import create_app
    from sdrt.serve.edge import ServeConfig
    from sdrt.serve.errors import HttpError
    from sdrt.serve.fields import ModelContext
    from sdrt.serve.openai import openai_plan

    assert preview_steps(4, 2) == {2, 3} and preview_steps(20, 3) == {5, 10, 15}
    assert preview_steps(1, 3) == frozenset() and preview_steps(2, 3) == {1}
    common = dict(prompt="a cat", steps=4, guidance=5.0, sampler="euler", seed=5, width=32, height=32)
    latents = list(pipe.denoise(Request.of(**common)))
    want_partial = [np.asarray(pipe.preview(latents[k - 1])[0], dtype=int) for k in (2, 3)]
    want = np.asarray(pipe.generate(Request.of(**common))[0], dtype=int)
    body = {"prompt": "a cat", "steps": 4, "guidance_scale": 5.0, "sampler": "euler", "seed": 5, "size": "32x32",
            "stream": True, "partial_images": 2}
    config = ServeConfig(engine_dir=with_tiny, max_batch=2, max_wait_ms=5, warmup=False, backend="ort-cpu")
    with TestClient(create_app(config, pipeline=pipe)) as client:
        with client.stream("POST", "/v1/images/generations", json=body) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"), \
                response.read()
            text = "".join(response.iter_text())
        events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
                  for block in text.strip().split("\n\n")]
        assert [e for e, _ in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert [d.get("partial_image_index") for _, d in events] == [0, 1, None]
        assert all(d["type"] == e and d["size"] == "32x32" for e, d in events)
        got = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB"), dtype=int)
               for _, d in events]
        for a, b in zip(got, want_partial + [want]):
            assert np.abs(a - b).max() <= 1
        assert np.abs(got[1] - got[2]).max() > 8  # a partial image is not the finished one
        for bad, field in (({"partial_images": 4}, "partial_images"), ({"stream": False}, "partial_images"),
                           ({"n": 2}, "n"), ({"stream": "yes"}, "stream")):
            response = client.post("/v1/images/generations", json=body | bad)
            assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    with pytest.raises(HttpError, match="tiny VAE") as e:  # a directory without vae_decoder_tiny
        openai_plan(body, ModelContext("m", 32, 2, 1000, 4, 4096 * 4096))
    assert e.value.field == "partial_images"


@pytest.mark.slow
def test_sdxl_tiny_vae_equals_diffusers(exported, tiny_pipeline, taesd, tmp_path):
    """TAESDXL's place: SDXL (its VAE forced to fp32 in fp16 exports; the tiny one never is), guidance on."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.runtime.pipeline import Pipeline

    out = tmp_path / "sdxl-tiny"
    shutil.copytree(exported("sdxl", "fp32"), out)
    export(ExportConfig(model=str(tiny_pipeline("sdxl")), output=out, precision="fp32", tiny_vae=str(taesd)))
    from diffusers import AutoencoderTiny

    ref = reference_pipeline(tiny_pipeline("sdxl"))
    ref.vae = AutoencoderTiny.from_pretrained(taesd)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    theirs = ref("a lighthouse", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                 generator=generators(4, 1), output_type="np").images
    ours = Pipeline.load(out, backend="ort-cpu").generate(
        Request.of(prompt="a lighthouse", steps=3, guidance=5.0, height=32, width=32, seed=4, sampler="euler",
                   vae="tiny"))
    assert_same_images("sdxl-tiny-vae", ours, theirs)
