"""`sdrt export` and `sdrt build`: options → ExportConfig / TensorRT profiles → an engine directory and its plans.

The exporter and TensorRT are imported when a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sdrt.runtime.errors import UserError

console = Console(stderr=True)


def export(
    model: str = typer.Argument(..., help="hub id, local diffusers folder, or .safetensors/.ckpt file"),
    output: Path = typer.Option(None, "-o", "--output", help="engine directory to write [default: ./<model name>-<precision>]"),
    precision: str = typer.Option("fp16", help="fp16 (baked into the ONNX, as TensorRT's strongly typed networks need) or fp32"),
    components: Optional[str] = typer.Option(None, help="comma-separated subset: text_encoder,text_encoder_2,unet,vae_decoder,vae_encoder"),
    vae: Optional[str] = typer.Option(None, help="another VAE (folder, hub id or single file), e.g. the SDXL fp16-fix VAE"),
    family: Optional[str] = typer.Option(None, help="family of a single-file checkpoint when it cannot be inferred"),
    config: Optional[str] = typer.Option(None, help="diffusers folder or hub id holding the configs for a single file"),
    force: bool = typer.Option(False, help="redo every component and replace whatever the output holds"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary of the manifest on stdout"),
    trt: bool = typer.Option(False, "--trt", help="then build TensorRT plans (needs TensorRT and a GPU)"),
    resolution: list[str] = typer.Option([], help="with --trt: WIDTHxHEIGHT of a static profile (repeatable)"),
    dynamic: Optional[str] = typer.Option(None, help="with --trt: MIN-MAX pixel range of a dynamic profile"),
    batch: str = typer.Option("1", help="with --trt: images per call, N or MIN-MAX"),
    guidance: bool = typer.Option(True, help="with --trt: UNet plans for classifier-free guidance (--no-guidance "
                                            "for Lightning/Turbo)"),
    lora: list[str] = typer.Option([], "--lora", help="FILE[:SCALE]: a LoRA (.safetensors) fused into the exported "
                                                     "weights (repeatable; the manifest records each file's sha256)"),
    textual_inversion: bool = typer.Option(False, "--textual-inversion", help="also export each text encoder's "
                                           "inputs_embeds variant, so that `sdrt run --embedding` works (a second "
                                           "copy of the text encoders' weights)"),
    hypernetwork: list[str] = typer.Option([], "--hypernetwork", help="FILE[:SCALE]: an AUTOMATIC1111 hypernetwork "
                                           "(.pt) baked into the UNet (repeatable; prompts may then carry its "
                                           "<hypernet:NAME:SCALE> tag)"),
    tiny_vae: Optional[str] = typer.Option(None, "--tiny-vae", help="a diffusers AutoencoderTiny folder (TAESD: "
                                           "madebyollin/taesd for SD 1.x/2.x, taesdxl for SDXL) exported beside the "
                                           "full VAE, for `sdrt run --vae tiny` and --preview"),
    deepcache: bool = typer.Option(False, "--deepcache", help="also the two UNet graphs step caching runs (DeepCache, "
                                   "cache branch 0: the whole UNet returning its last layer's input, and that last "
                                   "layer alone), for `sdrt run --cache-interval N`"),
    controlnet: list[str] = typer.Option([], "--controlnet", help="SRC[=NAME]: a diffusers ControlNet folder, hub id "
                                         "or single file, exported as controlnet/NAME (repeatable); MODEL may be an "
                                         "engine directory to add ControlNets to"),
    ip_adapter: list[str] = typer.Option([], "--ip-adapter", help="FILE[=NAME]: an IP-Adapter (.safetensors/.bin, "
                                         "diffusers' format), exported as image_encoder + unet_ip; needs "
                                         "--image-encoder; repeatable (several adapters sharing the one encoder)"),
    image_encoder: Optional[str] = typer.Option(None, help="the IP-Adapter's CLIP image encoder (a "
                                                "CLIPVisionModelWithProjection folder)"),
    t2i_adapter: list[str] = typer.Option([], "--t2i-adapter", help="SRC[=NAME]: a diffusers T2IAdapter folder, "
                                          "exported as t2i_adapter/NAME (repeatable)"),
    instantid: Optional[str] = typer.Option(None, "--instantid", help="InstantID's folder as InstantX/InstantID "
                                            "ships it (ControlNetModel/ and ip-adapter.bin), or CONTROLNET_DIR,"
                                            "ADAPTER_FILE: IdentityNet, the face Resampler and unet_controlnet_ip "
                                            "(SDXL only)"),
    pulid: Optional[str] = typer.Option(None, "--pulid", help="PuLID v1's file (guozinan/PuLID pulid_v1.bin): its "
                                        "ID encoder as pulid/encoder and unet_pulid, the UNet with its ID attention "
                                        "(SDXL only)"),
    pulid_eva: Optional[str] = typer.Option(None, "--pulid-eva", help="with --pulid: EVA02-CLIP-L-14-336's "
                                            "checkpoint (QuanSun/EVA-CLIP EVA02_CLIP_L_336_psz14_s6B.pt), its visual "
                                            "tower as pulid/eva, so that `sdrt run --pulid-photo` needs no .npz; needs "
                                            "--pulid-parsing"),
    pulid_parsing: Optional[str] = typer.Option(None, "--pulid-parsing", help="with --pulid-eva: facexlib's face "
                                                "parser (parsing_bisenet.pth) as pulid/parsing"),
    photomaker: Optional[str] = typer.Option(None, "--photomaker", help="PhotoMaker's file (TencentARC/PhotoMaker "
                                             "photomaker-v1.bin or photomaker-v2.bin, or .safetensors): its ID encoder "
                                             "and fuse module as "
                                             "photomaker/*, its UNet LoRA applied at load to PhotoMaker requests "
                                             "(SDXL only)"),
) -> None:
    """Export a Stable Diffusion pipeline to an optimum-compatible ONNX engine directory."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from sdrt.export.exporter import ExportConfig, export as run_export

    if trt:  # fail before minutes of export when the build could not run here
        from sdrt.engines.tensorrt import device_info

        if not resolution and not dynamic:
            raise UserError("--trt needs at least one --resolution WIDTHxHEIGHT or a --dynamic MIN-MAX range")
        device_info()

    adding = bool(controlnet or ip_adapter or image_encoder or t2i_adapter or instantid or pulid
                  or photomaker or pulid_eva or pulid_parsing) and (Path(model) / "manifest.json").is_file()
    if adding and output is not None and Path(output).absolute() != Path(model).absolute():
        raise UserError(f"{model} is an engine directory: ControlNets and IP-Adapters are added into it; drop "
                        "-o/--output")
    if output is None:
        output = Path(model) if adding else Path(f"{Path(model.rstrip('/')).stem}-{precision}")
    cfg = ExportConfig(model=model, output=output, precision=precision, vae=vae, family=family,
                       components=tuple(c.strip() for c in components.split(",")) if components else None,
                       single_file_config=config, force=force, loras=file_scale_args(lora, "--lora"),
                       textual_inversion=textual_inversion,
                       hypernetworks=file_scale_args(hypernetwork, "--hypernetwork"),
                       tiny_vae=tiny_vae, deepcache=deepcache, controlnets=tuple(controlnet), ip_adapter=tuple(ip_adapter),
                       image_encoder=image_encoder, t2i_adapters=tuple(t2i_adapter), instantid=instantid,
                       pulid=pulid, photomaker=photomaker, pulid_eva=pulid_eva, pulid_parsing=pulid_parsing)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, status: str) -> None:
            if status == "start":
                tasks[name] = bar.add_task(f"{name}: exporting and checking parity", total=1)
                return
            if name in tasks:
                bar.remove_task(tasks.pop(name))
            text = "unchanged, skipped" if status == "skipped" else "exported, parity gate passed"
            bar.console.print(f"{name}: {text}", highlight=False)

        if adding:
            from sdrt.export.exporter import add_controlnets

            manifest = add_controlnets(Path(model), tuple(controlnet), progress, tuple(ip_adapter), image_encoder,
                                       tuple(t2i_adapter), instantid, pulid, photomaker=photomaker,
                                       pulid_eva=pulid_eva, pulid_parsing=pulid_parsing)
        else:
            manifest = run_export(cfg, progress)
    if trt:
        _build_plans(output, resolution, dynamic, batch, guidance, None, 3, False)
    summary = summarize(manifest, output)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(f"engine directory: [bold]{Path(output).absolute()}[/] ({manifest['family']}, {manifest['precision']})")


