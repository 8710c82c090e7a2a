"""TensorRT logic that runs without TensorRT: profiles, input shapes, plan keys, selection, `sdrt build --plan`.

Nothing here builds or runs a plan; the GPU tests (test_gpu.py) do that where TensorRT is importable.
"""

from __future__ import annotations

import importlib.util

import pytest

from conftest import run_sdrt
from sdrt.engines import trt_dir
from sdrt.engines import trt_profiles as tp
from sdrt.runtime.errors import UserError


def test_resolution_and_range_parsing():
    assert tp.parse_resolution("1216x832", 64) == (832, 1216)
    assert tp.parse_range("512-1024", "size", 64) == tp.Range(512, 768, 1024)
    assert tp.parse_range("4", "batch") == tp.Range(4, 4, 4)
    with pytest.raises(UserError, match="multiples of 64"):
        tp.parse_resolution("1000x1000", 64)
    with pytest.raises(UserError, match="WIDTHxHEIGHT"):
        tp.parse_resolution("big", 8)
    with pytest.raises(UserError, match="MIN <= MAX"):
        tp.parse_range("1024-512", "size", 64)
    with pytest.raises(UserError, match="at least one"):
        tp.profiles([], None, "1", True, 64)


def test_profiles_static_and_dynamic():
    static, dynamic = tp.profiles(["1024x1024"], "512-1024", "1-4", False, 64)
    assert static.static is False  # batch 1-4 is a range
    assert static.name() == "b1-4_h1024_w1024_nocfg"
    assert dynamic.height == tp.Range(512, 768, 1024)
    only = tp.profiles(["832x1216"], None, "1", True, 64)[0]
    assert only.static and only.name() == "b1_h1216_w832_cfg"
    assert only.covers(1, 1216, 832, True) and not only.covers(1, 1216, 832, False)


def test_unet_batch_doubles_under_guidance_and_latents_scale():
    inputs = {"sample": ["batch_size", 4, "height", "width"], "timestep": [],
              "encoder_hidden_states": ["batch_size", "sequence_length", 2048],
              "text_embeds": ["batch_size", 1280], "time_ids": ["batch_size", 6]}
    profile = tp.profiles(["1024x768"], None, "1-2", True, 64)[0]
    shapes = tp.input_shapes("unet", inputs, profile, 8)
    assert shapes["sample"] == ((2, 4, 96, 128), (2, 4, 96, 128), (4, 4, 96, 128))
    assert shapes["encoder_hidden_states"][2] == (4, 77, 2048)
    assert shapes["timestep"] == ((), (), ())
    no_cfg = tp.profiles(["1024x1024"], None, "1", False, 64)[0]
    assert tp.input_shapes("unet", inputs, no_cfg, 8)["sample"][1] == (1, 4, 128, 128)
    vae = tp.input_shapes("vae_decoder", {"latent_sample": ["batch_size", 4, "latent_height", "latent_width"]},
                          profile, 8)
    assert vae["latent_sample"][2] == (2, 4, 96, 128)  # the VAE decodes images, not the CFG batch
    enc = tp.input_shapes("vae_encoder", {"sample": ["batch_size", 3, "sample_height", "sample_width"]}, profile, 8)
    assert enc["sample"][0] == (1, 3, 768, 1024)
    text = tp.input_shapes("text_encoder", {"input_ids": ["batch_size", "sequence_length"]}, profile, 8)
    assert text["input_ids"] == ((1, 77), (1, 77), (2, 77))  # cond and uncond prompts are separate calls


UNET_INPUTS = {"sample": ["batch_size", 4, "height", "width"], "timestep": [],
               "encoder_hidden_states": ["batch_size", "sequence_length", 2048],
               "text_embeds": ["batch_size", 1280], "time_ids": ["batch_size", 6]}


def _record(profile: tp.Profile, cc=(9, 0), version="10.13.0", component="unet") -> dict:
    return {"component": component, "profile": profile.name(), **tp.profile_record(profile),
            "compute_capability": list(cc), "trt_version": version,
            "file": tp.plan_file(component, profile, "fp16", cc, version)}


