"""What an engine directory remembers of its export: local sources as absolute paths (a ControlNet is added from
any working directory), the components a later `sdrt export DIR --controlnet …` keeps (tiny VAE without its source,
step-caching graphs, textual-inversion variants), and the slow tokenizer's vocab.json/merges.txt beside
tokenizer.json (transformers 4 and optimum read only those)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.request import Request

TINY_REQUEST = dict(prompt="a cat", steps=2, guidance=7.5, height=32, width=32, seed=3, sampler="euler", vae="tiny")


def _sdrt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrt.cli.main", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=os.environ.copy())


def _tiny_image(engine: Path) -> np.ndarray:
    from sdrt.runtime.pipeline import Pipeline

    return np.asarray(Pipeline.load(engine, backend="ort-cpu").generate(Request.of(**TINY_REQUEST))[0])


BASE = ("text_encoder", "unet", "vae_decoder", "vae_decoder_tiny", "vae_encoder_tiny")  # kept small: fast


@pytest.fixture(scope="module")
def grow(tiny_pipeline, tmp_path_factory):
    """grow(extras) → an sd15 export made in folder `a` from relative paths (model, --tiny-vae), with extras also
    --deepcache and --textual-inversion; then the tiny VAE's source is deleted and a ControlNet is added by the CLI
    run in folder `b`. Returns (engine, manifest before, manifest after, tiny-VAE image before, the CLI result)."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.extras.tiny_vae import write_tiny_vae
    from sdrt.export.models.tiny import write_tiny_controlnet

    cache = {}

    def make(extras: bool):
        if extras in cache:
            return cache[extras]
        root = tmp_path_factory.mktemp("bookkeeping")
        a, b = root / "a", root / "b"
        a.mkdir(), b.mkdir()
        (a / "model").symlink_to(tiny_pipeline("sd15"), target_is_directory=True)
        write_tiny_vae(a / "taesd", scale_factor=2)
        net = write_tiny_controlnet(tiny_pipeline("sd15"), root / "canny-src", seed=1)
        components = BASE + (("unet_deepcache", "unet_deepcache_shallow", "text_encoder_embeds") if extras else ())
        here = Path.cwd()
        os.chdir(a)
        try:
            before = export(ExportConfig(model="model", output=Path("engine"), precision="fp32", tiny_vae="taesd",
                                         components=components, deepcache=extras, textual_inversion=extras))
        finally:
            os.chdir(here)
        engine = a / "engine"
        image = _tiny_image(engine)
        shutil.rmtree(a / "taesd")  # the tiny VAE is reused from the directory, not exported again
        added = _sdrt("export", str(engine), "--controlnet", f"{net}=canny", cwd=b)
        after = json.loads((engine / "manifest.json").read_text())
        cache[extras] = engine, before, after, image, added
        return cache[extras]

    return make


@pytest.fixture(scope="module")
def grown(grow):
    return grow(False)


def test_local_sources_are_recorded_as_absolute_paths(grown):
    engine, before, _, _, _ = grown
    assert before["source"]["location"] == str(engine.parent / "model")
    assert before["tiny_vae"]["location"] == str(engine.parent / "taesd")


def test_a_controlnet_is_added_from_another_working_directory(grown):
    _, before, after, _, added = grown
    assert added.returncode == 0, added.stderr[-2000:]
    assert {"controlnet/canny", "unet_controlnet"} <= set(after["components"])
    assert [r["name"] for r in after["controlnets"]] == ["canny"]
    assert after["source"] == before["source"]


def _assert_kept(grown, names) -> None:
    engine, before, after, image, added = grown
    assert added.returncode == 0, added.stderr[-2000:]
    for name in names:
        assert after["components"][name] == before["components"][name], name  # reused, not exported again
        for rel in after["components"][name]["sha256"]:
            assert (engine / name / rel).is_file(), f"{name}/{rel}"
    assert after["tiny_vae"] == before["tiny_vae"]
    assert np.array_equal(_tiny_image(engine), image)


def test_adding_a_controlnet_keeps_the_tiny_vae(grown):
    _assert_kept(grown, BASE)


@pytest.mark.slow
def test_adding_a_controlnet_keeps_deepcache_and_textual_inversion_graphs(grow):
    _assert_kept(grow(True), BASE + ("unet_deepcache", "unet_deepcache_shallow", "text_encoder_embeds"))


