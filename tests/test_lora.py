"""LoRA at load (runtime/lora/adapters.py): parity with diffusers, switching without ghosting, key conversion checked
against diffusers' own converters, weights maps, bad input, batching, the TensorRT refit logic, the bench.

LoRA files are made here: peft injects LoRA layers into the tiny models' UNet / text encoders, B is drawn at
random (non-zero, so images move well past 1/255, which each parity test asserts), and the layers' A/B are
written in diffusers' format (`unet.….lora_A.weight`, text encoders under `text_encoder[_2].text_model.…` as
files made with transformers 4 carry them) or in kohya's (`lora_unet_<path with "_">.lora_down.weight`,
`lora_te_`/`lora_te1_`/`lora_te2_` + `text_model_…`, SDXL's UNet in sgm block names, `alpha` ≠ rank), by the
documented naming rule written out below. The reference is diffusers itself: `load_lora_weights` +
`fuse_lora(lora_scale=…)` (two LoRAs: `set_adapters` weights, then `fuse_lora`), on the same tiny folder, seed
and scheduler; the bound is 1/255 per pixel, as tests/test_parity.py.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_parity import assert_same_images, generators, reference_pipeline, to_uint8

from sdrt.runtime.lora import adapters as lora_adapters, refs as lora_refs, weights as lora_weights
from sdrt.runtime.lora.keys import UnetLayout, canonical, sgm_path
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.fields import InvalidRequest

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv"]  # "conv": LoCon on the down/up-sampler 3×3s
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
STEPS, SIZE = 3, 32
MIN_MOVE = 8  # uint8 levels a LoRA must move the image by, so that a LoRA that does nothing cannot pass


# ---- making LoRA files -----------------------------------------------------------------------------------

def peft_layers(module, targets, rank: int, seed: int, b_std: float) -> dict[str, torch.Tensor]:
    """peft's LoRA layers injected into `module`, B random: {module path.lora_A/B.weight: tensor}."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False),
                            module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * b_std)
    return {k: v.detach().contiguous().clone() for k, v in get_peft_model_state_dict(module).items()}


def make_layers(folder: Path, components: dict, seed: int) -> dict[str, dict]:
    """{component: peft layers} for the tiny pipeline in `folder`; components = {name: (rank, b_std)}."""
    import diffusers
    import transformers

    out = {}
    for i, (name, (rank, b_std)) in enumerate(components.items()):
        if name == "unet":
            module = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
            targets = UNET_TARGETS
        else:
            cls = transformers.CLIPTextModelWithProjection if name == "text_encoder_2" else transformers.CLIPTextModel
            module = cls.from_pretrained(folder / name)
            targets = TEXT_TARGETS
        out[name] = peft_layers(module, targets, rank, seed + i, b_std)
    return out


def _text_path(key_module: str) -> str:
    """A text encoder's module path in transformers 4's layout (`text_model.…`), as files in the wild name it."""
    if key_module.startswith(("text_model.", "text_projection")):
        return key_module
    return "text_model." + key_module


def write_diffusers(path: Path, layers: dict[str, dict]) -> Path:
    from safetensors.torch import save_file

    tensors = {}
    for component, sd in layers.items():
        for key, value in sd.items():
            module, part = key.rsplit(".lora_", 1)
            module = module if component == "unet" else _text_path(module)
            tensors[f"{component}.{module}.lora_{part}"] = value
    save_file(tensors, str(path))
    return path


# kohya's SDXL trainer names the UNet in sgm/LDM form (reference/customization.md §1.1, §1.3 step 2): the block
# arithmetic of diffusers' _maybe_map_sgm_blocks_to_diffusers, run backwards, and the resnet layer names.
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}


def sgm_name(path: str, layers_per_block: int, up_attention: list[bool]) -> str:
    step = layers_per_block + 1
    parts = path.split(".")
    if parts[0] == "down_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return ".".join(["input_blocks", str((b + 1) * step), "0", "op"])
        block = ["input_blocks", str(1 + b * step + j), "0" if kind == "resnets" else "1"]
    elif parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        block = ["middle_block", "1" if kind == "attentions" else ("0" if j == 0 else "2")]
    elif parts[0] == "up_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            block = ["output_blocks", str(b * step + layers_per_block), "2" if up_attention[b] else "1"]
        else:
            block = ["output_blocks", str(b * step + j), "0" if kind == "resnets" else "1"]
    else:
        top = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2"}
        return top[path]
    if kind == "resnets":
        rest = _SGM_RESNET[".".join(rest)].split(".")
    return ".".join(block + rest)


