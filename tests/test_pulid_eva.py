"""PuLID's photo path (reference/identity.md §3 "ID encoder path"): `sdrt export --pulid-eva --pulid-parsing` adds
pulid/eva (EVA02-CLIP's visual tower) and pulid/parsing (facexlib's BiSeNet) (export/extras/pulid_eva.py); a PuLID
request with a photo alone gets all three ID encoder inputs from it (runtime/conditioning/pulid_photo.py).

References: EVA = consisid-eva-clip 1.0.2's own eva_vit_model.py (PuLID's eva_clip package) and BiSeNet = facexlib
0.3.0's own parsing/bisenet.py, each executed from its installed files (`pip install --no-deps consisid-eva-clip==1.0.2
facexlib==0.3.0 einops`): both packages import torchvision in their __init__ (and eva_clip timm.layers, which imports
torchvision too), and no torchvision wheel imports against sdrt's torch 2.13 CPU build ("operator torchvision::nms does
not exist"). So the package __init__s are skipped, and while eva_vit_model loads, timm.layers' three helpers it
imports (trunc_normal_ — init only, to_2tuple, drop_path — identity at eval) and torchvision.ops.misc (imported by
eva_clip's utils.py, unused by the EVA tower) are stand-ins, removed again right after. The faces come from
insightface's FaceAnalysis on tests/test_faces.py's random stand-in SCRFD/ArcFace models. PuLID's get_id_embedding
(pipeline.py) is re-stated below on those numbers: facexlib's alignment on the BGR image, its img2tensor, the
BiSeNet parse, to_gray, torchvision 0.15's tensor resize (F.interpolate bicubic, no antialias) and normalize.

Tiny EVA: consisid-eva-clip's EVAVisionTransformer as its EVA02-CLIP-L-14-336 config builds it (336², patch 14, RoPE
from the 16² grid, SwiGLU, sub-LN, q/v biases) at width 64, 24 blocks, 2 heads, head 768 — the real 1280-wide
id_cond; a PuLID file whose mappings take 64-wide hidden states. BiSeNet: full size (its widths are fixed), random.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_faces import _analysis, _largest, _noise, write_detector, write_recogniser
from test_parity import to_uint8
from test_pulid import PRESET, PROMPTS, SIZE, RefIDEncoder, hack_unet

from sdrt.runtime.conditioning import pulid_photo
from sdrt.runtime.errors import UserError
from sdrt.runtime.fields import InvalidRequest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("insightface.app")
EVA_WIDTH = 64


# ---- the references, executed from their packages' files ----

def _from_files(package: str, module: str, stand_ins: dict):
    """`package.module` imported from the installed package's folder without running its __init__, `stand_ins`
    (module name → module) in sys.modules only while it loads; None when the package is not installed."""
    found = importlib.util.find_spec(package)
    if found is None:
        return None
    importlib.import_module("transformers")  # its import-time torchvision probe runs before any stand-in exists

    top = types.ModuleType(package)
    top.__path__ = list(found.submodule_search_locations)
    mods = {package: top, **stand_ins}
    for part in module.split(".")[:-1]:  # sub-packages, also without their __init__
        sub = types.ModuleType(f"{package}.{part}")
        sub.__path__ = [os.path.join(found.submodule_search_locations[0], part)]
        mods[sub.__name__] = sub
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        return importlib.import_module(f"{package}.{module}")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@functools.cache
def eva_clip():
    pytest.importorskip("einops")
    layers = types.ModuleType("timm.layers")
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.drop_path = lambda x, drop_prob=0.0, training=False: x
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    stand_ins = {"timm": types.ModuleType("timm"), "timm.layers": layers, "torchvision": types.ModuleType("torchvision"),
                 "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc}
    return _from_files("consisid_eva_clip", "eva_vit_model", stand_ins)


@functools.cache
def facexlib_bisenet():
    return _from_files("facexlib", "parsing.bisenet", {})


def reference_eva(seed: int = 0):
    """consisid-eva-clip's EVAVisionTransformer, EVA02-CLIP-L-14-336's config at width 64, 2 heads; random weights."""
    module = eva_clip()
    if module is None:
        pytest.skip("consisid-eva-clip is not installed (pip install --no-deps consisid-eva-clip==1.0.2 einops)")
    torch.manual_seed(seed)
    model = module.EVAVisionTransformer(
        img_size=336, patch_size=14, num_classes=768, use_mean_pooling=False, embed_dim=EVA_WIDTH, depth=24,
        num_heads=2, mlp_ratio=2.6667, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
        xattn=True, rope=True, pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True, subln=True)
    with torch.no_grad():  # biases, norms and the class token off their zero/one init: every term counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def eva_reference_outputs(model, pixels):
    with torch.no_grad():
        v, hidden = model(pixels, return_all_features=False, return_hidden=True, shuffle=False)
    return v / torch.norm(v, 2, 1, True), torch.stack(hidden, dim=1)  # get_id_embedding's normalisation


def reference_bisenet(seed: int = 0):
    """facexlib's BiSeNet(19) (else sdrt's re-statement, said in the skip-free path), random weights and statistics."""
    module = facexlib_bisenet()
    if module is None:
        from sdrt.export.extras.pulid_eva import BiSeNet as net_class
    else:
        net_class = functools.partial(module.BiSeNet, num_class=19)
    torch.manual_seed(seed)
    net = net_class()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn_like(p) * (2.0 / p[0].numel()) ** 0.5 if p.ndim > 1 else 1 + 0.1 * torch.randn_like(p))
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(1 + torch.rand_like(b))
    return net.eval()


def write_files(folder: Path, seed: int = 0) -> tuple[Path, Path, object, object]:
    """EVA02_CLIP_L_336_psz14_s6B.pt-shaped (the whole CLIP: visual.* and text.* keys) and parsing_bisenet.pth."""
    eva, parser = reference_eva(seed), reference_bisenet(seed)
    state = {f"visual.{k}": v for k, v in eva.state_dict().items()} | {"text.token_embedding.weight": torch.zeros(4, 2)}
    torch.save(state, folder / "EVA02_CLIP_L_336_psz14_s6B.pt")
    torch.save(parser.state_dict(), folder / "parsing_bisenet.pth")
    return folder / "EVA02_CLIP_L_336_psz14_s6B.pt", folder / "parsing_bisenet.pth", eva, parser


def write_pulid(model_folder: Path, path: Path, seed: int = 5, gain: float = 64.0) -> Path:
    """pulid_v1.bin for the tiny SDXL with mappings over 64-wide EVA states (tests/test_pulid.py's re-statement)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_folder / "unet")
    torch.manual_seed(seed)
    encoder = RefIDEncoder(context_dim=unet.config.cross_attention_dim, eva_width=EVA_WIDTH)
    layers = hack_unet(unet, "plain")
    state = {f"id_adapter.{k}": v for k, v in encoder.state_dict().items()}
    state |= {f"id_adapter_attn_layers.{k}": v * (gain if "id_to_v" in k else 1.0) for k, v in layers.state_dict().items()}
    torch.save(state, path)
    return path


# ---- PuLID's get_id_embedding re-stated (pipeline.py), on numbers given ----

FFHQ = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
                 [313.08905, 371.15118]])  # facexlib FaceRestoreHelper's face_template at face_size 512