def _unet_call(batch: int, height: int, width: int) -> dict:
    return {"sample": (batch, 4, height // 8, width // 8), "timestep": (),
            "encoder_hidden_states": (batch, 77, 2048), "text_embeds": (batch, 1280), "time_ids": (batch, 6)}


def test_plan_keys_carry_component_profile_precision_gpu_and_version():
    profile = tp.profiles(["1024x1024"], None, "1", False, 64)[0]
    name = tp.plan_file("unet", profile, "fp16", (8, 9), "10.13.0")
    assert name == "unet__b1_h1024_w1024_nocfg__fp16__sm89__trt10.13.0.plan"


def test_selection_by_call_shapes_prefers_static_then_nearest_and_refuses_foreign_plans():
    static = tp.profiles(["1024x1024"], None, "1", False, 64)[0]
    dynamic = tp.profiles([], "512-1536", "1", False, 64)[0]
    guided = tp.profiles(["1024x1024"], None, "1", True, 64)[0]
    plans = [_record(dynamic), _record(static), _record(guided)]

    def pick(call, cc=(9, 0), version="10.13.0"):
        return tp.select(plans, "unet", UNET_INPUTS, call, 8, cc, version)["file"]

    assert pick(_unet_call(1, 1024, 1024)) == plans[1]["file"]  # static beats dynamic
    assert pick(_unet_call(1, 768, 768)) == plans[0]["file"]
    assert pick(_unet_call(2, 1024, 1024)) == plans[2]["file"]  # cond+uncond batch → the guided plan
    with pytest.raises(UserError, match=r"no unet plan covers sample \[1, 4, 256, 256\]") as e:
        pick(_unet_call(1, 2048, 2048))
    assert "b1_h512-1536_w512-1536_nocfg" in str(e.value)
    with pytest.raises(UserError, match="none was built for this GPU"):
        pick(_unet_call(1, 1024, 1024), cc=(8, 0))
    with pytest.raises(UserError, match="TensorRT 10.14"):
        pick(_unet_call(1, 1024, 1024), version="10.14.0")
    with pytest.raises(UserError, match="no TensorRT plan for vae_decoder"):
        tp.select(plans, "vae_decoder", {}, {}, 8, (9, 0), "10.13.0")


# the transformer families' ONNX dims as their exports name them (export/flux_components.py, flow_components.py)
FLUX_INPUTS = {"hidden_states": ["batch_size", "sequence", 64], "encoder_hidden_states": ["batch_size", "text_length", 4096],
               "pooled_projections": ["batch_size", 768], "timestep": ["batch_size"], "img_ids": ["sequence", 3],
               "txt_ids": ["text_length", 3], "guidance": ["batch_size"]}
SD3_INPUTS = {"hidden_states": ["batch_size", 16, "height", "width"],
              "encoder_hidden_states": ["batch_size", "sequence_length", 4096], "pooled_projections": ["batch_size", 2048],
              "timestep": ["batch_size"]}


def test_flux_profiles_size_the_packed_sequence_and_t5_length_without_a_guidance_batch():
    profile = tp.profiles(["1024x768"], None, "1-2", True, 16)[0]  # a guidance flag changes nothing for FLUX.1
    shapes = tp.input_shapes("transformer", FLUX_INPUTS, profile, 8, "flux")
    packed = (768 // 16) * (1024 // 16)  # 2×2 patches of the 1/8 latent: 3072 tokens
    assert shapes["hidden_states"] == ((1, packed, 64), (1, packed, 64), (2, packed, 64))
    assert shapes["encoder_hidden_states"][2] == (2, 512, 4096)  # FluxPipeline pads T5 to 512 by default
    assert shapes["img_ids"][0] == (packed, 3) and shapes["txt_ids"][0] == (512, 3)
    assert shapes["guidance"][2] == (2,)
    t5 = tp.input_shapes("text_encoder_2", {"input_ids": ["batch_size", "sequence_length"]}, profile, 8, "flux")
    clip = tp.input_shapes("text_encoder", {"input_ids": ["batch_size", "sequence_length"]}, profile, 8, "flux")
    assert t5["input_ids"][1] == (1, 512) and clip["input_ids"][1] == (1, 77)
    short = tp.profiles([], "512-1024", "1", False, 16, text_length="256")[0]
    assert short.name() == "b1_h512-1024_w512-1024_s256_nocfg"
    shapes = tp.input_shapes("transformer", FLUX_INPUTS, short, 8, "flux")
    assert [s[1] for s in shapes["hidden_states"]] == [32 * 32, 48 * 48, 64 * 64]
    assert shapes["encoder_hidden_states"][0] == (1, 256, 4096)
    record = _record(short, component="transformer")
    call = {"hidden_states": (1, 40 * 56, 64), "encoder_hidden_states": (1, 256, 4096), "pooled_projections": (1, 768),
            "timestep": (1,), "img_ids": (40 * 56, 3), "txt_ids": (256, 3), "guidance": (1,)}
    assert tp.select([record], "transformer", FLUX_INPUTS, call, 8, (9, 0), "10.13.0", "flux") is record
    with pytest.raises(UserError, match="no transformer plan covers"):  # a 512-token prompt needs a 512 plan
        tp.select([record], "transformer", FLUX_INPUTS, call | {"encoder_hidden_states": (1, 512, 4096),
                                                                  "txt_ids": (512, 3)}, 8, (9, 0), "10.13.0", "flux")


def test_sd3_transformer_doubles_under_guidance_and_reads_clip_plus_t5():
    profile = tp.profiles(["1024x1024"], None, "1", True, 16)[0]
    shapes = tp.input_shapes("transformer", SD3_INPUTS, profile, 8, "sd3")
    assert shapes["hidden_states"][1] == (2, 16, 128, 128)  # cond + uncond
    assert shapes["encoder_hidden_states"][1] == (2, 77 + 256, 4096)  # CLIP's 77 ‖ T5's 256 (SD3's default)
    t5 = tp.input_shapes("text_encoder_3", {"input_ids": ["batch_size", "sequence_length"]}, profile, 8, "sd3")
    assert t5["input_ids"][1] == (1, 256)
    record = tp.profile_record(tp.profiles(["1024x1024"], None, "1", True, 16, text_length="77-512")[0])
    assert record["text_length"] == [77, 512, 512]  # optimum at the top: prompts are padded to it
    assert tp._profile(record).text_length == tp.Range(77, 512, 512)


def test_directory_plan_lists_every_component_and_what_exists(exported):
    engine_dir = exported("sdxl-lightning", "fp16")
    profiles = tp.profiles(["32x32", "48x32"], None, "1", False, 4)
    planned = trt_dir.plan(engine_dir, profiles, None, (9, 0), "10.13.0")
    assert [p.component for p in planned][::2] == ["text_encoder", "text_encoder_2", "unet", "vae_decoder",
                                                    "vae_encoder"]
    assert not any(p.exists for p in planned)
    unet = next(p for p in planned if p.component == "unet")
    assert unet.file == "trt/unet__b1_h32_w32_nocfg__fp16__sm90__trt10.13.0.plan"
    assert unet.shapes["sample"][0] == (1, 4, 16, 16)
    vae = next(p for p in planned if p.component == "vae_decoder")
    assert "__fp32__" in vae.file  # the SDXL VAE was kept fp32 at export
    (engine_dir / "trt").mkdir(exist_ok=True)
    (engine_dir / unet.file).write_bytes(b"")
    try:
        again = trt_dir.plan(engine_dir, profiles, ("unet",), (9, 0), "10.13.0")
        assert [p.exists for p in again] == [True, False]
    finally:
        (engine_dir / unet.file).unlink()
    with pytest.raises(UserError, match="not in"):
        trt_dir.plan(engine_dir, profiles, ("controlnet",), (9, 0), "10.13.0")


def test_build_plan_command_works_without_tensorrt(exported):
    engine_dir = exported("sdxl-lightning", "fp16")
    result = run_sdrt("build", str(engine_dir), "--plan", "--resolution", "32x32", "--dynamic", "16-48",
                      "--no-guidance", "--compute-capability", "8.9", "--trt-version", "10.13.0")
    assert result.returncode == 0, result.stderr
    assert "unet__b1_h32_w32_nocfg__fp16__sm89__trt10.13.0.plan" in result.stdout.replace("\n", "")


def test_build_plan_rejects_bad_resolution(exported):
    # The UNet takes any latent size (manifest latent_multiple 1): sizes are multiples of the VAE's factor, 2 here.
    result = run_sdrt("build", str(exported("sdxl-lightning", "fp16")), "--plan", "--resolution", "31x30")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: resolution 31x30: width and height must be positive "
                                                  "multiples of 2"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_without_tensorrt_says_how_to_install_it(exported):
    result = run_sdrt("build", str(exported("sdxl-lightning", "fp16")), "--resolution", "32x32")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install tensorrt" in lines[0]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_export_with_trt_fails_before_exporting_without_tensorrt(tiny_pipeline, tmp_path):
    result = run_sdrt("export", str(tiny_pipeline("sd15")), "-o", str(tmp_path / "out"), "--trt",
                      "--resolution", "32x32")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install tensorrt" in lines[0]
    assert not list(tmp_path.iterdir())


def test_face_id_graphs_are_planned_with_their_own_axes():
    """unet_pulid doubles under guidance and takes PuLID's ID tokens (10–64, v1 to v1.1); its encoder runs one
    identity over EVA's 577 tokens; IdentityNet reads InstantID's 16 face tokens; PhotoMaker's graphs take 1–8 rows."""
    profile = tp.profiles(["1024x1024"], None, "1", True, 64)[0]
    pulid = tp.input_shapes("unet_pulid", {**UNET_INPUTS, "id_tokens": ["batch_size", "id_tokens", 2048],
                                           "id_scale": []}, profile, 8)
    assert pulid["sample"][1] == (2, 4, 128, 128) and pulid["id_tokens"] == ((2, 10, 2048), (2, 26, 2048), (2, 64, 2048))
    encoder = tp.input_shapes("pulid/encoder", {"id_cond": ["batch_size", 1280],
                                                "id_vit_hidden": ["batch_size", 5, "patches", 1024]}, profile, 8)
    assert encoder["id_vit_hidden"][2] == (1, 5, 577, 1024) and encoder["id_cond"][0] == (1, 1280)
    net = tp.input_shapes("instantid/identitynet", {"encoder_hidden_states": ["batch_size", "sequence_length", 2048],
                                                    "controlnet_cond": ["batch_size", 3, "sample_height",
                                                                        "sample_width"]}, profile, 8)
    assert net["encoder_hidden_states"][1] == (2, 16, 2048) and net["controlnet_cond"][1] == (2, 3, 1024, 1024)
    rows = tp.input_shapes("photomaker/fuse", {"class_embeds": ["rows", 2048]}, profile, 8)
    assert rows["class_embeds"] == ((1, 2048), (1, 2048), (8, 2048))


def test_max_sequence_length_is_checked_before_planning(exported):
    """`sdrt build --max-sequence-length`: only for the T5 families, N or MIN-MAX (a UserError: one line, exit 2, as
    test_build_plan_rejects_bad_resolution shows for the command)."""
    from sdrt.cli.export_cmd import _profiles

    engine = exported("sdxl-lightning", "fp16")
    with pytest.raises(UserError, match="--max-sequence-length is for SD3 and FLUX.1"):
        _profiles(engine, ["32x32"], None, "1", False, max_sequence_length="128")
    with pytest.raises(UserError, match="max sequence length 'long' is not N or MIN-MAX"):
        tp.profiles(["32x32"], None, "1", False, 2, text_length="long")
    with pytest.raises(UserError, match="need 0 < MIN <= MAX"):
        tp.profiles(["32x32"], None, "1", False, 2, text_length="512-256")