def write_kohya(path: Path, layers: dict[str, dict], alpha: float, sdxl: bool = False,
                layers_per_block: int = 1, up_attention=(True, False)) -> Path:
    """kohya's naming: `<prefix>_<module path with "." → "_">.lora_down.weight / .lora_up.weight / .alpha`."""
    from safetensors.torch import save_file

    tensors = {}
    for component, sd in layers.items():
        for key, value in sd.items():
            module, part = key.rsplit(".lora_", 1)
            if component == "unet":
                name = "lora_unet_" + (sgm_name(module, layers_per_block, list(up_attention)) if sdxl else module)
            else:
                prefix = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
                name = prefix + _text_path(module)
            name = name.replace(".", "_")
            tensors[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


# ---- references ------------------------------------------------------------------------------------------

_BASE_IMAGES: dict[tuple, np.ndarray] = {}


def diffusers_images(folder: Path, loras: list[tuple[Path, float]], prompt: str, seed: int, negative=None):
    """diffusers' load_lora_weights + fuse_lora on a fresh pipeline (no LoRA: the base, computed once)."""
    if not loras and (folder, prompt, seed, negative) in _BASE_IMAGES:
        return _BASE_IMAGES[folder, prompt, seed, negative]
    ref = reference_pipeline(folder)
    if len(loras) == 1:
        ref.load_lora_weights(str(loras[0][0]))
        ref.fuse_lora(lora_scale=loras[0][1])
    elif loras:
        names = [f"l{i}" for i in range(len(loras))]
        for (path, _), name in zip(loras, names):
            ref.load_lora_weights(str(path), adapter_name=name)
        ref.set_adapters(names, adapter_weights=[s for _, s in loras])
        ref.fuse_lora(adapter_names=names, lora_scale=1.0)
    images = ref(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
                 width=SIZE, generator=generators(seed, 1), output_type="np").images
    if not loras:
        _BASE_IMAGES[folder, prompt, seed, negative] = images
    return images


def ours(pipe: Pipeline, prompt: str, seed: int, loras=(), negative=None):
    return pipe.generate(Request.of(prompt=prompt, negative_prompt=negative, steps=STEPS, guidance=7.5, seed=seed,
                                    width=SIZE, height=SIZE, loras=[(str(p), s) for p, s in loras]))


def moved(a, b) -> int:
    return int(np.abs(to_uint8(a).astype(int) - to_uint8(b).astype(int)).max())


@pytest.fixture(scope="module")
def files(tiny_pipeline, tmp_path_factory):
    """LoRA files for the tiny SD 1.5 and SDXL models, made once."""
    root = tmp_path_factory.mktemp("loras")
    sd15, sdxl = tiny_pipeline("sd15"), tiny_pipeline("sdxl")
    out = {
        "sd15-diffusers": write_diffusers(root / "sd15_diffusers.safetensors", make_layers(
            sd15, {"unet": (4, 0.02), "text_encoder": (4, 0.1)}, seed=1)),
        "sd15-kohya": write_kohya(root / "sd15_kohya.safetensors", make_layers(
            sd15, {"unet": (8, 0.03), "text_encoder": (8, 0.1)}, seed=2), alpha=3.0),
        "sd15-unet": write_diffusers(root / "sd15_unet_only.safetensors", make_layers(
            sd15, {"unet": (4, 0.03)}, seed=3)),
        "sdxl-kohya": write_kohya(root / "sdxl_kohya.safetensors", make_layers(
            sdxl, {"unet": (4, 0.03), "text_encoder": (4, 0.1), "text_encoder_2": (4, 0.1)}, seed=4),
            alpha=2.0, sdxl=True),
        "sdxl-diffusers": write_diffusers(root / "sdxl_diffusers.safetensors", make_layers(
            sdxl, {"unet": (4, 0.02), "text_encoder_2": (4, 0.1)}, seed=5)),
    }
    return out


@pytest.fixture(scope="module")
def pipes(ort_pipelines):
    return ort_pipelines


# ---- parity ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,case", [
    ("sd15", [("sd15-diffusers", 0.8)]),
    ("sd15", [("sd15-kohya", 0.6)]),
    ("sd15", [("sd15-diffusers", 0.5), ("sd15-kohya", -0.7)]),
    ("sdxl", [("sdxl-kohya", 0.9)]),
    ("sdxl", [("sdxl-diffusers", 1.0), ("sdxl-kohya", 0.5)]),
])
def test_lora_at_load_equals_diffusers_fused(pipes, tiny_pipeline, files, family, case):
    loras = [(files[name], scale) for name, scale in case]
    prompt, seed = "a watercolor fox in the snow", 21
    base = diffusers_images(tiny_pipeline(family), [], prompt, seed)
    theirs = diffusers_images(tiny_pipeline(family), loras, prompt, seed)
    mine = ours(pipes(family), prompt, seed, loras)
    assert moved(theirs, base) >= MIN_MOVE, "the LoRA must move the image well past 1/255"
    assert_same_images(f"lora-{family}-" + "+".join(n for n, _ in case), mine, theirs)


