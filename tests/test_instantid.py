"""InstantID (reference/identity.md §4): IdentityNet + the face Resampler + the adapter exported into the tiny SDXL's
engine directory (export/extras/instantid.py), equal to InstantID's denoising re-stated over diffusers — the
ControlNet called with the face tokens F = Resampler(e) (Resampler(0) for the negative) as its context for both
guidance halves, the UNet with diffusers' IP-Adapter processors loaded from InstantID's own ip-adapter.bin
(load_ip_adapter, image_encoder_folder=None) fed the embedding as ip_adapter_image_embeds — and the bad inputs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_sdrt
from test_parity import assert_same_images, diffusers_scheduler, generators, to_uint8

from sdrt.export.exporter import ExportConfig, add_controlnets, export
from sdrt.export.models.tiny import FACEID_WIDTH, write_tiny_instantid
from sdrt.runtime.conditioning import instantid
from sdrt.runtime.errors import UserError
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.loader import open_dir
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.validate import validate

SIZE = dict(width=48, height=32)
KPS = [[15.0, 11.0], [33.0, 12.0], [24.0, 18.0], [17.0, 25.0], [31.0, 25.0]]  # output pixels: eyes, nose, mouth


def _face(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(FACEID_WIDTH) * 4).astype(np.float32)  # raw: not unit norm


@pytest.fixture(scope="module")
def iid(exported, tiny_pipeline, tmp_path_factory):
    """(engine dir with InstantID added, InstantID's folder, Pipeline over it)."""
    root = tmp_path_factory.mktemp("instantid")
    engine = root / "engine"
    shutil.copytree(exported("sdxl", "fp32"), engine, copy_function=os.link)
    folder = write_tiny_instantid(tiny_pipeline("sdxl"), root / "InstantID", seed=6)
    add_controlnets(engine, (), instantid=str(folder))
    return engine, folder, Pipeline.load(engine, backend="ort-cpu")


BOX = [9.6, 5.2, 37.9, 27.0]  # a face box in output pixels (InstantID's app.py truncates the corners with int())


class _RegionIp:
    """InstantID's region control re-stated (ip_adapter/attention_processor.py IPAttnProcessor2_0): at an attention
    of N tokens, ratio = √(H·W / N), the mask M nearest-resized by scale_factor 1/ratio and flattened [1, N, 1];
    ip · mask, then hidden + scale · ip. Set as a diffusers IP processor's scale, whose branch adds `scale * ip`."""

    def __init__(self, scale: float, region):
        self.scale, self.region = scale, region

    def __mul__(self, ip):
        import torch.nn.functional as F

        h, w = self.region.shape
        ratio = (h * w / ip.shape[1]) ** 0.5
        mask = F.interpolate(self.region[None, None], scale_factor=1 / ratio, mode="nearest").reshape([1, -1, 1])
        return self.scale * (ip * mask)

    def __eq__(self, other):  # diffusers skips a branch whose scale == 0
        return False


def _region(box, width: int, height: int):
    """InstantID's app.py control_mask (channel 0 / 255): zeros at the output size, 1 in [y1:y2, x1:x2]."""
    import torch

    x1, y1, x2, y2 = (int(v) for v in box)
    region = torch.zeros(height, width)
    region[y1:y2, x1:x2] = 1.0
    return region


def _reference(tiny_pipeline, folder, others=()):
    """diffusers' SDXL ControlNet pipeline with InstantID's adapter loaded, IdentityNet first of the nets (as
    InstantID's _full pipeline); returns (pipe, run(face, kps image, …)). `others`: (ControlNet folder, image,
    scale) of further nets, which see the text. run(…, box=[x1, y1, x2, y2]) adds the _full pipeline's region
    control ("enhance non-face region"): IdentityNet's residuals × M bilinear-resized to (H // s, W // s), s the
    residual's pixel stride (InstantID's list 8, 8, 8, 16, 16, 16, 32, 32, 32 for SDXL; the mid one × the last),
    and the adapter's branch × M nearest-resized (_RegionIp)."""
    import diffusers
    import torch
    import torch.nn.functional as F
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    net = diffusers.ControlNetModel.from_pretrained(folder / "ControlNetModel")
    nets = [net] + [diffusers.ControlNetModel.from_pretrained(f) for f, _, _ in others]
    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(tiny_pipeline("sdxl"),
                                                                         controlnet=nets if others else net)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter.bin", image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler(pipe, "euler")
    resampler = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    forward = net.forward

    def run(face, image, batch, seed, identitynet_scale=0.8, ip_scale=0.8, guidance=5.0, steps=3, box=None):
        e = torch.from_numpy(face).reshape(1, 1, 1, -1)
        with torch.no_grad():  # InstantID's _encode_prompt_image_emb: [Resampler(0) ‖ Resampler(e)], per image
            tokens = resampler(torch.cat([torch.zeros_like(e), e])[:, 0])
        context = torch.cat([tokens[:1].repeat(batch, 1, 1), tokens[1:].repeat(batch, 1, 1)])
        region = _region(box, SIZE["width"], SIZE["height"]) if box is not None else None

        def identitynet(*a, **k):  # IdentityNet sees F; with a box, its residuals × M (bilinear)
            down, mid = forward(*a, **(k | {"encoder_hidden_states": context, "return_dict": False}))
            if region is None:
                return down, mid
            h, w = region.shape
            masks = [F.interpolate(region[None, None], (h // (h // r.shape[-2]), w // (w // r.shape[-1])),
                                   mode="bilinear") for r in down]
            return [r * m for r, m in zip(down, masks)], mid * masks[-1]

        net.forward = identitynet
        pipe.set_ip_adapter_scale(ip_scale)
        if region is not None:
            for p in pipe.unet.attn_processors.values():
                if isinstance(p, IPAdapterAttnProcessor2_0):
                    p.scale = [_RegionIp(ip_scale, region)]
        try:
            images = [image, *(i for _, i, _ in others)] if others else image
            scales = [identitynet_scale, *(s for _, _, s in others)] if others else identitynet_scale
            return pipe("a photo of a person", image=images, controlnet_conditioning_scale=scales,
                        ip_adapter_image_embeds=[torch.cat([torch.zeros_like(e), e])], num_inference_steps=steps,
                        guidance_scale=guidance, num_images_per_prompt=batch, generator=generators(seed, batch),
                        output_type="np", **SIZE).images
        finally:
            net.forward = forward

    return pipe, run


def test_instantid_equals_its_algorithm_over_diffusers(iid, tiny_pipeline):
    engine, folder, pipe = iid
    face, other = _face(1), _face(2)
    kps_image = instantid.draw_kps(np.array(KPS), SIZE["width"], SIZE["height"])
    _, theirs = _reference(tiny_pipeline, folder)
    common = dict(prompt="a photo of a person", steps=3, sampler="euler", seed=4, batch=2, guidance=5.0, **SIZE)
    ours = pipe.generate(Request.of(**common, instantid_face=face, instantid_kps=KPS))
    assert_same_images("instantid sdxl batch 2, scales 0.8/0.8", ours, theirs(face, kps_image, 2, 4))
    misses = instantid.CACHE.misses
    again = pipe.generate(Request.of(**common, instantid_face=face[None], instantid_kps=KPS))
    assert instantid.CACHE.misses == misses  # the same face (and the negative): no Resampler run
    assert np.array_equal(to_uint8(again), to_uint8(ours))
    plain = to_uint8(pipe.generate(Request.of(**common))).astype(int)
    changed = to_uint8(pipe.generate(Request.of(**common, instantid_face=other, instantid_kps=KPS))).astype(int)
    assert instantid.CACHE.misses == misses + 1
    assert np.abs(to_uint8(ours).astype(int) - plain).max() > 8  # InstantID shows
    assert np.abs(to_uint8(ours).astype(int) - changed).max() > 8  # and so does the identity


@pytest.mark.slow
def test_enhance_face_region_equals_instantids_full_pipeline(iid, tiny_pipeline):
    """The demo's "enhance non-face region" (the _full pipeline's region control) against its re-statement over
    diffusers, batch 2 with per-image generators; the mask moves the image; a box over the whole image is exactly
    the unmasked run (a mask of ones changes nothing)."""
    engine, folder, pipe = iid
    face = _face(1)
    kps_image = instantid.draw_kps(np.array(KPS), SIZE["width"], SIZE["height"])
    _, theirs = _reference(tiny_pipeline, folder)
    common = dict(prompt="a photo of a person", steps=3, sampler="euler", seed=4, batch=2, guidance=5.0,
                  instantid_face=face, instantid_kps=KPS, **SIZE)
    ours = pipe.generate(Request.of(**common, enhance_face_region=True, instantid_bbox=BOX))
    assert_same_images("instantid sdxl batch 2, enhance_face_region", ours, theirs(face, kps_image, 2, 4, box=BOX))
    plain = to_uint8(pipe.generate(Request.of(**common))).astype(int)
    moved = np.abs(to_uint8(ours).astype(int) - plain).max()
    print(f"enhance_face_region: max pixel difference from the unmasked run {moved}/255")
    assert moved > 8, moved  # the mask shows, well past 1/255
    whole = pipe.generate(Request.of(**common, enhance_face_region=True, instantid_bbox=[0, 0, 48, 32]))
    assert np.array_equal(to_uint8(whole).astype(int), plain)


@pytest.mark.slow
def test_instantid_with_a_lora_at_load_equals_diffusers(iid, tiny_pipeline, tmp_path):
    """A LoRA at load on top of InstantID's graph (unet_controlnet_ip takes LoRAs through the UNet's weights map)
    against the same reference with the LoRA fused into diffusers' UNet (load_lora_weights + fuse_lora)."""
    from test_lora import make_layers, write_diffusers

    engine, folder, pipe = iid
    lora = write_diffusers(tmp_path / "lora.safetensors",
                           make_layers(tiny_pipeline("sdxl"), {"unet": (4, 0.03)}, seed=12))
    reference, theirs = _reference(tiny_pipeline, folder)
    reference.load_lora_weights(str(lora))
    reference.fuse_lora(lora_scale=0.8)
    face = _face(1)
    kps_image = instantid.draw_kps(np.array(KPS), SIZE["width"], SIZE["height"])
    common = dict(prompt="a photo of a person", steps=3, sampler="euler", seed=4, batch=2, guidance=5.0, **SIZE)
    ours = pipe.generate(Request.of(**common, instantid_face=face, instantid_kps=KPS, loras=[(str(lora), 0.8)]))
    assert_same_images("instantid sdxl batch 2 + a LoRA 0.8", ours, theirs(face, kps_image, 2, 4))
    without = pipe.generate(Request.of(**common, instantid_face=face, instantid_kps=KPS))
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(without).astype(int)).max() > 8  # the LoRA shows


@pytest.mark.slow
def test_instantid_with_a_second_controlnet_and_other_scales_equals_diffusers(conditioned, tiny_pipeline, tmp_path):
    """InstantID's multi-ControlNet (_full pipeline): IdentityNet on F plus a text-conditioned ControlNet, residuals
    summed; other scales; the keypoint image given directly instead of the points."""
    base, parts = conditioned("sdxl")
    engine = tmp_path / "engine"
    shutil.copytree(base, engine, copy_function=os.link)
    folder = write_tiny_instantid(tiny_pipeline("sdxl"), tmp_path / "InstantID", seed=6)
    add_controlnets(engine, (), instantid=str(folder))
    pipe = Pipeline.load(engine, backend="ort-cpu")
    face, kps_image = _face(3), instantid.draw_kps(np.array(KPS), SIZE["width"], SIZE["height"])
    control = Image.fromarray((np.random.default_rng(9).random((64, 64, 3)) * 255).astype("uint8"))
    _, theirs = _reference(tiny_pipeline, folder, others=[(parts["controlnets"]["xl"], control, 0.7)])
    common = dict(prompt="a photo of a person", steps=3, sampler="euler", seed=8, batch=2, guidance=5.0, **SIZE)
    ours = pipe.generate(Request.of(**common, instantid_face=face, instantid_kps=kps_image, identitynet_scale=0.5,
                                    instantid_ip_scale=1.2, controls=(("xl", control, 0.7),)))
    assert_same_images("instantid sdxl + a second ControlNet, scales 0.5/1.2", ours,
                       theirs(face, kps_image, 2, 8, identitynet_scale=0.5, ip_scale=1.2))
    masked = pipe.generate(Request.of(**common, instantid_face=face, instantid_kps=kps_image, identitynet_scale=0.5,
                                      instantid_ip_scale=1.2, controls=(("xl", control, 0.7),),
                                      enhance_face_region=True, instantid_bbox=BOX))  # IdentityNet's alone masked
    assert_same_images("instantid sdxl + a second ControlNet, enhance_face_region", masked,
                       theirs(face, kps_image, 2, 8, identitynet_scale=0.5, ip_scale=1.2, box=BOX))


@pytest.mark.slow
def test_controlnet_and_ip_adapter_without_instantid_in_an_instantid_directory(conditioned, tiny_pipeline, tmp_path):
    """A ControlNet + IP-Adapter request (no InstantID) on the unet_controlnet_ip that also holds InstantID's adapter
    and its ip_mask: the mask is fed ones and InstantID's branch scale 0, so the image is the one of the directory
    without InstantID."""
    base, parts = conditioned("sdxl", ip=True)
    engine = tmp_path / "engine"
    shutil.copytree(base, engine, copy_function=os.link)
    add_controlnets(engine, (), instantid=str(write_tiny_instantid(tiny_pipeline("sdxl"), tmp_path / "iid", seed=6)))
    assert instantid.has_mask(json.loads((engine / "manifest.json").read_text()), "unet_controlnet_ip")
    control = Image.fromarray((np.random.default_rng(9).random((64, 64, 3)) * 255).astype("uint8"))
    image = Image.fromarray((np.random.default_rng(3).random((40, 40, 3)) * 255).astype("uint8"))
    request = Request.of(prompt="a photo", steps=3, sampler="euler", seed=8, batch=2, guidance=5.0, ip_image=image,
                         ip_scale=0.7, controls=(("xl", control, 0.7),), **SIZE)
    assert_same_images("controlnet + ip-adapter beside InstantID's masked adapter",
                       Pipeline.load(engine, backend="ort-cpu").generate(request),
                       Pipeline.load(base, backend="ort-cpu").generate(request))


def test_export_records_instantid_and_its_graphs(iid):
    engine, folder, _ = iid
    manifest = json.loads((engine / "manifest.json").read_text())
    record = manifest["instantid"]
    assert (record["embed_dim"], record["tokens"]) == (FACEID_WIDTH, 16)
    assert [a["kind"] for a in manifest["ip_adapter"]["adapters"]] == ["instantid"]
    components = manifest["components"]
    assert {"instantid/identitynet", "instantid/proj", "unet_controlnet_ip"} <= set(components)
    assert "image_encoder" not in components and "unet_ip" not in components  # no image prompt without an adapter
    context = next(i for i in components["instantid/identitynet"]["inputs"] if i["name"] == "encoder_hidden_states")
    assert not isinstance(context["shape"][1], int)  # 16 face tokens, not 77: the sequence axis is dynamic
    mask = next(i for i in components["unet_controlnet_ip"]["inputs"] if i["name"] == "ip_mask")  # the region mask
    assert mask["shape"][1] == 1 and not any(isinstance(d, int) for d in mask["shape"][::2] + mask["shape"][3:])
    with pytest.raises(InvalidRequest) as e:  # InstantID's adapter is not an image-prompt adapter
        validate(Request.of(prompt="x", ip_image=Image.new("RGB", (32, 32))), open_dir(engine))
    assert e.value.field == "ip_image"


def test_draw_kps_draws_instantids_bars_and_dots():
    pytest.importorskip("cv2")
    kps = np.array([[20.0, 20.0], [60.0, 20.0], [40.0, 40.0], [25.0, 60.0], [55.0, 60.0]])
    image = np.asarray(instantid.draw_kps(kps, 80, 72))
    assert image.shape == (72, 80, 3)
    for (x, y), colour in zip(kps.astype(int), instantid.COLOURS):  # dots at full colour
        assert tuple(image[y, x]) == colour
    # the left-eye bar, halfway between the dot edges, in red × 0.6; the background black
    assert tuple(image[30, 30]) == (153, 0, 0) and tuple(image[5, 5]) == (0, 0, 0)


def test_bad_instantid_requests(iid, exported):
    engine = open_dir(iid[0])
    common = dict(prompt="a person", steps=2, **SIZE)
    face = _face(1)
    cases = [(dict(instantid_face=face[:5], instantid_kps=KPS), "instantid_face", r"\[24\] or \[1, 24\]"),
             (dict(instantid_face=[float("nan")] * FACEID_WIDTH, instantid_kps=KPS), "instantid_face", "finite"),
             (dict(instantid_face="abc", instantid_kps=KPS), "instantid_face", "numbers"),
             (dict(instantid_kps=KPS), "instantid_face", "is required"),
             (dict(instantid_face=face), "instantid_kps", "is required"),
             (dict(instantid_face=face, instantid_kps=KPS[:3]), "instantid_kps", r"5 keypoints"),
             (dict(instantid_face=face, instantid_kps=KPS, identitynet_scale="x"), "identitynet_scale", "number"),
             (dict(instantid_face=face, instantid_kps=KPS, instantid_ip_scale=float("inf")), "instantid_ip_scale",
              "finite"),
             (dict(instantid_face=face, instantid_kps=KPS, enhance_face_region="yes"), "enhance_face_region",
              "true or false"),
             (dict(instantid_face=face, instantid_kps=KPS, enhance_face_region=True), "instantid_bbox", "is required"),
             (dict(instantid_face=face, instantid_kps=KPS, instantid_bbox=BOX), "instantid_bbox",
              "enhance_face_region true"),
             (dict(enhance_face_region=True), "enhance_face_region", "InstantID option"),
             *((dict(instantid_face=face, instantid_kps=KPS, enhance_face_region=True, instantid_bbox=box),
                "instantid_bbox", text) for box, text in (([1, 2, 3], "one box"), ("abc", "numbers"),
                                                          ([60, 40, 70, 50], "inside"), ([30, 5, 10, 20], "x1 < x2"),
                                                          ([1, 2, float("nan"), 4], "finite")))]
    for extra, field, text in cases:
        with pytest.raises(InvalidRequest, match=text) as e:
            validate(Request.of(**common, **extra), engine)
        assert e.value.field == field, extra
    with pytest.raises(InvalidRequest, match="no InstantID") as e:
        validate(Request.of(**common, instantid_face=face, instantid_kps=KPS), open_dir(exported("sdxl", "fp32")))
    request = Request.of(**common, instantid_face=face, instantid_kps=KPS)  # plain JSON both ways
    again = Request.from_dict(json.loads(json.dumps(request.to_dict(encode_images=True))))
    assert np.array_equal(validate(again, engine).instantid.face, face)
    boxed = Request.of(**common, instantid_face=face, instantid_kps=KPS, enhance_face_region=True,
                       instantid_bbox=np.array([-4.0, 5.2, 37.9, 40.0]))  # int() per corner, clipped to the image
    again = Request.from_dict(json.loads(json.dumps(boxed.to_dict(encode_images=True))))
    assert validate(again, engine).instantid.bbox == (0, 5, 37, 32)
    assert validate(request, engine).instantid.bbox is None


def test_enhance_face_region_takes_the_photos_face_box(iid, monkeypatch):
    """A face photo without keypoints: its face's box (insightface's bbox on the resized photo, faces.py), scaled
    to the output size as its keypoint image is; with keypoints given, the box must be given too."""
    from sdrt.runtime.conditioning import faces

    found = faces.Face(_face(1), np.array(KPS, dtype=np.float32) * 2, np.array([19.5, 10.9, 75.2, 54.0], np.float32),
                       (96, 64), 640)
    monkeypatch.setattr(faces, "read", lambda *a: found)  # insightface's own reading: tests/test_faces.py
    common = dict(prompt="a person", steps=2, **SIZE, instantid_face=Image.new("RGB", (96, 64)),
                  enhance_face_region=True)
    use = validate(Request.of(**common), open_dir(iid[0])).instantid
    assert use.bbox == (9, 5, 37, 27)  # (19.5, 10.9, 75.2, 54.0) × 48/96, then int()
    with pytest.raises(InvalidRequest, match="come from the photo") as e:
        validate(Request.of(**common, instantid_kps=KPS), open_dir(iid[0]))
    assert e.value.field == "instantid_bbox"


def test_enhance_face_region_refused_on_an_older_export(iid, monkeypatch):
    monkeypatch.setattr(instantid, "has_mask", lambda manifest, graph: False)  # unet_controlnet_ip without ip_mask
    with pytest.raises(InvalidRequest, match="export it again") as e:
        validate(Request.of(prompt="a person", steps=2, **SIZE, instantid_face=_face(1), instantid_kps=KPS,
                            enhance_face_region=True, instantid_bbox=BOX), open_dir(iid[0]))
    assert e.value.field == "enhance_face_region"


def test_export_refusals(tiny_pipeline, tmp_path, iid):
    folder = iid[1]
    with pytest.raises(UserError, match="no such folder"):
        export(ExportConfig(model=str(tiny_pipeline("sdxl")), output=tmp_path / "a", instantid=str(tmp_path / "none")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="ControlNetModel"):
        export(ExportConfig(model=str(tiny_pipeline("sdxl")), output=tmp_path / "a", instantid=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="SDXL-only"):
        export(ExportConfig(model=str(tiny_pipeline("sd15")), output=tmp_path / "b", instantid=str(folder)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_instantid_errors_are_one_line(iid, tmp_path):
    engine = iid[0]
    np.save(tmp_path / "face.npy", _face(1)[:7])
    np.save(tmp_path / "kps.npy", np.array(KPS))
    result = run_sdrt("run", str(engine), "a person", "--steps", "1", "--width", "48", "--height", "32",
                      "--instantid-face", str(tmp_path / "face.npy"), "--instantid-kps", str(tmp_path / "kps.npy"),
                      "-o", str(tmp_path / "out.png"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--instantid-face" in lines[0] and "[24]" in lines[0], result.stderr
    np.save(tmp_path / "face.npy", _face(1))
    result = run_sdrt("run", str(engine), "a person", "--steps", "1", "--width", "48", "--height", "32",
                      "--instantid-face", str(tmp_path / "face.npy"), "--instantid-kps", str(tmp_path / "kps.npy"),
                      "--enhance-face-region", "--instantid-bbox", "4,3,40", "-o", str(tmp_path / "out.png"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--instantid-bbox" in lines[0] and "one box" in lines[0], result.stderr