def test_sdrt_run_with_the_tiny_vae_after_adding(grown, tmp_path):
    engine, _, _, _, added = grown
    assert added.returncode == 0, added.stderr[-2000:]
    result = _sdrt("run", str(engine), "a cat", "--vae", "tiny", "--steps", "2", "--width", "32", "--height", "32",
                   "-o", str(tmp_path / "tiny.png"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "tiny.png").is_file()


# ---- tokenizer files ------------------------------------------------------------------------------------------

PROMPTS = ("a photo of an astronaut riding a horse on the moon", "Cyberpunk CITY, neon lights!! 8k",
           "zebra-striped ünïcode café, 1girl", "")
TF4 = Path(sys.prefix) / "tf4"  # the side venv `make transformers4` makes (Makefile)
TF4_PYTHON = TF4 / "bin" / "python"


@pytest.fixture(scope="module")
def fast_only(tiny_pipeline, tmp_path_factory):
    """The tiny sd15 folder whose tokenizer has only tokenizer.json + tokenizer_config.json (what transformers 5
    saves), exported (text encoder only); returns (engine tokenizer folder, the original CLIP files' folder)."""
    from sdrt.export.exporter import ExportConfig, export

    root = tmp_path_factory.mktemp("fast-only")
    model = root / "model"
    shutil.copytree(tiny_pipeline("sd15"), model, copy_function=os.link)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (model / "tokenizer" / name).unlink()
    assert sorted(p.name for p in (model / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    export(ExportConfig(model=str(model), output=root / "engine", precision="fp32", components=("text_encoder",)))
    return root / "engine" / "tokenizer", tiny_pipeline("sd15") / "tokenizer"


def _fast_ids(folder: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return [tok.encode(p).ids for p in PROMPTS]


def test_vocab_and_merges_are_derived_from_tokenizer_json(fast_only):
    engine_tok, original = fast_only
    assert {"vocab.json", "merges.txt", "special_tokens_map.json"} <= {p.name for p in engine_tok.iterdir()}
    merges = (engine_tok / "merges.txt").read_text(encoding="utf-8")
    assert merges.startswith("#version: 0.2\n")
    assert merges == (original / "merges.txt").read_text(encoding="utf-8")  # what CLIP's writer wrote
    assert json.loads((engine_tok / "vocab.json").read_text()) == json.loads((original / "vocab.json").read_text())
    special = json.loads((engine_tok / "special_tokens_map.json").read_text())
    assert special["bos_token"] == "<|startoftext|>" and special["eos_token"] == "<|endoftext|>"


def test_tokenizer_from_vocab_and_merges_equals_the_fast_one(fast_only, tmp_path):
    """transformers' CLIPTokenizer built from vocab.json + merges.txt alone (tokenizer.json removed) gives the ids
    the fast tokenizer from tokenizer.json gives."""
    from transformers import CLIPTokenizer

    engine_tok, _ = fast_only
    slow_dir = tmp_path / "slow"
    shutil.copytree(engine_tok, slow_dir)
    (slow_dir / "tokenizer.json").unlink()
    slow = CLIPTokenizer.from_pretrained(slow_dir)
    assert [slow(p).input_ids for p in PROMPTS] == _fast_ids(engine_tok)


def test_transformers_4_loads_the_engine_tokenizer(fast_only):
    """transformers 4 (what optimum pins) in a side venv: its slow CLIPTokenizer (vocab.json/merges.txt) and its
    AutoTokenizer give the fast tokenizer's ids."""
    if not (TF4 / ".sdrt-ready").is_file():
        pytest.skip(f"no transformers 4 side venv at {TF4} (`make transformers4` makes it where PyPI is reachable)")
    engine_tok, _ = fast_only
    code = ("import json, sys, transformers\n"
            "from transformers import AutoTokenizer, CLIPTokenizer\n"
            "assert transformers.__version__.startswith('4.'), transformers.__version__\n"
            "prompts = json.loads(sys.argv[2])\n"
            "slow = CLIPTokenizer.from_pretrained(sys.argv[1])\n"
            "auto = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "print(json.dumps([[slow(p).input_ids for p in prompts], [auto(p).input_ids for p in prompts]]))\n")
    result = subprocess.run([str(TF4_PYTHON), "-c", code, str(engine_tok), json.dumps(PROMPTS)], capture_output=True,
                            text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-2000:]
    slow, auto = json.loads(result.stdout.strip().splitlines()[-1])
    assert slow == _fast_ids(engine_tok)
    assert auto == _fast_ids(engine_tok)