def test_text_encoder_only_and_unet_only_loras_each_move_the_image(pipes, tiny_pipeline, files, tmp_path):
    """Each half is applied on its own (a UNet-only LoRA rebuilds no text encoder and vice versa)."""
    te_only = write_kohya(tmp_path / "te_only.safetensors",
                          make_layers(tiny_pipeline("sd15"), {"text_encoder": (4, 0.15)}, seed=9), alpha=8.0)
    prompt, seed = "a lighthouse", 5
    pipe = pipes("sd15")
    base = ours(pipe, prompt, seed)
    for path, scale, components in ((te_only, 1.0, ("text_encoder",)), (files["sd15-unet"], 1.0, ("unet",))):
        ref = lora_refs.resolve([(str(path), scale)], pipe.adapters.model, None)[0]
        assert ref.components == components
        theirs = diffusers_images(tiny_pipeline("sd15"), [(path, scale)], prompt, seed)
        assert moved(theirs, base) >= MIN_MOVE
        assert_same_images(f"lora-sd15-{components[0]}-only", ours(pipe, prompt, seed, [(path, scale)]), theirs)


def test_switching_a_b_none_gives_exactly_b_alone_and_the_base(exported, files):
    """No ghosting: every set is rebuilt from the stored base weights, so the order of switches leaves no trace."""
    a, b = [(files["sd15-kohya"], 0.8)], [(files["sd15-unet"], 1.0)]
    prompt, seed = "a red bicycle", 3
    switching = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu")
    sequence = [ours(switching, prompt, seed, s) for s in (a, b, (), a, b)]
    fresh_b = ours(Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu"), prompt, seed, b)
    fresh_base = ours(Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu"), prompt, seed)
    assert np.array_equal(to_uint8(sequence[1]), to_uint8(fresh_b))
    assert np.array_equal(to_uint8(sequence[4]), to_uint8(fresh_b))
    assert np.array_equal(to_uint8(sequence[2]), to_uint8(fresh_base))
    assert np.array_equal(to_uint8(sequence[0]), to_uint8(sequence[3]))
    assert moved(sequence[0], sequence[1]) >= MIN_MOVE and moved(sequence[1], fresh_base) >= MIN_MOVE


def test_the_torch_reference_takes_loras_through_its_own_adapted_copy(exported, files):
    """The torch reference engine's `adapted` (a copy of its base module plus the deltas): the same image as ONNX
    Runtime's new session with merged initializers, and the base untouched afterwards."""
    loras = [(files["sd15-diffusers"], 0.8)]
    prompt, seed = "a small boat", 4
    torch_pipe = Pipeline.load(exported("sd15", "fp32"), backend="torch")
    base = ours(torch_pipe, prompt, seed)
    with_lora = ours(torch_pipe, prompt, seed, loras)
    assert moved(with_lora, base) >= MIN_MOVE
    assert np.array_equal(to_uint8(ours(torch_pipe, prompt, seed)), to_uint8(base))
    ort_pipe = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu")
    assert_same_images("lora-torch-vs-ort", with_lora, ours(ort_pipe, prompt, seed, loras))


def test_adapted_engines_are_cached_per_set_and_bounded(exported, files):
    pipe = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu")
    adapters = pipe.adapters
    sets = [lora_refs.resolve([(str(files["sd15-unet"]), s)], adapters.model, None) for s in (0.5, 1.0, 1.5)]
    first = adapters.engine("unet", sets[0])
    assert adapters.engine("unet", sets[0]) is first  # cached
    assert adapters.engine("unet", ()) is pipe.engines["unet"]  # the base stays resident
    assert adapters.engine("text_encoder", sets[0]) is pipe.engines["text_encoder"]  # UNet-only LoRA
    adapters.engine("unet", sets[1])
    adapters.engine("unet", sets[2])  # a third set evicts the least recently used
    assert len([k for k in adapters.cache if k[0] == "unet"]) == lora_adapters.MAX_ADAPTED_PER_COMPONENT
    assert adapters.engine("unet", sets[0]) is not first


def test_pipeline_load_loras_apply_to_every_request_and_requests_add_to_them(exported, files):
    prompt, seed = "a tin robot", 8
    kohya, unet = (str(files["sd15-kohya"]), 0.6), (str(files["sd15-unet"]), 1.0)
    loaded = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu", loras=[f"{kohya[0]}:{kohya[1]}"])
    plain = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu")
    assert np.array_equal(to_uint8(ours(loaded, prompt, seed)), to_uint8(ours(plain, prompt, seed, [kohya])))
    both = ours(plain, prompt, seed, [kohya, unet])
    assert np.array_equal(to_uint8(ours(loaded, prompt, seed, [unet])), to_uint8(both))
    # a request's scale replaces the load-time one for the same file; scale 0 turns it off
    assert np.array_equal(to_uint8(ours(loaded, prompt, seed, [(kohya[0], 0.0)])), to_uint8(ours(plain, prompt, seed)))


# ---- prompt tags -----------------------------------------------------------------------------------------

def test_strip_lora_tags():
    from sdrt.runtime.prompts.tags import TagError, strip_lora_tags

    assert strip_lora_tags("a castle <lora:ink_style:0.8>, detailed") == ("a castle , detailed", [("ink_style", 0.8)])
    assert strip_lora_tags("<lora:a> x <LORA:b:-1.5>") == (" x ", [("a", 1.0), ("b", -1.5)])
    assert strip_lora_tags("a <hypernet:h:1> cat") == ("a <hypernet:h:1> cat", [])
    for bad, fragment in (("<lora:x:0.5:0.2>", "one scale"), ("<lora:x:te=1>", "one scale"),
                          ("<lora:x:strong>", "not a number"), ("<lora:x:inf>", "finite"), ("<lora::1>", "names no")):
        with pytest.raises(TagError, match=fragment):
            strip_lora_tags(bad)


def test_prompt_tags_equal_the_loras_field_and_are_stripped(exported, files, tmp_path):
    """`<lora:NAME:SCALE>` found in the LoRA folder (sub-folders too) equals the same file in `loras`."""
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    shutil.copy(files["sd15-kohya"], folder / "styles" / "ink.safetensors")
    pipe = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu", lora_dir=folder)
    request = Request.of(prompt=["a fox <lora:ink:0.7>", "a cat<lora:ink:0.7>"], steps=STEPS, seed=4, width=SIZE,
                         height=SIZE)
    job = pipe.validate(request)
    assert job.prompt == ("a fox ", "a cat") and [(r.name, r.scale) for r in job.loras] == [("ink", 0.7)]
    by_field = Request.of(prompt=["a fox ", "a cat"], steps=STEPS, seed=4, width=SIZE, height=SIZE,
                          loras=[["ink", 0.7]])
    assert np.array_equal(to_uint8(pipe.generate(request)), to_uint8(pipe.generate(by_field)))


# ---- bad input -------------------------------------------------------------------------------------------

def _invalid(pipe, field: str, *fragments, **request):
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(Request.of(prompt=request.pop("prompt", "a cat"), steps=2, width=SIZE, height=SIZE, **request))
    assert e.value.field == field, e.value
    for fragment in fragments:
        assert fragment in e.value.message, e.value.message
    assert "\n" not in str(e.value)
    return e.value.message


def test_bad_loras_are_refused_with_one_clear_line(pipes, files, tmp_path):
    from safetensors.torch import save_file

    pipe = pipes("sd15")
    _invalid(pipe, "loras", "is a LoRA for SDXL", "SD 1.x", loras=[(str(files["sdxl-kohya"]), 1.0)])
    _invalid(pipes("sdxl"), "loras", "is a LoRA for SD 1.x or 2.x", "lora_te_", "SDXL", loras=[(str(files["sd15-kohya"]), 1.0)])
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(4, 2)}, str(unrelated))
    _invalid(pipe, "loras", "no key of unrelated.safetensors matches", loras=[(str(unrelated), 1.0)])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _invalid(pipe, "loras", "not a readable .safetensors", loras=[(str(corrupt), 1.0)])
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(64, 2),
               "lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_b": torch.zeros(2, 64)}, str(loha))
    _invalid(pipe, "loras", "LoHa", "plain LoRA and LoCon", loras=[(str(loha), 1.0)])
    pickled = tmp_path / "old.pt"
    pickled.write_bytes(b"not read")
    _invalid(pipe, "loras", ".safetensors format only", loras=[(str(pickled), 1.0)])
    for scale in (math.inf, math.nan):
        _invalid(pipe, "loras", "finite", loras=[(str(files["sd15-unet"]), scale)])
    _invalid(pipe, "loras", "not a file", "no LoRA folder", loras=[("ink", 1.0)])
    _invalid(pipe, "prompt", "no LoRA folder", prompt="a cat <lora:ink:1>")
    _invalid(pipe, "prompt", "same <lora:…> tags", prompt=["a <lora:x>", "b"])