def reference_crop(rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """facexlib's align_warp_face on the BGR image (as PuLID reads it), returned as RGB uint8."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    affine = cv2.estimateAffinePartial2D(kps, FFHQ, method=cv2.LMEDS)[0]
    face = cv2.warpAffine(bgr, affine, (512, 512), borderMode=cv2.BORDER_CONSTANT, borderValue=(135, 133, 132))
    return cv2.cvtColor(face, cv2.COLOR_BGR2RGB)


def reference_eva_input(crop_rgb: np.ndarray, parse) -> torch.Tensor:
    """img2tensor(bgr2rgb)/255 → BiSeNet(normalize ImageNet)[0] → argmax → bg classes white, else to_gray → resize 336
    bicubic (torchvision 0.15 tensor path) → normalize CLIP."""
    x = torch.from_numpy(crop_rgb.transpose(2, 0, 1).astype(np.float32))[None] / 255.0
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = parse((x - mean) / std).argmax(dim=1, keepdim=True)
    bg = sum(out == i for i in [0, 16, 18, 7, 8, 9, 14, 15]).bool()
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).repeat(1, 3, 1, 1)
    image = torch.where(bg, torch.ones_like(x), gray)
    image = torch.nn.functional.interpolate(image, size=[336, 336], mode="bicubic", align_corners=False, antialias=False)
    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return (image - clip_mean) / clip_std


def reference_inputs(models: Path, photo, eva, parser) -> dict:
    """The .npz a user would save from PuLID's get_id_embedding: embedding, eva_embedding, eva_hidden."""
    rgb = np.asarray(photo.convert("RGB"))
    face = _largest(_analysis(models, 640).get(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
    def parse(x):  # facexlib's BiSeNet returns (out, out16, out32); get_id_embedding takes [0]
        out = parser(x)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        pixels = reference_eva_input(reference_crop(rgb, face.kps.astype(np.float64)), parse)
        v, hidden = eva_reference_outputs(eva, pixels)
    return {"embedding": np.asarray(face.embedding, np.float32), "eva_embedding": v[0].numpy(),
            "eva_hidden": hidden[0].numpy()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pulid-face-models")
    write_detector(str(folder / "det.onnx"), -5.0)
    write_recogniser(str(folder / "rec.onnx"))
    return folder


def _stub_dir(record: dict, has=lambda name: True):
    return SimpleNamespace(manifest={"pulid": record, "components": {}}, has=has, path=None)


PHOTO_RECORD = {"eva": {"graph": "pulid/eva", "image_size": 336, "patches": 577, "mean": [0.48145466, 0.4578275,
                        0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
                "parsing": {"graph": "pulid/parsing", "size": 512, "classes": 19}}


# ---- default run ----

def test_photo_preprocessing_equals_get_id_embedding(models):
    """The face (insightface's largest), its facexlib alignment, the parse → white/gray image, the resize and CLIP's
    normalisation equal PuLID's steps re-stated on the same photo (a random logits map stands in for BiSeNet's)."""
    photo = _noise(0, 160)
    face = pulid_photo.read(photo, {"photo": PHOTO_RECORD}, _stub_dir({}), str(models))
    rgb = np.asarray(photo)
    ref = _largest(_analysis(models, 640).get(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
    assert np.array_equal(face.embedding, ref.embedding)
    crop = reference_crop(rgb, ref.kps.astype(np.float64))
    assert np.array_equal(face.crop, crop)
    small = np.asarray(_noise(2, 96))  # a face at the photo's edge: the crop reaches past it (facexlib's gray)
    kps = FFHQ * 96 / 512 + (40, 0) + np.random.default_rng(0).normal(0, 0.5, (5, 2))
    border = pulid_photo.align(small, kps)
    assert np.array_equal(border, reference_crop(small, kps)) and (border == (132, 133, 135)).all(axis=-1).mean() > 0.1
    logits = torch.randn(1, 19, 512, 512, generator=torch.Generator().manual_seed(0))
    ours = pulid_photo.eva_pixels(pulid_photo.features(face.crop, logits[0].numpy()), PHOTO_RECORD["eva"])
    theirs = reference_eva_input(crop, lambda x: logits)
    assert ours.shape == (1, 3, 336, 336) and torch.allclose(ours, theirs, atol=1e-5)
    parse_in = pulid_photo.parse_pixels(face.crop)
    x = torch.from_numpy(crop.transpose(2, 0, 1).astype(np.float32))[None] / 255.0
    assert torch.allclose(parse_in, (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                          / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), atol=1e-6)
    assert pulid_photo.read(_noise(1, 160), {"photo": PHOTO_RECORD}, _stub_dir({}), str(models)).digest != face.digest


def test_a_photo_alone_needs_the_photo_graphs_and_a_face(models):
    from sdrt.runtime.conditioning import pulid
    from sdrt.runtime.conditioning.kinds import Context
    from sdrt.runtime.request import Request

    record = {"face_dim": 512, "eva_dim": 768, "eva_layers": 5, "eva_width": EVA_WIDTH, "encoder": "pulid/encoder",
              "token_dim": 64, "version": "v1"}
    request = Request.of(prompt="a person", pulid_id={"embedding": _noise(0, 64)}, face_models=str(models))
    request = Request.from_dict(json.loads(json.dumps(request.to_dict(encode_images=True))))  # JSON: base64
    for manifest_record, has in ((record, lambda n: True), (record | {"photo": PHOTO_RECORD}, lambda n: n != "pulid/eva")):
        stub = SimpleNamespace(manifest={"pulid": manifest_record}, has=has)
        with pytest.raises(InvalidRequest, match="--pulid-eva .*--pulid-parsing") as e:
            pulid.validate(request, stub, Context(64, 64))
        assert e.value.field == "pulid_id" and "\n" not in str(e.value)
    from PIL import Image

    gray = Request.of(prompt="a person", pulid_id={"embedding": Image.new("RGB", (96, 96), (128,) * 3)},
                      face_models=str(models))
    stub = SimpleNamespace(manifest={"pulid": record | {"photo": PHOTO_RECORD}, "components": {}}, has=lambda n: True)
    with pytest.raises(InvalidRequest, match="no face found") as e:
        pulid.validate(gray, stub, Context(64, 64))
    assert e.value.field == "pulid_id.embedding"
    use = pulid.validate(request, stub, Context(64, 64))
    assert use.photo is not None and use.id_cond is None and use.photo.crop.shape == (512, 512, 3)


def test_cli_pulid_photo_alone_is_the_whole_identity(tmp_path):
    from sdrt.cli.generate import RunOptions, build_request

    _noise(0, 32).save(tmp_path / "photo.png")
    request = build_request(RunOptions(engine_dir=tmp_path, prompts=("a person",), face_models=tmp_path,
                                       pulid_photo=tmp_path / "photo.png", pulid_scale=0.6))
    assert set(request.pulid.pulid_id) == {"embedding"} and request.pulid.pulid_scale == 0.6


def test_export_refusals(tmp_path):
    """Each bad --pulid-eva / --pulid-parsing is one line, before any model loads."""
    from sdrt.export.extras import pulid, pulid_eva

    with pytest.raises(UserError, match="give --pulid FILE too") as e:
        pulid.parse(None, str(tmp_path / "eva.pt"), str(tmp_path / "p.pth"))
    assert "\n" not in str(e.value)
    torch.save({"visual.trunk.blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, tmp_path / "open_clip.pt")
    torch.save({"cp.resnet.conv1.weight": torch.zeros(1), "conv_out.conv_out.weight": torch.zeros(19, 1)},
               tmp_path / "p.pth")
    torch.save({"visual.blocks.0.attn.q_proj.weight": torch.zeros(2, 2)}, tmp_path / "eva.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    for text, eva, parsing in (("needs both", str(tmp_path / "eva.pt"), None),
                               ("no such file", str(tmp_path / "none.pt"), str(tmp_path / "p.pth")),
                               ("open_clip", str(tmp_path / "open_clip.pt"), str(tmp_path / "p.pth")),
                               ("no EVA02-CLIP visual tower", str(tmp_path / "other.pth"), str(tmp_path / "p.pth"))):
        with pytest.raises(UserError, match=text) as e:
            pulid_eva.parse(eva, parsing)
        assert "\n" not in str(e.value)


# ---- slow: the graphs against their references, and whole requests ----

@pytest.fixture(scope="module")
def photo_engine(exported, tiny_pipeline, tmp_path_factory, models):
    """(engine dir with PuLID and its photo path, Pipeline over it, the torch EVA and BiSeNet written into it)."""
    from sdrt.export.exporter import add_controlnets
    from sdrt.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("pulid-photo")
    eva_file, parsing_file, eva, parser = write_files(root)
    engine = root / "engine"
    shutil.copytree(exported("sdxl", "fp32"), engine, copy_function=os.link)
    add_controlnets(engine, (), pulid=str(write_pulid(tiny_pipeline("sdxl"), root / "pulid_v1.bin")),
                    pulid_eva=str(eva_file), pulid_parsing=str(parsing_file))
    return engine, Pipeline.load(engine, backend="ort-cpu", face_models=models), eva, parser


@pytest.mark.slow
def test_eva_and_parsing_graphs_equal_their_references(photo_engine):
    import onnxruntime as ort

    engine, _, eva, parser = photo_engine
    manifest = json.loads((engine / "manifest.json").read_text())
    photo = manifest["pulid"]["photo"]
    assert photo["eva"]["graph"] == "pulid/eva" and photo["eva"]["patches"] == 577
    assert {"pulid/eva", "pulid/parsing", "pulid/encoder", "unet_pulid"} <= set(manifest["components"])
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(manifest, json.loads((Path(__file__).parents[1] / "export" / "manifest.schema.json").read_text()))
    g = torch.Generator().manual_seed(9)
    pixels = torch.randn(2, 3, 336, 336, generator=g)
    session = ort.InferenceSession(str(engine / "pulid" / "eva" / "model.onnx"), providers=["CPUExecutionProvider"])
    v, hidden = session.run(["eva_embedding", "eva_hidden"], {"pixel_values": pixels.numpy()})
    rv, rh = eva_reference_outputs(eva, pixels)
    assert hidden.shape == (2, 5, 577, EVA_WIDTH)
    ev, eh = np.abs(v - rv.numpy()).max(), np.abs(hidden - rh.numpy()).max() / np.abs(rh.numpy()).max()
    print(f"pulid/eva vs consisid-eva-clip: embedding max |Δ| {ev:.2e}, hidden states max relative |Δ| {eh:.2e}")
    assert ev < 1e-4 and eh < 1e-5
    x = torch.randn(1, 3, 512, 512, generator=g)
    session = ort.InferenceSession(str(engine / "pulid" / "parsing" / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        ref = parser(x)
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    which = "facexlib's BiSeNet" if facexlib_bisenet() is not None else "sdrt's re-statement (facexlib absent)"
    err = np.abs(logits - ref).max() / np.abs(ref).max()
    print(f"pulid/parsing vs {which}: max relative |Δ| {err:.2e}, argmax differs at "
          f"{int((logits.argmax(1) != ref.argmax(1)).sum())} of {512 * 512} pixels")
    assert err < 1e-5 and (logits.argmax(1) != ref.argmax(1)).mean() < 1e-4


@pytest.mark.slow
def test_a_photo_equals_the_numbers_of_pulids_own_path(photo_engine, models, tmp_path):
    """A request with the photo alone makes the image that the .npz of PuLID's steps (insightface, facexlib's
    alignment and BiSeNet, eva_clip's tower in torch) makes; another photo makes another image; a second request
    with the same photo runs no graph (the identity's tokens are cached)."""
    from sdrt.runtime.conditioning import pulid
    from sdrt.runtime.pipeline import Request

    _, pipe, eva, parser = photo_engine
    common = dict(**PROMPTS, seed=4, batch=2, **PRESET, **SIZE)
    photo, other = _noise(0, 160), _noise(3, 160)
    given = reference_inputs(models, photo, eva, parser)
    np.savez(tmp_path / "face.npz", **given)
    from_numbers = to_uint8(pipe.generate(Request.of(**common, pulid_id=dict(np.load(tmp_path / "face.npz")))))
    from_photo = to_uint8(pipe.generate(Request.of(**common, pulid_id={"embedding": photo})))
    diff = int(np.abs(from_photo.astype(int) - from_numbers.astype(int)).max())
    print(f"pulid photo path vs PuLID's own numbers (.npz): max pixel difference {diff}/255")
    assert diff <= 1
    misses = pulid.CACHE.misses
    again = to_uint8(pipe.generate(Request.of(**common, pulid_id={"embedding": photo})))
    assert pulid.CACHE.misses == misses and np.array_equal(again, from_photo)
    changed = to_uint8(pipe.generate(Request.of(**common, pulid_id={"embedding": other})))
    moved = int(np.abs(changed.astype(int) - from_photo.astype(int)).max())
    print(f"pulid photo path: another photo moves pixels by {moved}/255")
    assert moved > 8


@pytest.mark.slow
def test_cli_pulid_photo_alone_equals_the_npz(photo_engine, models, tmp_path):
    """`sdrt run --pulid-photo PHOTO --face-models DIR` (no --pulid-id) and `--pulid-id face.npz` of PuLID's own
    steps: the same PNG within 1/255."""
    from PIL import Image

    from conftest import run_sdrt

    engine, _, eva, parser = photo_engine
    photo = _noise(0, 160)
    photo.save(tmp_path / "photo.png")
    np.savez(tmp_path / "face.npz", **reference_inputs(models, photo, eva, parser))
    common = ("run", str(engine), PROMPTS["prompt"], "--negative-prompt", PROMPTS["negative_prompt"], "--steps", "2",
              "--width", "48", "--height", "32", "--seed", "3", "--pulid-mode", "style")
    a = run_sdrt(*common, "--pulid-photo", str(tmp_path / "photo.png"), "--face-models", str(models),
                 "-o", str(tmp_path / "a.png"))
    b = run_sdrt(*common, "--pulid-id", str(tmp_path / "face.npz"), "-o", str(tmp_path / "b.png"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    diff = np.abs(np.asarray(Image.open(tmp_path / "a.png")).astype(int)
                  - np.asarray(Image.open(tmp_path / "b.png")).astype(int)).max()
    assert diff <= 1, diff


@pytest.mark.slow
def test_cli_export_photo_files_without_pulid_is_one_line(tiny_pipeline, tmp_path):
    from conftest import run_sdrt

    result = run_sdrt("export", str(tiny_pipeline("sdxl")), "--pulid-eva", str(tmp_path / "eva.pt"),
                      "--pulid-parsing", str(tmp_path / "p.pth"), "-o", str(tmp_path / "out"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "--pulid FILE" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_photo_over_http(photo_engine):
    """The official openai SDK (extra_body `pulid_id: {"embedding": base64}`) and an AUTOMATIC1111 body
    (`alwayson_scripts.pulid`) with the photo alone against `sdrt serve`: the Python API's pixels."""
    import base64
    import io

    import httpx
    from PIL import Image

    openai = pytest.importorskip("openai")
    from conftest import LoopbackServer

    from sdrt.runtime.pipeline import Request

    engine, pipe, _, _ = photo_engine
    photo = _noise(0, 160)
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    want = np.asarray(pipe.generate(Request.of(**PROMPTS, steps=4, seed=5, guidance=1.2, sampler="dpmpp_2m", **SIZE,
                                               pulid_id={"embedding": photo}))[0])
    server = LoopbackServer(engine, pipe, model_name="tiny-sdxl")
    try:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        extra = {"steps": 4, "seed": 5, "guidance_scale": 1.2, "sampler": "dpmpp_2m",
                 "negative_prompt": PROMPTS["negative_prompt"], "pulid_id": {"embedding": b64}}
        answer = sdk.images.generate(prompt=PROMPTS["prompt"], size="48x32", extra_body=extra)
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB"))
        assert np.array_equal(got, want)
        body = {"prompt": PROMPTS["prompt"], "negative_prompt": PROMPTS["negative_prompt"], "steps": 4, "seed": 5,
                "cfg_scale": 1.2, "sampler_name": "DPM++ 2M", "scheduler": "Automatic", **SIZE,
                "alwayson_scripts": {"pulid": {"args": [{"pulid_id": {"embedding": b64}}]}}}
        answer = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).convert("RGB"))
        assert np.array_equal(got, want)
    finally:
        server.stop()
