"""PhotoMaker v1 (reference/identity.md §2): a tiny PhotoMaker file of our own (a small CLIP vision tower, its
FuseModule at the tiny SDXL's widths, a rank-4 LoRA in the old attention-processor keys) exported into the tiny
SDXL's engine directory (export/extras/photomaker.py) and run (runtime/conditioning/photomaker.py), against
PhotoMaker v1's own model code and a re-statement of its pipeline over diffusers:
- the ID encoder and FuseModule are photomakerv 0.1.0's photomaker/model.py (PyPI; PhotoMaker@6ec44fc), loaded by
  its file path: the package's __init__ also imports its pipeline module, which imports torchvision, and PyPI's
  torchvision 0.28 (the one for torch 2.13) does not load against this venv's CPU torch ("operator torchvision::nms
  does not exist"); nothing is stubbed;
- its pipeline (pipeline.py: encode_prompt_with_trigger_word, the text-only prompt, the merge step) is re-stated
  here over diffusers' StableDiffusionXLPipeline with the file's LoRA loaded by load_lora_weights as PhotoMaker's
  load_photomaker_adapter does: the loop runs the text-only prompt and a step-end callback swaps in the fused prompt
  after start_merge_step, which is what PhotoMaker's `if i <= start_merge_step` does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_sdrt
from test_parity import assert_same_images, diffusers_scheduler, generators, to_uint8

from sdrt.export.exporter import ExportConfig, add_controlnets, export
from sdrt.runtime.conditioning import photomaker
from sdrt.runtime.errors import UserError
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.loader import open_dir
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.prompts import trigger
from sdrt.runtime.prompts.tokenizer import ClipTokenizer
from sdrt.runtime.validate import validate

SIZE = dict(width=48, height=32)
PROMPT = "a photo of a man img wearing a hat"


def _reference_model():
    """photomakerv's photomaker/model.py, executed from its file (see the module docstring)."""
    found = importlib.util.find_spec("photomaker")  # finds the package without running its __init__
    if found is None:
        pytest.skip("photomakerv is not installed (pip install photomakerv==0.1.0)")
    path = Path(found.submodule_search_locations[0]) / "model.py"
    spec = importlib.util.spec_from_file_location("photomakerv_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_encoder_class(model):
    """PhotoMakerIDEncoder at tiny widths: ViT 64 wide (one 64-wide head), 2 layers, patch 32 at 224², projections
    to the tiny SDXL's text widths (32 + 32), FuseModule(64) = its cross-attention width."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    class TinyIdEncoder(model.PhotoMakerIDEncoder):
        def __init__(self):
            CLIPVisionModelWithProjection.__init__(self, CLIPVisionConfig(
                hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2, patch_size=32,
                image_size=224, projection_dim=32))
            self.visual_projection_2 = torch.nn.Linear(64, 32, bias=False)
            self.fuse_module = model.FuseModule(64)

    return TinyIdEncoder


def _lora(unet, seed: int, rank: int = 4, gain: float = 0.3) -> dict:
    """PhotoMaker's LoRA layout: unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight on every attention."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for proj, layer in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            out[f"unet.{name}.{proj}_lora.down.weight"] = torch.randn(rank, layer.in_features, generator=g) * gain
            out[f"unet.{name}.{proj}_lora.up.weight"] = torch.randn(layer.out_features, rank, generator=g) * gain
    return out


def write_tiny_photomaker(model_folder: Path, path: Path, seed: int = 0, gain: float = 4.0) -> dict:
    """A photomaker-v1.bin-shaped file for the tiny SDXL; returns its state dict."""
    import diffusers

    torch.manual_seed(seed)
    encoder = _tiny_encoder_class(_reference_model())()
    with torch.no_grad():  # fused rows well above the text states' scale, so that the identity shows in the image
        encoder.fuse_module.layer_norm.weight.mul_(gain)
    unet = diffusers.UNet2DConditionModel.from_pretrained(model_folder, subfolder="unet")
    state = {"id_encoder": encoder.state_dict(), "lora_weights": _lora(unet, seed)}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({f"{p}.{k}": v.contiguous() for p in state for k, v in state[p].items()}, str(path))
    else:
        torch.save(state, path)
    return state


def _photo(seed: int, size=(60, 80)) -> Image.Image:
    """A smooth picture between two random colours with a little noise (unlike pure noise, two seeds give two
    different ID embeddings)."""
    rng = np.random.default_rng(seed)
    a, b = rng.random(3), rng.random(3)
    ramp = np.linspace(0, 1, size[1])[None, :, None] * np.linspace(0.3, 1, size[0])[:, None, None]
    image = a * (1 - ramp) + b * ramp + rng.normal(0, 0.05, (*size, 3))
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def pm_file(tiny_pipeline, tmp_path_factory):
    """(the tiny PhotoMaker v1 file, its state dict): no export, for the default run's refusal checks."""
    root = tmp_path_factory.mktemp("photomaker-file")
    state = write_tiny_photomaker(tiny_pipeline("sdxl"), root / "photomaker-v1.bin", seed=3)
    return root / "photomaker-v1.bin", state


@pytest.fixture(scope="module")
def pm(exported, pm_file, tmp_path_factory):
    """(engine dir with PhotoMaker added, the PhotoMaker file, its state dict, Pipeline over it); the export costs
    ≈ 15 s, so the tests using it are `slow`."""
    root = tmp_path_factory.mktemp("photomaker")
    engine = root / "engine"
    shutil.copytree(exported("sdxl", "fp32"), engine, copy_function=os.link)
    add_controlnets(engine, (), photomaker=str(pm_file[0]))
    return engine, pm_file[0], pm_file[1], Pipeline.load(engine, backend="ort-cpu")


def _encode_with_trigger(pipe, prompt: str, word: str, count: int):
    """PhotoMaker's encode_prompt_with_trigger_word re-stated (pipeline.py@6ec44fc): per tokenizer, the trigger
    dropped and the token before it repeated `count` times, cut or padded to 77; penultimate states side by side;
    the last encoder's pooled output; the last tokenizer's class mask."""
    states = []
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        trigger_id = tok.convert_tokens_to_ids(word)
        ids, klass = [], []
        for t in tok.encode(prompt):
            if t == trigger_id:
                klass.append(len(ids) - 1)
            else:
                ids.append(t)
        (k,) = klass
        ids = (ids[:k] + [ids[k]] * count + ids[k + 1:])[:tok.model_max_length]
        ids += [tok.pad_token_id] * (tok.model_max_length - len(ids))
        mask = torch.tensor([[k <= i < k + count for i in range(len(ids))]])
        out = enc(torch.tensor([ids]), output_hidden_states=True)
        pooled = out[0]
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled, mask


def _reference(tiny_pipeline, state, lora=None):
    """diffusers' SDXL pipeline with PhotoMaker's LoRA (and `lora`: (state dict, scale) of a user LoRA) loaded;
    returns run(photos, prompt, steps, strength, batch, seed)."""
    import diffusers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_pipeline("sdxl"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler(pipe, "euler")
    pipe.load_lora_weights(state["lora_weights"], adapter_name="photomaker")
    if lora is not None:
        pipe.load_lora_weights(lora[0], adapter_name="user")
        pipe.set_adapters(["photomaker", "user"], [1.0, lora[1]])
    encoder = _tiny_encoder_class(_reference_model())()
    encoder.load_state_dict(state["id_encoder"], strict=True)
    word = "img"
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        tok.add_tokens([word], special_tokens=True)

    @torch.no_grad()
    def run(photos, prompt, steps, strength, batch, seed, guidance=5.0):
        embeds, pooled, mask = _encode_with_trigger(pipe, prompt, word, len(photos))
        tokens = pipe.tokenizer.encode(prompt, add_special_tokens=False)
        tokens.remove(pipe.tokenizer.convert_tokens_to_ids(word))
        text_only = pipe.tokenizer.decode(tokens, add_special_tokens=False)
        pixels = CLIPImageProcessorPil()(photos, return_tensors="pt").pixel_values  # CLIPImageProcessor() (PIL)
        fused = encoder(pixels.unsqueeze(0), embeds, mask)
        start = min(int(strength / 100 * steps), 30)  # the authors' demo

        def swap(p, i, t, kw):  # after step `start`, the fused prompt (PhotoMaker: `if i <= start_merge_step`)
            if i != start:
                return {}
            keep = kw["prompt_embeds"].shape[0] - batch
            return {"prompt_embeds": torch.cat([kw["prompt_embeds"][:keep], fused.repeat(batch, 1, 1)]),
                    "add_text_embeds": torch.cat([kw["add_text_embeds"][:keep], pooled.repeat(batch, 1)])}

        return pipe(text_only, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=batch,
                    generator=generators(seed, batch), output_type="np", callback_on_step_end=swap,
                    callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"], **SIZE).images

    return run


@pytest.mark.slow
def test_photomaker_equals_photomaker_v1(pm, tiny_pipeline):
    engine, _, state, pipe = pm
    photos, others = [_photo(1), _photo(2, (90, 70))], [_photo(5)]
    run = _reference(tiny_pipeline, state)
    common = dict(prompt=PROMPT, steps=4, sampler="euler", seed=4, batch=2, guidance=5.0, **SIZE)
    ours = pipe.generate(Request.of(**common, photomaker_images=photos, photomaker_style_strength=25))
    assert_same_images("photomaker v1 sdxl 2 photos batch 2, strength 25%", ours, run(photos, PROMPT, 4, 25, 2, 4))
    misses = photomaker.CACHE.misses
    again = pipe.generate(Request.of(**common, photomaker_images=photos, photomaker_style_strength=25))
    assert photomaker.CACHE.misses == misses  # the same photos: no ID-encoder run
    assert np.array_equal(to_uint8(again), to_uint8(ours))
    changed = pipe.generate(Request.of(**common, photomaker_images=others, photomaker_style_strength=25))
    assert photomaker.CACHE.misses == misses + 1
    assert_same_images("photomaker v1 sdxl 1 photo batch 2", changed, run(others, PROMPT, 4, 25, 2, 4))
    text_only = pipe.generate(Request.of(**common, photomaker_images=photos, photomaker_style_strength=100))
    for label, other in (("another identity", changed), ("text only", text_only)):
        diff = int(np.abs(to_uint8(ours).astype(int) - to_uint8(other).astype(int)).max())
        print(f"photomaker: identity vs {label}: {diff}/255")
        assert diff > 8  # the identity shows


@pytest.mark.slow
def test_photomaker_with_a_user_lora_equals_photomaker_v1(pm, tiny_pipeline, tmp_path):
    from safetensors.torch import save_file

    import diffusers

    engine, _, state, pipe = pm
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_pipeline("sdxl"), subfolder="unet")
    user = _lora(unet, seed=11, rank=2, gain=0.2)
    save_file(user, str(tmp_path / "user.safetensors"))
    run = _reference(tiny_pipeline, state, lora=(user, 0.8))
    photos = [_photo(7)]
    common = dict(prompt=PROMPT, steps=3, sampler="euler", seed=9, batch=2, guidance=5.0, **SIZE)
    ours = pipe.generate(Request.of(**common, photomaker_images=photos, photomaker_style_strength=20,
                                    loras=[(str(tmp_path / "user.safetensors"), 0.8)]))
    assert_same_images("photomaker v1 sdxl + a user LoRA 0.8", ours, run(photos, PROMPT, 3, 20, 2, 9))


def test_trigger_word_rows_equal_transformers(tiny_pipeline):
    """The class-token repetition and the text-only prompt against transformers' tokenizers with the trigger added
    as PhotoMaker adds it."""
    from transformers import CLIPTokenizer

    folder = tiny_pipeline("sdxl")
    for name in ("tokenizer", "tokenizer_2"):
        hf = CLIPTokenizer.from_pretrained(folder / name)
        hf.add_tokens(["img"], special_tokens=True)
        ours = ClipTokenizer.from_folder(folder / name)
        for prompt in (PROMPT, "A Woman img, smiling!", "xx imgs of a dog"):
            ids = hf.encode(prompt)
            at = ids.index(hf.convert_tokens_to_ids("img"))
            clean = ids[:at] + ids[at + 1:]
            clean = (clean[:at - 1] + [clean[at - 1]] * 3 + clean[at:])[:77]
            rows = trigger.class_rows(ours, prompt, "img", 3)
            assert rows.ids[0].tolist() == clean + [hf.pad_token_id] * (77 - len(clean))
            assert rows.mask.nonzero()[0].tolist() == [at - 1, at, at + 1]
            tokens = hf.encode(prompt, add_special_tokens=False)
            tokens.remove(hf.convert_tokens_to_ids("img"))
            assert trigger.text_only(ours, prompt, "img") == hf.decode(tokens).strip()
    tok = ClipTokenizer.from_folder(folder / "tokenizer")
    for prompt, text in (("a man", "exactly once"), ("img of a man", "follow a class word"),
                         ("a man img img", "exactly once")):
        with pytest.raises(trigger.TriggerError, match=text):
            trigger.class_rows(tok, prompt, "img", 1)


@pytest.mark.slow  # needs the PhotoMaker export (≈ 15 s); test_export_refusals covers the default run
def test_bad_photomaker_requests(pm, exported):
    engine = open_dir(pm[0])
    common = dict(prompt=PROMPT, steps=4, **SIZE)
    photo = _photo(1)
    cases = [(dict(prompt="a photo of a man", photomaker_images=photo), "prompt", "exactly once"),
             (dict(prompt="img of a man", photomaker_images=photo), "prompt", "class word"),
             (dict(prompt=[PROMPT, PROMPT], photomaker_images=photo), "prompt", "one prompt"),
             (dict(photomaker_images=[]), "photomaker_images", "one or more"),
             (dict(photomaker_images=["not an image"]), "photomaker_images[0]", "base64"),
             (dict(photomaker_images=photo, photomaker_trigger="two words"), "photomaker_trigger", "one word"),
             (dict(photomaker_images=photo, photomaker_style_strength=150), "photomaker_style_strength", "100"),
             (dict(photomaker_images=photo, cache_interval=2), "cache_interval", "step caching"),
             (dict(photomaker_images=photo, photomaker_faces=np.ones((1, 512))), "photomaker_faces", "is v1"),
             (dict(photomaker_faces=np.ones((1, 512))), "photomaker_images", "is required")]
    for extra, field, text in cases:
        with pytest.raises(InvalidRequest, match=text) as e:
            validate(Request.of(**(common | extra)), engine)
        assert e.value.field == field, extra
    with pytest.raises(InvalidRequest, match="no PhotoMaker") as e:
        validate(Request.of(**common, photomaker_images=photo), open_dir(exported("sdxl", "fp32")))
    request = Request.of(**common, photomaker_images=[photo, _photo(2)], photomaker_style_strength=50)
    again = Request.from_dict(json.loads(json.dumps(request.to_dict(encode_images=True))))  # plain JSON both ways
    job = validate(again, engine)
    assert job.photomaker.start_merge_step == 2 and len(job.photomaker.photos) == 2
    assert [r.name for r in job.loras] == [str(pm[0] / "photomaker" / "lora.safetensors")]  # its LoRA at load
    assert job.uses == ("photomaker",) and "unet" in json.loads((pm[0] / "manifest.json").read_text())["components"]


@pytest.mark.slow
def test_export_records_photomaker(pm):
    engine = pm[0]
    manifest = json.loads((engine / "manifest.json").read_text())
    record = manifest["photomaker"]
    assert (record["version"], record["image_size"], record["id_width"]) == ("v1", 224, 64)
    components = manifest["components"]
    for name in ("photomaker/id_encoder", "photomaker/fuse"):
        assert components[name]["gate"]["passed"]
        assert not isinstance(components[name]["inputs"][0]["shape"][0], int)  # N photos / K rows: dynamic
    assert (engine / "photomaker" / "lora.safetensors").is_file()
    jsonschema = pytest.importorskip("jsonschema")
    schema = Path(__file__).parents[1] / "export" / "manifest.schema.json"
    jsonschema.validate(manifest, json.loads(schema.read_text()))


def test_export_refusals(tiny_pipeline, tmp_path, pm_file):
    state = pm_file[1]
    with pytest.raises(UserError, match="no such file"):
        export(ExportConfig(model=str(tiny_pipeline("sdxl")), output=tmp_path / "a", photomaker=str(tmp_path / "x")))
    v2 = {"id_encoder": {**state["id_encoder"], "qformer_perceiver.token_proj.0.weight": torch.zeros(4, 4)},
          "lora_weights": state["lora_weights"]}
    torch.save(v2, tmp_path / "photomaker-v2.bin")  # v2's name, v1's layout: no perceiver to build
    with pytest.raises(UserError, match="not PhotoMaker v2's"):
        export(ExportConfig(model=str(tiny_pipeline("sdxl")), output=tmp_path / "a",
                            photomaker=str(tmp_path / "photomaker-v2.bin")))
    torch.save({"image_proj": {}, "ip_adapter": {}}, tmp_path / "ip.bin")
    with pytest.raises(UserError, match="not a PhotoMaker file"):
        export(ExportConfig(model=str(tiny_pipeline("sdxl")), output=tmp_path / "a",
                            photomaker=str(tmp_path / "ip.bin")))
    with pytest.raises(UserError, match="SDXL-only"):
        export(ExportConfig(model=str(tiny_pipeline("sd15")), output=tmp_path / "b", photomaker=str(pm_file[0])))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow  # a subprocess (≈ 3 s): the default run keeps the validation-level refusals above
def test_cli_photomaker_errors_are_one_line(pm, tmp_path):
    _photo(1).save(tmp_path / "me.png")
    result = run_sdrt("run", str(pm[0]), "a photo of a man", "--steps", "2", "--width", "48", "--height", "32",
                      "--photomaker-image", str(tmp_path / "me.png"), "-o", str(tmp_path / "out.png"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: PROMPT") and "'img' exactly once" in lines[0], result.stderr


@pytest.mark.slow
def test_photomaker_over_openai_extra_body(pm):
    """The official openai SDK sends PhotoMaker's fields in extra_body: the Python API's image, and 400s naming the
    field for a prompt without the trigger and for a bad photo."""
    import base64
    import io

    openai = pytest.importorskip("openai")
    from conftest import LoopbackServer

    engine, _, _, pipe = pm
    photos = [_photo(1), _photo(2)]
    encoded = []
    for p in photos:
        buffer = io.BytesIO()
        p.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    server = LoopbackServer(engine, pipe, model_name="tiny-sdxl")
    try:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        extra = {"steps": 3, "seed": 5, "guidance_scale": 5.0, "sampler": "euler", "photomaker_images": encoded,
                 "photomaker_style_strength": 40}
        answer = sdk.images.generate(prompt=PROMPT, size="48x32", extra_body=extra)
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB"))
        want = pipe.generate(Request.of(prompt=PROMPT, steps=3, seed=5, guidance=5.0, sampler="euler", **SIZE,
                                        photomaker_images=photos, photomaker_style_strength=40))
        assert np.array_equal(got, np.asarray(want[0]))
        for prompt, body, param in (("a photo of a man", extra, "prompt"),
                                    (PROMPT, extra | {"photomaker_images": ["nope"]}, "photomaker_images[0]")):
            with pytest.raises(openai.BadRequestError) as e:
                sdk.images.generate(prompt=prompt, size="48x32", extra_body=body)
            assert e.value.status_code == 400 and e.value.param == param, e.value.body
    finally:
        server.stop()


# ---- PhotoMaker v2 -----------------------------------------------------------------------------------------------
FACE_WIDTH = 16  # the tiny ArcFace embedding (insightface's: 512)


def _v2_state(v1_state: dict, seed: int, depth: int = 2) -> dict:
    """A photomaker-v2.bin-shaped state: v1's tower, projections and fuse, plus a QFormerPerceiver at tiny widths
    (model_v2.py's names; face 16 → ×4 → 2 tokens × 64, its resampler 64 wide with one 128-wide head over the
    tower's 64-wide hidden states, FF ×4, `depth` blocks)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, gain=0.3: torch.randn(*shape, generator=g) * gain  # noqa: E731
    q = {"token_proj.0.weight": r(64, FACE_WIDTH), "token_proj.0.bias": r(64), "token_proj.2.weight": r(128, 64),
         "token_proj.2.bias": r(128), "token_norm.weight": 1 + r(64), "token_norm.bias": r(64),
         "perceiver_resampler.proj_in.weight": r(64, 64), "perceiver_resampler.proj_in.bias": r(64),
         "perceiver_resampler.proj_out.weight": r(64, 64), "perceiver_resampler.proj_out.bias": r(64),
         "perceiver_resampler.norm_out.weight": 1 + r(64), "perceiver_resampler.norm_out.bias": r(64)}
    for i in range(depth):
        at = f"perceiver_resampler.layers.{i}."
        q |= {at + "0.norm1.weight": 1 + r(64), at + "0.norm1.bias": r(64), at + "0.norm2.weight": 1 + r(64),
              at + "0.norm2.bias": r(64), at + "0.to_q.weight": r(128, 64), at + "0.to_kv.weight": r(256, 64),
              at + "0.to_out.weight": r(64, 128), at + "1.0.weight": 1 + r(64), at + "1.0.bias": r(64),
              at + "1.1.weight": r(256, 64), at + "1.3.weight": r(64, 256)}
    ids = dict(v1_state["id_encoder"]) | {"qformer_perceiver." + k: v for k, v in q.items()}
    return {"id_encoder": ids, "lora_weights": v1_state["lora_weights"]}


def _diffusers_qformer(state: dict, depth: int = 2):
    """PhotoMaker v2's QFormerPerceiver as diffusers' IPAdapterFaceIDPlusImageProjection (IP-Adapter FaceID Plus v2's
    projection: token_proj + norm, FacePerceiverResampler, shortcut at scale 1), at 128-wide heads, with the file's
    tensors renamed as diffusers' own converter renames FaceID Plus files."""
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    q = {k[len("qformer_perceiver."):]: v for k, v in state["id_encoder"].items() if k.startswith("qformer_perceiver.")}
    out = {"proj.net.0.proj.weight": q["token_proj.0.weight"], "proj.net.0.proj.bias": q["token_proj.0.bias"],
           "proj.net.2.weight": q["token_proj.2.weight"], "proj.net.2.bias": q["token_proj.2.bias"],
           "norm.weight": q["token_norm.weight"], "norm.bias": q["token_norm.bias"]}
    for name in ("proj_in", "proj_out", "norm_out"):
        for part in ("weight", "bias"):
            out[f"{name}.{part}"] = q[f"perceiver_resampler.{name}.{part}"]
    for i in range(depth):
        at, to = f"perceiver_resampler.layers.{i}.", f"layers.{i}."
        k, v = q[at + "0.to_kv.weight"].chunk(2)
        out |= {to + "ln0.weight": q[at + "0.norm1.weight"], to + "ln0.bias": q[at + "0.norm1.bias"],
                to + "ln1.weight": q[at + "0.norm2.weight"], to + "ln1.bias": q[at + "0.norm2.bias"],
                to + "attn.to_q.weight": q[at + "0.to_q.weight"], to + "attn.to_k.weight": k,
                to + "attn.to_v.weight": v, to + "attn.to_out.0.weight": q[at + "0.to_out.weight"],
                to + "ff.0.weight": q[at + "1.0.weight"], to + "ff.0.bias": q[at + "1.0.bias"],
                to + "ff.1.net.0.proj.weight": q[at + "1.1.weight"], to + "ff.1.net.2.weight": q[at + "1.3.weight"]}
    projection = IPAdapterFaceIDPlusImageProjection(embed_dims=64, output_dims=64, hidden_dims=64,
                                                    id_embeddings_dim=FACE_WIDTH, depth=depth, dim_head=128, heads=1,
                                                    num_tokens=2, ffn_ratio=4, ffproj_ratio=4)
    projection.load_state_dict(out)
    projection.shortcut, projection.shortcut_scale = True, 1.0  # model_v2.py: out = x + 1.0 * resampler(x, h)
    return projection.eval()


@pytest.fixture(scope="module")
def pm2(pm, exported, tiny_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("photomaker-v2")
    engine = root / "engine"
    shutil.copytree(exported("sdxl", "fp32"), engine, copy_function=os.link)
    state = _v2_state(pm[2], seed=8)
    torch.save(state, root / "photomaker-v2.bin")
    add_controlnets(engine, (), photomaker=str(root / "photomaker-v2.bin"))
    return engine, state, Pipeline.load(engine, backend="ort-cpu")


@pytest.mark.slow
def test_photomaker_v2_equals_its_algorithm_over_diffusers(pm2, tiny_pipeline):
    """v2 against its published algorithm re-stated: the CLIP tower's last_hidden_state and each photo's raw ArcFace
    embedding through diffusers' FaceID Plus projection (= QFormerPerceiver), two rows per photo fused by
    photomakerv's FuseModule into the class token repeated 2N times; the rest as v1's pipeline."""
    import diffusers
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    engine, state, pipe = pm2
    assert json.loads((engine / "manifest.json").read_text())["photomaker"]["version"] == "v2"
    model = _reference_model()
    tower = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                                                           num_attention_heads=1, num_hidden_layers=2, patch_size=32,
                                                           image_size=224, projection_dim=32)).eval()
    tower.load_state_dict({k: v for k, v in state["id_encoder"].items()
                           if k.startswith(("vision_model.", "visual_projection."))})
    fuse = model.FuseModule(64).eval()
    fuse.load_state_dict({k[len("fuse_module."):]: v for k, v in state["id_encoder"].items()
                          if k.startswith("fuse_module.")})
    qformer = _diffusers_qformer(state)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_pipeline("sdxl"))
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(ref, "euler")
    ref.load_lora_weights(state["lora_weights"], adapter_name="photomaker")
    for tok in (ref.tokenizer, ref.tokenizer_2):
        tok.add_tokens(["img"], special_tokens=True)
    photos = [_photo(3), _photo(4, (70, 90))]
    faces = (np.random.default_rng(6).standard_normal((2, FACE_WIDTH)) * 3).astype(np.float32)  # raw: not unit norm
    steps, strength, batch, seed = 4, 25, 2, 6
    with torch.no_grad():
        embeds, pooled, mask = _encode_with_trigger(ref, PROMPT, "img", 2 * len(photos))
        tokens = ref.tokenizer.encode(PROMPT, add_special_tokens=False)
        tokens.remove(ref.tokenizer.convert_tokens_to_ids("img"))
        text_only = ref.tokenizer.decode(tokens, add_special_tokens=False)
        pixels = CLIPImageProcessorPil()(photos, return_tensors="pt").pixel_values
        qformer.clip_embeds = tower.vision_model(pixels)[0][:, None]  # [N, 1, 257, W]: diffusers' layout
        rows = qformer(torch.from_numpy(faces))  # [N, 2, D]
        fused = fuse(embeds, rows[None], mask)
    start = min(int(strength / 100 * steps), 30)

    def swap(p, i, t, kw):
        if i != start:
            return {}
        keep = kw["prompt_embeds"].shape[0] - batch
        return {"prompt_embeds": torch.cat([kw["prompt_embeds"][:keep], fused.repeat(batch, 1, 1)]),
                "add_text_embeds": torch.cat([kw["add_text_embeds"][:keep], pooled.repeat(batch, 1)])}

    theirs = ref(text_only, num_inference_steps=steps, guidance_scale=5.0, num_images_per_prompt=batch,
                 generator=generators(seed, batch), output_type="np", callback_on_step_end=swap,
                 callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"], **SIZE).images
    common = dict(prompt=PROMPT, steps=steps, sampler="euler", seed=seed, batch=batch, guidance=5.0, **SIZE)
    ours = pipe.generate(Request.of(**common, photomaker_images=photos, photomaker_faces=faces,
                                    photomaker_style_strength=strength))
    assert_same_images("photomaker v2 sdxl 2 photos batch 2, strength 25%", ours, theirs)
    other = pipe.generate(Request.of(**common, photomaker_images=photos, photomaker_faces=faces[::-1].copy(),
                                     photomaker_style_strength=strength))
    diff = int(np.abs(to_uint8(ours).astype(int) - to_uint8(other).astype(int)).max())
    print(f"photomaker v2: identity vs the faces swapped: {diff}/255")
    assert diff > 8  # the ArcFace path shows
    with pytest.raises(InvalidRequest, match="is required by PhotoMaker v2") as e:
        validate(Request.of(**common, photomaker_images=photos), open_dir(engine))
    with pytest.raises(InvalidRequest, match=r"\[2, 16\]") as e:
        validate(Request.of(**common, photomaker_images=photos, photomaker_faces=faces[:1]), open_dir(engine))
    assert e.value.field == "photomaker_faces"