def test_unknown_tag_lists_the_lora_folder(exported, files, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(files["sd15-unet"], folder / "watercolor.safetensors")
    shutil.copy(files["sd15-kohya"], folder / "ink.safetensors")
    pipe = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu", components=("text_encoder", "unet", "vae_decoder"),
                         lora_dir=folder)
    message = _invalid(pipe, "prompt", "no LoRA named 'oil'", prompt="a cat <lora:oil:0.5>")
    assert message.endswith("it has: ink, watercolor")


def test_cli_lora_errors_exit_2_with_one_line_and_write_nothing(exported, files, tmp_path):
    from conftest import run_sdrt

    engine = str(exported("sd15", "fp32"))
    out = tmp_path / "x.png"
    # the CLI's phrasing of both kinds of error (an option it parses, a field validate() refuses); what each
    # refusal says is tested through the API above
    for args, fragment in ((["--lora", f"{files['sd15-unet']}:nan"], "--lora"), ([], "PROMPT")):
        prompt = "a cat <lora:nothing>" if not args else "a cat"
        result = run_sdrt("run", engine, prompt, "--steps", "2", "--width", "32", "--height", "32", "-o", str(out),
                          "--backend", "ort-cpu", *args)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {fragment}"), result.stderr
        assert not out.exists()


