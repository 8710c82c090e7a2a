"""`sdrt bench` on the tiny models: every preset end to end, the result's structure, stage arithmetic, FLOP counts
against reference/fewstep_perf.md §2.3, and bad input (one line on stderr, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import run_sdrt
from sdrt.bench.measure.timing import EngineCall, Sample, stage_times
from sdrt.bench.scenarios import PRESETS, HarnessConfig, Overrides, check_config, resolve
from sdrt.runtime.errors import UserError

SIZE = "32"  # tiny models: VAE factor 2, UNet factor 2 → 16² latents
FAMILY_OF_PRESET = {"lightning-4step": "sdxl-lightning", "lightning-1step": "sdxl-lightning", "turbo": "sdxl-lightning",
                    "sd15-classic": "sd15"}


@pytest.fixture(scope="module")
def bench_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-work")  # FLOP-count cache shared by the runs below


def check_result(result: dict, preset: str, runs: int, warmup: int) -> None:
    p = PRESETS[preset]
    s = result["scenario"]
    assert result["schema"] == "sdrt-bench/1"
    assert (s["name"], s["steps"], s["sampler"], s["guidance"], s["width"], s["height"]) == \
        (preset, p.steps, p.sampler, p.guidance, 32, 32)
    assert s["backends"] == ["ort-cpu", "diffusers"]
    assert {"cpu", "cores_logical", "cores_physical", "memory_gib", "gpu"} <= set(result["machine"])
    assert {"sdrt", "torch", "onnxruntime", "diffusers"} <= set(result["versions"])
    assert result["peak"]["flops_per_second"] == max(result["peak"]["probes_flops_per_second"]) > 1e8
    assert len(result["peak"]["probes_flops_per_second"]) == 2  # before and after the backends
    assert isinstance(result["warnings"], list) and "load_average_before" in result["conditions"]
    per_image = result["flops"]["per_image"]
    encoders = {"text_encoder", "text_encoder_2"} if "lightning" in preset or preset == "turbo" else {"text_encoder"}
    assert set(per_image) == encoders | {"unet", "vae_decoder"} and all(v > 0 for v in per_image.values())

    unet_batch = 2 if p.guidance > 1 else 1  # classifier-free guidance doubles the UNet batch
    for name, b in result["backends"].items():
        assert b["status"] == "ok", b.get("error")
        assert len(b["warmup"]) == warmup and len(b["samples"]) == runs
        for sample in b["warmup"] + b["samples"]:
            parts = sample["text_encoding"] + sample["unet"] + sample["vae_decode"] + sample["runtime_overhead"]
            assert parts == pytest.approx(sample["end_to_end"], rel=1e-9, abs=1e-12)
            assert sum(sample["unet_steps"]) == pytest.approx(sample["unet"], rel=1e-9)
            assert len(sample["unet_steps"]) == p.steps
            assert 0 <= sample["runtime_overhead"] < sample["end_to_end"]  # engine calls lie inside the run
            assert min(sample["text_encoding"], sample["vae_decode"], *sample["unet_steps"]) > 0
            unet_calls = [c for c in sample["calls"] if c[0] == "unet"]
            assert len(unet_calls) == p.steps and all(c[1] == unet_batch for c in unet_calls), name
            assert [c[0] for c in sample["calls"]].count("vae_decoder") == 1
        st = b["stats"]
        for stage in ("text_encoding", "unet", "vae_decode", "runtime_overhead", "end_to_end"):
            assert st[stage]["min"] <= st[stage]["median"] <= st[stage]["p90"] <= st[stage]["max"]
            assert st[stage]["n"] == runs
        assert len(st["unet_steps"]) == p.steps
        assert b["images_per_second"] == pytest.approx(1 / st["end_to_end"]["median"])
        assert b["memory"]["peak_rss_gib"] > 0.05
        unet = b["achieved"]["unet"]
        assert unet["flops"] == p.steps * unet_batch * per_image["unet"]
        assert unet["flops_per_second"] == pytest.approx(unet["flops"] / st["unet"]["median"])
        assert unet["fraction_of_peak"] == pytest.approx(unet["flops_per_second"] / result["peak"]["flops_per_second"])


def check_files(folder: Path) -> dict:
    result = json.loads((folder / "result.json").read_text())
    md = (folder / "result.md").read_text()
    assert "| stage | GFLOP | ort-cpu | diffusers |" in md and "runtime overhead" in md
    with Image.open(folder / "stages.png") as chart:
        assert chart.format == "PNG" and chart.width >= 800
    return result


@pytest.mark.slow  # about 35 s: each backend in its own worker process (the in-process path runs by default)
def test_bench_cli_isolated_lightning_4step(exported, bench_workdir, tmp_path):
    """The real console entry point, each backend in its own worker process."""
    out = tmp_path / "results"
    proc = run_sdrt("bench", str(exported("sdxl-lightning", "fp32")), "--preset", "lightning-4step",
                    "--backend", "ort-cpu,diffusers", "--resolution", SIZE, "--warmup", "1", "--runs", "2",
                    "--workdir", str(bench_workdir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"results: {out}" in proc.stdout and "end to end" in proc.stdout
    result = check_files(out)
    check_result(result, "lightning-4step", runs=2, warmup=1)
    assert result["command"].startswith("sdrt bench ") and "--preset lightning-4step" in result["command"]
    assert all(b["memory"]["peak_rss_scope"] == "this backend's process" for b in result["backends"].values())


    from sdrt.bench import report  # a backend that failed is reported beside the others, not hidden
    result["backends"]["tensorrt"] = {"backend": "tensorrt", "status": "failed", "error": "no plan for 32x32"}
    paths = report.write_all(result, tmp_path / "with-failure")
    assert "## tensorrt: failed" in paths["markdown"].read_text() and paths["chart"].is_file()


@pytest.mark.parametrize("preset", [pytest.param("lightning-1step", marks=pytest.mark.slow),  # suite time: the
                                    # isolated CLI test above and the interleaved ones below cover the default run
                                    pytest.param("turbo", marks=pytest.mark.slow),
                                    pytest.param("sd15-classic", marks=pytest.mark.slow)])
def test_bench_each_preset_in_process(preset, exported, bench_workdir, tmp_path):
    from sdrt.cli.main import app

    out = tmp_path / "results"
    args = ["bench", str(exported(FAMILY_OF_PRESET[preset], "fp32")), "--preset", preset, "--backend", "ort-cpu",
            "--backend", "diffusers", "--resolution", SIZE, "--warmup", "1", "--runs", "2", "--no-isolate",
            "--workdir", str(bench_workdir), "--out", str(out)]
    invoked = CliRunner().invoke(app, args)
    assert invoked.exit_code == 0, (invoked.output, invoked.exception)
    check_result(check_files(out), preset, runs=2, warmup=1)


def test_stages_of_one_run_split_by_step_marks():
    calls = (EngineCall("text_encoder", 1, 0.01), EngineCall("text_encoder_2", 1, 0.02),
             EngineCall("unet", 2, 0.1), EngineCall("unet", 2, 0.2), EngineCall("unet", 2, 0.3),
             EngineCall("vae_decoder", 1, 0.4))
    t = stage_times(Sample(end_to_end=1.5, calls=calls, step_marks=(1, 3)))  # heun-like: 1 then 2 calls
    assert t["text_encoding"] == pytest.approx(0.03) and t["vae_decode"] == pytest.approx(0.4)
    assert t["unet_steps"] == pytest.approx([0.1, 0.5]) and t["unet"] == pytest.approx(0.6)
    assert t["runtime_overhead"] == pytest.approx(1.5 - 1.03)


def test_flop_counts_match_the_reference_for_sd15():
    """reference/fewstep_perf.md §2.3: SD1.5 UNet 803.3 GFLOPs at 64² latents, VAE decoder 2514.5, CLIP-L 13.3."""
    from sdrt.bench.flops import ModelConfigs, per_image_flops
    from sdrt.bench.fullsize import config

    cfg = config("sd15")
    configs = ModelConfigs(unet=cfg["unet"], vae=cfg["vae"],
                           text_encoders={"text_encoder": {**cfg["text_encoder"], "architectures": ["CLIPTextModel"]}})
    flops = per_image_flops(configs, (64, 64))
    assert flops["unet"] / 1e9 == pytest.approx(803.3, abs=0.05)
    assert flops["vae_decoder"] / 1e9 == pytest.approx(2514.5, abs=0.05)
    assert flops["text_encoder"] / 1e9 == pytest.approx(13.3, abs=0.05)


def test_flop_counts_match_the_reference_for_sd21():
    """reference/fewstep_perf.md §2.3: SD2.1 UNet 804.3 / 2149.1 GFLOPs at 64² / 96² latents, OpenCLIP-H 45.1."""
    from sdrt.bench.flops import ModelConfigs, per_image_flops
    from sdrt.bench.fullsize import config

    cfg = config("sd21")
    configs = ModelConfigs(unet=cfg["unet"], vae=cfg["vae"],
                           text_encoders={"text_encoder": {**cfg["text_encoder"], "architectures": ["CLIPTextModel"]}})
    assert per_image_flops(configs, (64, 64))["unet"] / 1e9 == pytest.approx(804.3, abs=0.05)
    flops = per_image_flops(configs, (96, 96))
    assert flops["unet"] / 1e9 == pytest.approx(2149.1, abs=0.05)
    assert flops["text_encoder"] / 1e9 == pytest.approx(45.1, abs=0.05)


def test_every_architecture_the_cli_names_has_a_builder_with_the_published_tokenizers_and_scheduler():
    from sdrt.bench import fullsize, scenarios
    from sdrt.export.models.tiny_tokenizer import EOS

    assert fullsize.ARCHITECTURES == scenarios.ARCHITECTURES
    unet_archs = ("sd15", "sd21", "sdxl")  # the transformer families: test_flow_architectures_* below
    configs = {arch: fullsize.config(arch) for arch in unet_archs}
    pads = {arch: {tok: fullsize.pad_token(cfg, tok) for tok, enc in (("tokenizer", "text_encoder"),
                                                                      ("tokenizer_2", "text_encoder_2")) if enc in cfg}
            for arch, cfg in configs.items()}
    assert pads["sd15"]["tokenizer"] == EOS and pads["sdxl"] == {"tokenizer": EOS, "tokenizer_2": "!"}
    assert pads["sd21"]["tokenizer"] == "!"  # OpenCLIP's tokenizer
    schedulers = {arch: fullsize.build_scheduler(fullsize.config(arch)) for arch in unet_archs}
    assert {a: (type(s).__name__, s.config.prediction_type) for a, s in schedulers.items()} == {
        "sd15": ("PNDMScheduler", "epsilon"), "sd21": ("DDIMScheduler", "v_prediction"),
        "sdxl": ("EulerDiscreteScheduler", "epsilon")}


def test_flow_architectures_are_full_width_and_say_what_is_reduced():
    """bench/fullsize_flow.py on the meta device: FLUX.1's transformer at 2 + 4 of its 19 + 38 blocks (11.9 B → 1.30 B
    parameters), T5-XXL at 4 of 24 layers, both said in the config."""
    from sdrt.bench import fullsize_flow
    from sdrt.bench.models import size_multiple_of_architecture

    flux_full, flux = fullsize_flow.parameters("flux-schnell", True), fullsize_flow.parameters("flux-schnell")
    assert round(flux_full["transformer"] / 1e9, 1) == 11.9 and round(flux["transformer"] / 1e9, 2) == 1.30
    assert round(flux_full["text_encoder_2"] / 1e9, 2) == 4.76 and "4 of its 24 layers" in \
        fullsize_flow.config("flux-schnell")["_reduced"]
    assert size_multiple_of_architecture("flux-schnell") == size_multiple_of_architecture("sd35m") == 16


@pytest.mark.slow
def test_flow_flop_counts_follow_the_sequence_lengths():
    """SD3.5-medium's transformer whole (2.24 B parameters as diffusers builds it); FLOPs count T5 at the family's
    length and FLUX.1's transformer on its packed sequence."""
    from sdrt.bench import fullsize_flow
    from sdrt.bench.flops import ModelConfigs, per_image_flops

    sd35 = fullsize_flow.parameters("sd35m")
    assert round(sd35["transformer"] / 1e9, 2) == 2.24 and round(sd35["text_encoder_2"] / 1e9, 2) == 0.69
    flux = fullsize_flow.parameters("flux-schnell")
    cfg = fullsize_flow.config("flux-schnell")
    t5 = {**cfg["text_encoder_2"], "model_type": "t5", "vocab_size": 32128}
    configs = ModelConfigs(unet=cfg["transformer"], vae=cfg["vae"], text_encoders={"text_encoder_2": t5},
                           denoiser="transformer", family="flux")
    small, large = per_image_flops(configs, (32, 32)), per_image_flops(configs, (64, 64))
    # the joint sequence grows from 256 + 512 to 1024 + 512 tokens (packed image + T5): 2×, plus attention's square
    assert 2.0 < large["transformer"] / small["transformer"] < 2.3
    # T5 at 512 tokens: 2 × parameters × tokens within 10 % (attention adds, the embedding table does not count)
    assert small["text_encoder_2"] == pytest.approx(2 * (flux["text_encoder_2"] - 32128 * 4096) * 512, rel=0.1)


