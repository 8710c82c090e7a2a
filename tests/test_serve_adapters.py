"""LoRAs and textual inversions per request in `sdrt serve`: names from the server's folders only (never a path on
the server), the same images as the Python API with the same LoRA or embedding, and 422 (400 on /v1) naming the field for
anything else."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.serve.app import create_app
from sdrt.serve.edge import ServeConfig
from test_embeddings import ti_engine, vectors  # noqa: F401 (fixture)
from test_lora import make_layers, write_diffusers
from test_serve import A_SMALL, GEN, SMALL, TXT, _diff, _error, _png


@pytest.fixture(scope="module")
def folders(tiny_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    (root / "loras" / "styles").mkdir(parents=True)
    write_diffusers(root / "loras" / "styles" / "ink.safetensors",
                    make_layers(tiny_pipeline("sd15"), {"unet": (4, 0.03), "text_encoder": (4, 0.1)}, seed=11))
    (root / "embeddings").mkdir()
    save_file({"emb_params": vectors(2, 5, scale=2.0)}, str(root / "embeddings" / "shiny.safetensors"))
    (root / "elsewhere.safetensors").write_bytes((root / "loras" / "styles" / "ink.safetensors").read_bytes())
    return root


@pytest.fixture(scope="module")
def served(ti_engine, folders):  # noqa: F811
    engine = ti_engine("sd15")
    pipe = Pipeline.load(engine, backend="ort-cpu", lora_dir=folders / "loras",
                         embeddings_dir=folders / "embeddings")
    config = ServeConfig(engine_dir=engine, max_batch=4, max_wait_ms=20, warmup=False, backend="ort-cpu",
                         lora_dir=folders / "loras", embeddings_dir=folders / "embeddings")
    with TestClient(create_app(config, pipeline=pipe)) as client:
        yield client, pipe


def _api(pipe, prompt, **kw):
    return pipe.generate(Request.of(prompt=prompt, seed=7, width=32, height=32, steps=3, guidance=5.0,
                                    sampler="euler_a", **kw))[0]


def test_openai_loras_and_a1111_tags_equal_the_python_api(served):
    client, pipe = served
    body = {"prompt": "a fox", "seed": 7, **SMALL}
    plain = _png(client.post(GEN, json=body).json()["data"][0]["b64_json"])
    with_lora = _png(client.post(GEN, json={**body, "loras": [{"name": "ink", "scale": 0.8}]}).json()["data"][0]
                     ["b64_json"])
    assert _diff(with_lora, _api(pipe, "a fox", loras=[["ink", 0.8]])) == 0
    assert _diff(with_lora, plain) > 8  # the LoRA visibly moves the image
    assert _diff(_png(client.post(GEN, json={**body, "loras": ["ink:0.8"]}).json()["data"][0]["b64_json"]),
                 with_lora) == 0
    tagged = client.post(TXT, json={"prompt": "a fox <lora:ink:0.8>", "seed": 7, **A_SMALL}).json()
    assert _diff(_png(tagged["images"][0]), _api(pipe, "a fox <lora:ink:0.8>")) == 0
    assert _diff(_png(tagged["images"][0]), with_lora) <= 1  # "a fox " vs "a fox": the same tokens


def test_embedding_trigger_words_work_in_every_prompt(served):
    client, pipe = served
    shiny = client.post(TXT, json={"prompt": "a shiny cat", "seed": 7, **A_SMALL}).json()["images"][0]
    assert _diff(_png(shiny), _api(pipe, "a shiny cat")) == 0
    no_folder = Pipeline.load(pipe.dir.path, backend="ort-cpu")
    assert _diff(_png(shiny), _api(no_folder, "a shiny cat")) > 8  # without the embedding it is another image
    listed = client.get("/sdapi/v1/embeddings").json()
    assert listed["loaded"]["shiny"]["vectors"] == 2 and listed["skipped"] == {}


def test_lora_listing(served):
    client, _ = served
    assert client.get("/sdapi/v1/loras").json() == [
        {"name": "ink", "alias": "ink", "path": "styles/ink.safetensors", "metadata": {}}]
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200


@pytest.mark.parametrize("route,body,field,fragment", [
    (GEN, {"loras": ["nope:1"]}, "loras", "it has: ink"),
    (GEN, {"loras": ["../elsewhere"]}, "loras", "no LoRA named"),  # never a path on the server
    (GEN, {"loras": [{"path": "/etc/passwd"}]}, "loras", "no LoRA named"),
    (GEN, {"loras": ["ink:nan"]}, "loras", "finite"),
    (GEN, {"loras": [{"name": "ink", "weight": 1}]}, "loras", "each LoRA is"),
    (TXT, {"prompt": "x <lora:nope:1>"}, "prompt", "it has: ink"),
    (TXT, {"prompt": "x <lora:ink:0.5:0.3>"}, "prompt", "one scale"),
    (TXT, {"prompt": "x <hypernet:anime:1>"}, "prompt", "<hypernet:anime:1> is not baked"),
    (TXT, {"prompt": "x <lyco2:anime:1>"}, "prompt", "<lyco2:…>"),
    (TXT, {"prompt": "x", "negative_prompt": "<lora:nope>"}, "negative_prompt", "it has: ink"),
])
def test_bad_adapters_are_4xx_naming_the_field(served, route, body, field, fragment):
    client, _ = served
    base = {"prompt": "x", **(SMALL if route == GEN else A_SMALL)}
    error = _error(client.post(route, json={**base, **body}), 400 if route == GEN else 422, field)
    assert fragment in error["message"], error


def test_disable_extra_networks_drops_tags_unapplied(served):
    client, _ = served
    body = {"seed": 3, **A_SMALL}
    dropped = client.post(TXT, json={"prompt": "a fox <lora:nope:1><hypernet:x:1>", "disable_extra_networks": True,
                                     **body}).json()["images"][0]
    plain = client.post(TXT, json={"prompt": "a fox ", **body}).json()["images"][0]
    assert _diff(_png(dropped), _png(plain)) == 0


def test_a_server_without_a_lora_folder_refuses_names(exported):
    engine = exported("sd15", "fp32")
    config = ServeConfig(engine_dir=engine, warmup=False, backend="ort-cpu")
    with TestClient(create_app(config, pipeline=Pipeline.load(engine, backend="ort-cpu"))) as client:
        error = _error(client.post(GEN, json={"prompt": "x", "loras": ["ink"], **SMALL}), 400, "loras")
        assert "no LoRA folder" in error["message"]
        assert client.get("/sdapi/v1/loras").json() == []
        assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}


def test_cli_serve_refuses_a_missing_lora_folder(exported, tmp_path):
    from conftest import run_sdrt

    done = run_sdrt("serve", str(exported("sd15", "fp32")), "--lora-dir", str(tmp_path / "none"), "--port", "0")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "--lora-dir" in done.stderr and "not a directory" in done.stderr


def test_network_requests_name_loras_from_the_folder_only(folders):
    """serve/ray.py's JSON bodies are whole Requests: confine_adapters keeps their LoRAs and embeddings off the
    server's file system."""
    from sdrt.runtime.request import Request as R
    from sdrt.serve import errors, fields

    ctx = fields.ModelContext("m", 64, 8, 100, 4, 4096 ** 2, lora_dir=folders / "loras")
    fields.confine_adapters(R.of(prompt="x", loras=[["ink", 0.5]]), ctx)
    for request, field in [(R.of(prompt="x", loras=[[str(folders / "elsewhere.safetensors"), 1.0]]), "loras"),
                           (R.of(prompt="x", embeddings=[str(folders / "embeddings" / "shiny.safetensors")]),
                            "embeddings")]:
        with pytest.raises(errors.HttpError) as e:
            fields.confine_adapters(request, ctx)
        assert e.value.status == 422 and e.value.field == field
    with pytest.raises(errors.HttpError, match="no LoRA folder"):
        fields.confine_adapters(R.of(prompt="x", loras=[["ink", 0.5]]), fields.ModelContext("m", 64, 8, 100, 4, 1))