def test_cli_run_with_lora_equals_the_api(exported, files, tmp_path):
    from PIL import Image

    from conftest import run_sdrt

    out = tmp_path / "fox.png"
    result = run_sdrt("run", str(exported("sd15", "fp32")), "a fox", "--steps", str(STEPS), "--guidance", "7.5",
                      "--seed", "2", "--width", str(SIZE), "--height", str(SIZE), "--backend", "ort-cpu",
                      "--lora", f"{files['sd15-kohya']}:0.6", "-o", str(out))
    assert result.returncode == 0, result.stderr
    api = ours(Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu"), "a fox", 2, [(files["sd15-kohya"], 0.6)])
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api[0]))


def test_older_exports_still_run_and_say_why_no_lora(exported, files, tmp_path):
    """A directory without weights maps (written before LoRA support, or by optimum) runs as before, with its
    weights inside model.onnx, and refuses LoRAs with a message saying to re-export."""
    import onnx

    old = tmp_path / "old"
    shutil.copytree(exported("sd15", "fp32"), old)
    for component in ("unet", "text_encoder"):
        model = onnx.load(str(old / component / "model.onnx"))  # external data folded back in
        (old / component / "model.onnx_data").unlink()
        (old / component / "weights_map.json").unlink()
        onnx.save(model, str(old / component / "model.onnx"))
    pipe = Pipeline.load(old, backend="ort-cpu")
    new = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu")
    assert np.array_equal(to_uint8(ours(pipe, "a cat", 1)), to_uint8(ours(new, "a cat", 1)))
    _invalid(pipe, "loras", "without weights maps", "re-export", loras=[(str(files["sd15-unet"]), 1.0)])


# ---- batching and the service ----------------------------------------------------------------------------