def test_bench_command_module_imports_only_typer():
    code = ("import sys, sdrt.cli.bench_cmd\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'onnxruntime') "
            "or m.startswith('sdrt.bench')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_bad_input_is_one_line_and_exit_2():
    proc = run_sdrt("bench", "sd15", "--preset", "lightning-9step")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown preset 'lightning-9step'"), proc.stderr


@pytest.mark.parametrize("overrides, fragment", [
    (Overrides(model="sd14"), "neither an engine directory nor an architecture"),
    (Overrides(model="sd15", backends=("ort-cpu,onnx-magic",)), "unknown backend 'onnx-magic'"),
    (Overrides(model="sd15", backends=("diffusers-compile",)), "GPU"),
    (Overrides(model="sd15", backends=("tensorrt",)), "TensorRT"),
    (Overrides(model="sd15", resolution="500x512"), "multiples of 8"),
    (Overrides(model="sd15", resolution="big"), "WIDTHxHEIGHT"),
    (Overrides(model="sd15", precision="int4"), "precision"),
    (Overrides(model="sd15", sampler="dpm_fast"), "unknown sampler"),
    (Overrides(model="sd15", batch=0), "--batch"),
])
def test_bad_scenarios_are_user_errors(overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve("sd15-classic", overrides, gpu=False)


def test_size_is_checked_against_the_architecture_before_building(tmp_path):
    from sdrt.bench.models import check_size, size_multiple_of_architecture

    with pytest.raises(UserError, match="multiples of 8"):
        resolve("sd15-classic", Overrides(model="sd15", resolution="516", backends=("ort-cpu",)), gpu=False)
    scenario = resolve("sd15-classic", Overrides(model="sd15", resolution="520", backends=("ort-cpu",)), gpu=False)
    check_size(scenario, size_multiple_of_architecture("sd15"))  # 520 = 65 latents: any latent size runs


def test_engine_dir_precision_must_match(exported):
    from sdrt.bench.models import prepare_model

    scenario = resolve("turbo", Overrides(model=str(exported("sdxl-lightning", "fp32")), precision="fp16"), gpu=False)
    with pytest.raises(UserError, match="exported in fp32"):
        prepare_model(scenario, Path("unused"))


def test_op_profile_groups_every_kernel_and_counts_gemm_flops(exported, tmp_path):
    from sdrt.bench.experiments.op_profile import main, node_flops

    assert node_flops("Conv", [[1, 4, 8, 8], [8, 4, 3, 3], [8]], [[1, 8, 8, 8]]) == 2 * 8 * 64 * 4 * 9
    assert node_flops("MatMul", [[1, 8, 64, 40], [1, 8, 40, 64]], [[1, 8, 64, 64]]) == 2 * 8 * 64 * 64 * 40
    assert node_flops("FusedMatMul", [[1, 512, 4096]], [[1, 4096, 512]]) == 2 * 4096 * 512 * 512  # transA, weight not listed
    assert node_flops("Softmax", [[1, 8, 64, 64]], [[1, 8, 64, 64]]) == 0
    result = main([str(exported("sd15")), "--resolution", SIZE, "--warmup", "1", "-o", str(tmp_path)])
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["components"].keys() == {"unet", "vae_decoder"} and saved["resolution"] == int(SIZE)
    for comp in result["components"].values():
        groups = {g["group"]: g for g in comp["groups"]}
        assert abs(sum(g["ms"] for g in groups.values()) - sum(n["ms"] for n in comp["nodes"])) < 1e-6
        assert "upsampling (GEMM)" in groups and groups["upsampling (GEMM)"]["gflop"] > 0  # the rewritten 2x2 convs
    assert "self-attention (GEMM)" in {g["group"] for g in result["components"]["unet"]["groups"]}
    assert "## unet" in (tmp_path / "profile.md").read_text()


def test_interleaved_backends_alternate_their_timed_runs(exported, bench_workdir):
    from sdrt.bench.harness import run

    events = []
    scenario = resolve("lightning-4step", Overrides(model=str(exported("sdxl-lightning", "fp32")), resolution=SIZE,
                                                    backends=("ort-cpu", "diffusers")))
    config = HarnessConfig(warmup=1, runs=2, workdir=bench_workdir, interleave=True)
    result = run(scenario, config, lambda what, done, total: events.append((what, done)))
    timed = [e for e in events if e[0].endswith(": runs")]
    assert timed == [("ort-cpu: runs", 1), ("diffusers: runs", 1), ("ort-cpu: runs", 2), ("diffusers: runs", 2)]
    check_result(result, "lightning-4step", runs=2, warmup=1)
    assert result["config"]["interleave"] and not result["config"]["isolate"]
    assert "interleaved" in result["backends"]["diffusers"]["memory"]["peak_rss_scope"]


@pytest.mark.slow  # 20 s; the in-process interleaving and the failing-turn test cover alternation by default
def test_alternating_backends_take_turns_in_fresh_processes(exported, bench_workdir):
    from sdrt.bench.harness import run

    events = []
    scenario = resolve("lightning-1step", Overrides(model=str(exported("sdxl-lightning", "fp32")), resolution=SIZE,
                                                    backends=("ort-cpu", "diffusers")))
    config = HarnessConfig(warmup=1, runs=2, workdir=bench_workdir, alternate=True)
    result = run(scenario, config, lambda what, done, total: events.append((what, done, total)))
    timed = [e for e in events if e[0].endswith(": runs")]
    assert timed == [("ort-cpu: runs", 1, 2), ("diffusers: runs", 1, 2), ("ort-cpu: runs", 2, 2),
                     ("diffusers: runs", 2, 2)]
    assert [e[0] for e in events].count("diffusers: loading") == 2  # one process, one load, per timed run
    check_result(result, "lightning-1step", runs=2, warmup=2)  # a warm-up in each process
    for b in result["backends"].values():
        assert "2 processes" in b["memory"]["peak_rss_scope"]
    assert result["config"]["alternate"]


def test_interleave_and_alternate_together_are_refused():
    with pytest.raises(UserError, match="pick one"):
        check_config(HarnessConfig(interleave=True, alternate=True))


def test_interleaved_backend_that_fails_is_reported_and_the_others_go_on(exported):
    from sdrt.bench.measure.jobs import Job, measure_interleaved
    from sdrt.bench.scenarios import with_threads

    engine = str(exported("sdxl-lightning", "fp32"))
    scenario = resolve("lightning-1step", Overrides(model=engine, resolution=SIZE, backends=("ort-cpu",)))  # resolve refuses ort-cuda here
    threads = with_threads(HarnessConfig()).threads
    raws = measure_interleaved([Job(scenario, b, engine, None, 0, 2, threads) for b in ("ort-cuda", "ort-cpu")])
    assert list(raws) == ["ort-cuda", "ort-cpu"]
    assert raws["ort-cuda"]["status"] == "failed" and raws["ort-cuda"]["error"]  # no GPU / no onnxruntime-gpu here
    assert raws["ort-cpu"]["status"] == "ok" and len(raws["ort-cpu"]["samples"]) == 2


def test_rates_above_the_peak_are_flagged_with_their_possible_causes():
    from sdrt.bench.harness import warnings_about

    over = {"status": "ok", "achieved": {"vae_decode": {"fraction_of_peak": 1.2}, "unet": {"fraction_of_peak": 0.9}}}
    sdrt, diffusers = warnings_about({"ort-cpu": over, "diffusers": over})
    assert sdrt.startswith("ort-cpu: vae_decode ran above") and "sub-pixel" in sdrt
    assert diffusers.startswith("diffusers: vae_decode ran above") and "sub-pixel" not in diffusers
    assert warnings_about({"ort-cpu": {"status": "ok", "achieved": {"unet": {"fraction_of_peak": 0.9}}}}) == []


@pytest.mark.slow  # the alternating loop itself runs by default (test_interleaved_backends_alternate_their_timed_runs)
def test_alternating_backend_that_fails_leaves_the_turn(exported):
    from sdrt.bench.measure.jobs import Job, measure_alternating
    from sdrt.bench.scenarios import with_threads

    engine = str(exported("sdxl-lightning", "fp32"))
    scenario = resolve("lightning-1step", Overrides(model=engine, resolution=SIZE, backends=("ort-cpu",)))
    threads = with_threads(HarnessConfig()).threads
    events = []
    raws = measure_alternating([Job(scenario, b, engine, None, 0, 2, threads) for b in ("ort-cuda", "ort-cpu")],
                               lambda what, done, total: events.append(what))
    assert list(raws) == ["ort-cuda", "ort-cpu"]
    assert raws["ort-cuda"]["status"] == "failed" and raws["ort-cuda"]["error"]  # no GPU / no onnxruntime-gpu here
    assert events.count("ort-cuda: loading") == 1  # not tried again in the second turn
    assert raws["ort-cpu"]["status"] == "ok" and len(raws["ort-cpu"]["samples"]) == 2