def file_scale_args(values: list[str], flag: str) -> tuple[tuple[str, float], ...]:
    """`FILE[:SCALE]` options → (file, scale) pairs; a scale that is not a finite number is a one-line error."""
    from sdrt.runtime.lora.files import LoraError, parse_lora_arg

    try:
        return tuple(parse_lora_arg(v) for v in values)
    except LoraError as e:
        raise UserError(f"{flag} {e}") from None


def summarize(manifest: dict, engine_dir: Path) -> dict:
    return {
        "engine_dir": str(Path(engine_dir).absolute()),
        "family": manifest["family"],
        "inpaint": manifest["inpaint"],
        "prediction_type": manifest["prediction_type"],
        "precision": manifest["precision"],
        "loras": manifest.get("loras", []),
        "hypernetworks": manifest.get("hypernetworks", []),
        "components": {
            name: {
                "precision": c["precision"],
                "files": c["files"],
                "gate_passed": c["gate"]["passed"],
                "gate_bound": c["gate"]["bound"],
                "worst_rel_error": max(o["rel_error"] for case in c["gate"]["cases"] for o in case["outputs"]),
                "worst_psnr_db": min(o["psnr_db"] for case in c["gate"]["cases"] for o in case["outputs"]),
                "kept_fp32_reason": c.get("kept_fp32_reason"),
            }
            for name, c in manifest["components"].items()
        },
    }