def test_requests_with_different_lora_sets_never_share_a_batch(pipes, files):
    from sdrt.runtime import batching
    from sdrt.runtime.service import Service

    pipe = pipes("sd15")
    unet = [(str(files["sd15-unet"]), 1.0)]
    requests = [Request.of(prompt="a boat", steps=STEPS, seed=1, width=SIZE, height=SIZE, loras=l)
                for l in ((), unet, unet, [(str(files["sd15-unet"]), 0.5)])]
    jobs = [pipe.validate(r) for r in requests]
    assert batching.group(jobs, 8) == [[0], [1, 2], [3]]
    with Service(pipe, max_batch=4, max_wait_ms=200) as service:
        results = [f.result() for f in [service.submit(r) for r in requests]]
    assert [r.batch_size for r in results] == [1, 2, 2, 1]
    for request, result in zip(requests, results):
        assert np.array_equal(to_uint8(result.images), to_uint8(pipe.generate(request)))
    assert moved(results[0].images, results[1].images) >= MIN_MOVE


def test_request_json_round_trip_keeps_loras():
    import json

    request = Request.of(prompt="a cat", loras=[("ink", 0.5), ("styles/oil.safetensors", 1.0)])
    assert request.adapters.loras == (("ink", 0.5), ("styles/oil.safetensors", 1.0))
    data = json.loads(json.dumps(request.to_dict()))
    assert data["adapters"] == {"loras": [["ink", 0.5], ["styles/oil.safetensors", 1.0]]}
    assert Request.from_dict(data) == request
    assert Request.from_dict({"prompt": "a cat", "adapters": {"loras": [["ink", 0.5]]}}).adapters.loras == (("ink", 0.5),)


# ---- key conversion checked against diffusers' converters ------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_names_convert_back_to_every_module_as_diffusers_converts_them(tiny_pipeline, family):
    """sdrt names every UNet module the kohya way (SDXL: sgm blocks); diffusers' own converter turns each of those
    names back into the module's diffusers path."""
    import diffusers
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_pipeline(family) / "unet")
    layout = UnetLayout.from_config(dict(unet.config))
    modules = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    state, expected = {}, {}
    for path in modules:
        name = "lora_unet_" + ((sgm_path(path, layout) if family == "sdxl" else path).replace(".", "_"))
        assert family != "sdxl" or sgm_path(path, layout) == sgm_name(path, layout.layers_per_block,
                                                                      list(layout.up_has_attention))
        state[name + ".lora_down.weight"] = torch.zeros(1, 1)
        state[name + ".lora_up.weight"] = torch.zeros(1, 1)
        expected[path] = name
    if family == "sdxl":
        state = _maybe_map_sgm_blocks_to_diffusers(state, unet.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    # then as diffusers' load_lora_adapter: attention-processor names (attn1.processor.to_q_lora.down) → PEFT's
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet.").replace(".processor", ""): v
                                            for k, v in converted.items()})
    assert {k.rsplit(".lora_A", 1)[0] for k in peft if ".lora_A" in k} == set(modules)