def build(
    engine_dir: Path = typer.Argument(..., help="engine directory written by `sdrt export`"),
    resolution: list[str] = typer.Option([], help="WIDTHxHEIGHT for a static profile (repeatable)"),
    dynamic: Optional[str] = typer.Option(None, help="MIN-MAX pixel range for one dynamic profile, e.g. 512-1024"),
    batch: str = typer.Option("1", help="images per call: N (static) or MIN-MAX"),
    guidance: bool = typer.Option(True, help="build the UNet for classifier-free guidance (batch doubles); "
                                            "--no-guidance for Lightning/Turbo presets"),
    components: Optional[str] = typer.Option(None, help="comma-separated subset of components"),
    optimization_level: int = typer.Option(3, help="TensorRT builder optimization level 0-5"),
    refittable: bool = typer.Option(False, help="build refittable plans (for later weight swaps such as LoRA)"),
    show_plan: bool = typer.Option(False, "--plan", help="print the plans a build would make, build nothing"),
    compute_capability: Optional[str] = typer.Option(None, help="with --plan on a machine without a GPU: target, e.g. 9.0"),
    trt_version: Optional[str] = typer.Option(None, help="with --plan without TensorRT: target version, e.g. 10.13.0"),
    prompt_chunks: str = typer.Option("1", help="75-token prompt chunks the UNet plans take, N or MIN-MAX (long "
                                                "prompts in the a1111/compel syntaxes need more than 1)"),
    max_sequence_length: Optional[str] = typer.Option(
        None, help="SD3 / FLUX.1: the T5 tokens the plans take, N or MIN-MAX (default the family's: 256 for SD3, "
                   "512 for FLUX.1; runs with --max-sequence-length need plans covering it)"),
) -> None:
    """Build fp16 TensorRT plans per resolution profile for an engine directory."""
    wanted = tuple(c.strip() for c in components.split(",")) if components else None
    if not show_plan:
        _build_plans(engine_dir, resolution, dynamic, batch, guidance, wanted, optimization_level, refittable,
                     prompt_chunks, max_sequence_length)
        return
    from sdrt.engines import trt_dir

    cc = tuple(int(v) for v in compute_capability.split(".")) if compute_capability else None
    for p in trt_dir.plan(engine_dir, _profiles(engine_dir, resolution, dynamic, batch, guidance, prompt_chunks,
                                                max_sequence_length),
                          wanted, cc, trt_version):
        print(f"{p.component:<15} {p.profile.name():<28} {'exists ' if p.exists else 'to build'} {p.file}")


def _profiles(engine_dir: Path, resolution: list[str], dynamic: str | None, batch: str, guidance: bool,
              prompt_chunks: str = "1", max_sequence_length: str | None = None):
    from sdrt.engines import trt_profiles
    from sdrt.runtime.loader import open_dir

    d = open_dir(engine_dir)
    layout = d.info.layout
    if max_sequence_length is not None and d.info.family.value not in trt_profiles.T5_LENGTH:
        raise UserError(f"--max-sequence-length is for SD3 and FLUX.1 (T5); {engine_dir} is {d.info.family.value}")
    # FLUX.1 never batches for guidance (runtime/family.py): its plans are named and sized without it
    return trt_profiles.profiles(resolution, dynamic, batch, guidance and layout.guidance_batch,
                                 d.vae_scale_factor * d.latent_multiple, prompt_chunks, max_sequence_length)


def _build_plans(engine_dir: Path, resolution: list[str], dynamic: str | None, batch: str, guidance: bool,
                 components: tuple[str, ...] | None, optimization_level: int, refittable: bool,
                 prompt_chunks: str = "1", max_sequence_length: str | None = None) -> None:
    from sdrt.engines import trt_dir
    from sdrt.engines.tensorrt import device_info
    from sdrt.engines.trt_build import BuildOptions

    profiles = _profiles(engine_dir, resolution, dynamic, batch, guidance, prompt_chunks, max_sequence_length)
    cc, version = device_info()
    planned = trt_dir.plan(engine_dir, profiles, components, cc, version)
    options = BuildOptions(optimization_level=optimization_level, refittable=refittable,
                           timing_cache=Path(engine_dir) / "trt" / f"timing_cache_sm{cc[0]}{cc[1]}_trt{version}.cache")
    trt_dir.build(engine_dir, planned, options, cc, version,
                  lambda p, status: console.print(f"{p.component} {p.profile.name()}: {status}", highlight=False))