def test_subpixel_transform_of_a_delta_equals_the_rewrites_kernels():
    from diffusers.models.upsampling import Upsample2D

    from sdrt.export.rewrites import SubpixelUpsample2D

    torch.manual_seed(0)
    up = Upsample2D(6, use_conv=True, out_channels=5)
    delta = torch.randn_like(up.conv.weight)
    before = dict(SubpixelUpsample2D(up).named_buffers())
    with torch.no_grad():
        up.conv.weight += delta
    after = dict(SubpixelUpsample2D(up).named_buffers())
    for name, value in after.items():
        if name == "bias":
            continue
        got = before[name].numpy() + lora_weights.transform(delta.numpy(), f"subpixel:{name}")
        assert np.allclose(got, value.numpy(), atol=1e-6), name


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_weights_map_names_every_weight_with_its_base_value(exported, tiny_pipeline, family):
    import diffusers

    engine = exported(family, "fp32")
    maps = lora_weights.read_weights_maps(engine)
    assert set(maps) == ({"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set()))
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_pipeline(family))
    transforms = set()
    for component, doc in maps.items():
        module = getattr(pipe, component)
        linear_conv = {canonical(component, n) for n, m in module.named_modules()
                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert set(doc["weights"]) == linear_conv
        for path, entry in doc["weights"].items():
            for init in entry["initializers"]:
                transforms.add(init["transform"].split(":")[0])
                if init["transform"] in ("identity", "transpose"):
                    weight = module.get_submodule(path if path in dict(module.named_modules()) else
                                                  "text_model." + path).weight.detach().numpy()
                    value = lora_weights.base_initializer(engine / component, doc, init)
                    assert np.array_equal(value, weight if init["transform"] == "identity" else weight.T), path
    assert transforms == {"identity", "transpose", "subpixel"}


# ---- TensorRT refit logic (sdrt's bookkeeping; TensorRT itself cannot run here) --------------------------

def test_refit_pushes_base_plus_delta_for_the_union_of_old_and_new_sets():
    from sdrt.engines.trt_refit import Refitter, refit_arrays

    base = {n: np.full(2, i, np.float32) for i, n in enumerate("abcd")}
    arrays = refit_arrays({"a", "b"}, {"b": np.ones(2, np.float32) * 9, "c": np.ones(2, np.float32) * 7}, base.__getitem__)
    assert sorted(arrays) == ["a", "b", "c"]
    assert arrays["a"].tolist() == [0, 0] and arrays["b"].tolist() == [9, 9] and arrays["c"].tolist() == [7, 7]

    class Recorder:  # stands in for a TensorRTComponent: records what a refit would push (no TensorRT here)
        def __init__(self):
            self.pushed = []

        def refit(self, arrays, base):
            self.pushed.append({k: v.tolist() for k, v in arrays.items()})

    rec = Recorder()
    r = Refitter(rec, base.__getitem__)
    r.switch({"a": np.ones(2, np.float32)})  # LoRA A touches a
    r.switch({"b": np.ones(2, np.float32) * 5})  # LoRA B touches b: a goes back to its base value
    r.switch({})  # none: b back to base
    r.switch({})  # nothing to do
    assert rec.pushed == [{"a": [1, 1]}, {"a": [0, 0], "b": [5, 5]}, {"b": [1, 1]}]


def test_refitted_component_goes_back_to_the_base_values(exported, files):
    """With a refittable engine (TensorRT: one engine per component, refitted in place), a job without LoRAs after
    one with a LoRA pushes the stored base values back. The component is a recording stand-in (no TensorRT)."""
    from sdrt.runtime.loader import open_dir

    from sdrt.engines.trt_refit import RefitInPlace

    class TensorRTComponent(RefitInPlace):  # adapted() as engines/tensorrt.py's: refit in place
        def __init__(self):
            self.pushed = []

        def refit(self, arrays, base):
            self.pushed.append(arrays)

    engine_dir = open_dir(exported("sd15", "fp32"))
    component = TensorRTComponent()
    adapters = lora_adapters.Adapters(engine_dir, lambda: {"unet": component})
    refs = lora_refs.resolve([(str(files["sd15-unet"]), 1.0)], adapters.model, None)
    assert adapters.engine("unet", refs) is component
    assert adapters.engine("unet", refs) is component and len(component.pushed) == 1  # same set: no refit
    adapters.engine("unet", ())
    applied, restored = component.pushed
    assert set(applied) == set(restored) and applied
    doc = lora_weights.read_weights_maps(engine_dir.path)["unet"]
    inits = {i["name"]: i for e in doc["weights"].values() for i in e["initializers"]}
    for name, value in restored.items():
        base = lora_weights.base_initializer(engine_dir.path / "unet", doc, inits[name])
        assert np.array_equal(value, base) and not np.array_equal(applied[name], base), name


# ---- the bench script ------------------------------------------------------------------------------------

def test_lora_switch_bench_runs_on_the_tiny_model(exported, tmp_path):
    """`sdrt bench --lora-switch` (bench/lora_switch.py) on the tiny model: the figures exist and make sense."""
    import json

    from conftest import run_sdrt

    out = tmp_path / "bench"
    done = run_sdrt("bench", str(exported("sd15", "fp32")), "--lora-switch", "--resolution", "32", "--runs", "1",
                    "-o", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["command"].startswith("sdrt bench ") and "--lora-switch" in result["command"]
    figures = result["figures"]
    assert figures["lora_modules"] > 0 and figures["output_change_max_abs"] > 0
    assert figures["back_is_base"] and figures["cached_is_same_engine"]
    assert "rebuild the UNet session" in (out / "result.md").read_text()
