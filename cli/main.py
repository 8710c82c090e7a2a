"""The `sdrt` command line: thin; turns options into config dataclasses and calls the library."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sdrt.runtime.errors import UserError
from sdrt.runtime.samplers.registry import NAMES as SAMPLER_NAMES

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Stable Diffusion inference runtime: export to ONNX/TensorRT, generate, benchmark.")
console = Console(stderr=True)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds through the exporter's cleanup like Ctrl-C


@app.command()
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
) -> None:
    """Export a Stable Diffusion pipeline to an optimum-compatible ONNX engine directory."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from sdrt.export.exporter import ExportConfig, export as run_export

    if trt:  # fail before minutes of export when the build could not run here
        from sdrt.engines.tensorrt import device_info

        if not resolution and not dynamic:
            raise UserError("--trt needs at least one --resolution WIDTHxHEIGHT or a --dynamic MIN-MAX range")
        device_info()

    adding = bool(controlnet or ip_adapter or image_encoder or t2i_adapter) and (Path(model) / "manifest.json").is_file()
    if adding and output is not None and Path(output).absolute() != Path(model).absolute():
        raise UserError(f"{model} is an engine directory: ControlNets and IP-Adapters are added into it; drop "
                        "-o/--output")
    if output is None:
        output = Path(model) if adding else Path(f"{Path(model.rstrip('/')).stem}-{precision}")
    cfg = ExportConfig(model=model, output=output, precision=precision, vae=vae, family=family,
                       components=tuple(c.strip() for c in components.split(",")) if components else None,
                       single_file_config=config, force=force, loras=_file_scale_args(lora, "--lora"),
                       textual_inversion=textual_inversion,
                       hypernetworks=_file_scale_args(hypernetwork, "--hypernetwork"),
                       tiny_vae=tiny_vae, deepcache=deepcache, controlnets=tuple(controlnet), ip_adapter=tuple(ip_adapter),
                       image_encoder=image_encoder, t2i_adapters=tuple(t2i_adapter))
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
                                       tuple(t2i_adapter))
        else:
            manifest = run_export(cfg, progress)
    if trt:
        _build_plans(output, resolution, dynamic, batch, guidance, None, 3, False)
    summary = summarize(manifest, output)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(f"engine directory: [bold]{Path(output).absolute()}[/] ({manifest['family']}, {manifest['precision']})")


def _file_scale_args(values: list[str], flag: str) -> tuple[tuple[str, float], ...]:
    """`FILE[:SCALE]` options → (file, scale) pairs; a scale that is not a finite number is a one-line error."""
    from sdrt.runtime.lora.adapters import LoraError, parse_lora_arg

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


@app.command()
def info(engine_dir: Path = typer.Argument(..., help="an engine directory written by `sdrt export` or optimum-cli")) -> None:
    """Print what an engine directory holds and which backends this machine can run it on."""
    from sdrt.cli.describe import describe

    d = describe(engine_dir)
    print(f"{d['engine_dir']}")
    kind = {"StableDiffusionUpscalePipeline": " (×4 upscaler: sdrt upscale)",
            "StableDiffusionDepth2ImgPipeline": " (depth-to-image)",
            "StableUnCLIPImg2ImgPipeline": " (unCLIP: sdrt variations)"}.get(d.get("pipeline_class"), "")
    print(f"family {d['family']}{' (inpaint)' if d['inpaint'] else ''}{kind}, prediction {d['prediction_type']}, "
          f"written by {d['writer']}")
    for name, c in d["components"].items():
        print(f"  {name:<15} {c['precision']:<17} gate {c['gate']}, worst {c['figure']}; files {', '.join(c['files'])}")
    print(f"TensorRT plans: {', '.join(d['plans']) if d['plans'] else 'none built'}")
    print(f"backends on this machine: {', '.join(d['backends'])}")


@app.command()
def run(
    engine_dir: Path = typer.Argument(..., help="engine directory written by `sdrt export` (or optimum-cli)"),
    prompt: list[str] = typer.Argument(..., help="one or more prompts"),
    negative_prompt: Optional[str] = typer.Option(None, help="negative prompt (used when guidance > 1)"),
    steps: Optional[int] = typer.Option(None, help="denoising steps [default: 30, or the preset's]"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale; <= 1 turns it off [default: 7.5]"),
    guidance_rescale: float = typer.Option(0.0, help="guidance rescale (0 = off)"),
    sampler: Optional[str] = typer.Option(None, help=f"sdrt's name ({', '.join(SAMPLER_NAMES)}) or "
                                           "AUTOMATIC1111's ('Euler a', 'DPM++ 2M Karras', …; `sdrt samplers` lists "
                                           "them) [default: the model's own scheduler]"),
    schedule: Optional[str] = typer.Option(None, help="sigma schedule: default, karras, exponential, beta, "
                                           "sgm_uniform, simple [default: the model's, or what --sampler names]"),
    karras: bool = typer.Option(False, help="Karras sigmas (same as --schedule karras)"),
    seed: int = typer.Option(0, help="image i uses seed + i (AUTOMATIC1111's convention), its own CPU torch.Generator; "
                                     "-1 picks a random seed [0 … 2**64-1]"),
    width: Optional[int] = typer.Option(None, help="image width in pixels"),
    height: Optional[int] = typer.Option(None, help="image height in pixels"),
    batch: int = typer.Option(1, help="images per prompt"),
    init_image: Optional[Path] = typer.Option(None, help="image to start from (img2img, inpaint)"),
    strength: Optional[float] = typer.Option(None, help="img2img strength in (0, 1]"),
    mask: Optional[Path] = typer.Option(None, help="inpainting mask (white = repaint); needs --init-image"),
    outpaint: Optional[str] = typer.Option(None, help="extend the init image's canvas and inpaint the new area: "
                                           "left=PX,right=PX,top=PX,bottom=PX (multiples of 8, omitted sides 0)"),
    outpaint_fill: Optional[str] = typer.Option(None, help="with --outpaint: what the new area starts from: edge "
                                                "(repeat the border), blur (blurred edge), noise [default: edge]"),
    outpaint_blur: Optional[int] = typer.Option(None, help="with --outpaint: soft border in pixels: the seam's band "
                                                "is repainted and blended back [default: 0]"),
    depth_map: Optional[Path] = typer.Option(None, help="depth-to-image models: the depth (any grayscale image, "
                                             "16-bit PNG too; brighter = nearer, as DPT predicts) [default: the exported "
                                             "depth estimator's, on --init-image]"),
    then_upscale: Optional[Path] = typer.Option(None, help="×4 upscaler engine directory: each image is then "
                                                "upscaled with its own prompt, seed, steps and guidance"),
    noise_level: Optional[int] = typer.Option(None, help="the ×4 upscaler's noise level (with --then-upscale, or on "
                                              "an upscaler directory) [default: 20]"),
    refiner: Optional[Path] = typer.Option(None, help="SDXL refiner engine directory to hand off to"),
    refiner_start: float = typer.Option(0.8, help="fraction of denoising done by the base before the refiner"),
    preset: Optional[str] = typer.Option(None, help="lightning-1step|lightning-2step|lightning-4step|lightning-8step|turbo"),
    backend: str = typer.Option("auto", help="auto|tensorrt|ort-cuda|ort-cpu|torch"),
    out: Path = typer.Option(Path("sdrt.png"), "-o", "--out", help="PNG to write (index appended for several images)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of the images written, each with its seed"),
    lora: list[str] = typer.Option([], "--lora", help="FILE[:SCALE] or NAME[:SCALE] (in --lora-dir): a LoRA applied "
                                                     "at load, without re-exporting (repeatable)"),
    lora_dir: Optional[Path] = typer.Option(None, help="folder of LoRA .safetensors files, for --lora NAME and "
                                                       "<lora:NAME:SCALE> tags in prompts"),
    prompt_syntax: str = typer.Option("a1111", help="a1111: (word:1.2), square brackets, BREAK, prompts over 75 tokens in "
                                                    "chunks; compel: word++, (words)1.2, .blend(), .and(); plain: "
                                                    "diffusers' (no syntax, truncated at 77 tokens)"),
    clip_skip: int = typer.Option(0, help="use the text encoder's output this many layers before the last "
                                          "(diffusers' numbering: AUTOMATIC1111's 'Clip skip 2' is 1)"),
    embedding: list[Path] = typer.Option([], "--embedding", help="textual-inversion file (.safetensors, .pt, "
                                                                ".bin), triggered by its file name (repeatable)"),
    embeddings_dir: Optional[Path] = typer.Option(None, help="folder of textual-inversion files, all usable by "
                                                             "their file names"),
    vae: str = typer.Option("full", help="full|tiny: decode (and encode --init-image) with the tiny VAE exported "
                                         "by `sdrt export --tiny-vae` (TAESD: faster, fudges fine detail)"),
    preview: bool = typer.Option(False, help="also write every step's latents, decoded by the tiny VAE, as "
                                             "OUT-step-K.png"),
    ort_cache: bool = typer.Option(False, "--ort-cache", help="ONNX Runtime CPU: save each graph as ONNX Runtime "
                                   "optimized it (DIR/<component>/ort-optimized/) and load that next time: shorter "
                                   "later starts, the same images, about twice the disk"),
    cache_interval: int = typer.Option(1, help="step caching (DeepCache, needs `sdrt export --deepcache`): the whole "
                                               "UNet every N steps, only its last layer between; 1 = off"),
    vae_tiling: str = typer.Option("auto", help="auto|on|off: decode (and encode) the full VAE in overlapping tiles "
                                                "as diffusers' vae.enable_tiling(); auto tiles when the whole image "
                                                "would not fit the memory limit"),
    control: list[str] = typer.Option([], "--control", help="NAME=IMAGE[:SCALE]: a ControlNet the engine directory "
                                                           "holds and its control image (repeatable; summed in order)"),
    control_window: list[str] = typer.Option([], "--control-window", help="NAME=START:END: that ControlNet's own "
                                             "window (fractions of the steps), instead of --control-start/--control-end"),
    control_start: float = typer.Option(0.0, help="fraction of the steps before the ControlNets start"),
    control_end: float = typer.Option(1.0, help="fraction of the steps after which the ControlNets stop"),
    control_preprocess: Optional[str] = typer.Option(None, help="canny[:LOW:HIGH]: turn each control image (a photo) "
                                                                "into a canny edge map first (needs sdrt[canny])"),
    guess_mode: bool = typer.Option(False, "--guess-mode", help="ControlNet guess mode: the nets see only the "
                                                               "conditional prompt, residuals scaled 0.1…1 by depth"),
    ip_image: list[str] = typer.Option([], "--ip-image", help="[NAME=]IMAGE[:SCALE]: an image prompt for the "
                                                               "directory's IP-Adapter (scale default 1); repeatable: "
                                                               "the adapter sees all its images, with one scale; "
                                                               "NAME= picks one of several adapters"),
    adapter: Optional[str] = typer.Option(None, help="NAME=IMAGE[:SCALE]: a T2I-Adapter the directory holds and its "
                                                     "condition image"),
) -> None:
    """Generate images from an engine directory.

    Seeds are per image: image i of a run seeded s uses seed s + i, so a batch gives the same images as
    separate runs. Sizes: any multiple of the VAE scale factor (8) that fits the memory limit.
    """
    import logging

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sdrt.cli.generate import RunOptions, generate

    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    options = RunOptions(engine_dir=engine_dir, prompts=tuple(prompt), negative_prompt=negative_prompt, steps=steps,
                         guidance=guidance, guidance_rescale=guidance_rescale, sampler=sampler, schedule=schedule, karras=karras,
                         seed=seed,
                         width=width, height=height, batch=batch, init_image=init_image, strength=strength, mask=mask,
                         outpaint=outpaint, outpaint_fill=outpaint_fill, outpaint_blur=outpaint_blur,
                         depth_map=depth_map, then_upscale=then_upscale, noise_level=noise_level,
                         refiner=refiner, refiner_start=refiner_start, preset=preset, backend=backend, out=out,
                         as_json=as_json, loras=_file_scale_args(lora, "--lora"), lora_dir=lora_dir,
                         prompt_syntax=prompt_syntax, clip_skip=clip_skip, embeddings=tuple(embedding),
                         embeddings_dir=embeddings_dir, vae=vae, preview=preview,
                         vae_tiling=vae_tiling, ort_cache=ort_cache, cache_interval=cache_interval,
                         controls=tuple(control), control_windows=tuple(control_window), control_start=control_start,
                         control_end=control_end, guess_mode=guess_mode, control_preprocess=control_preprocess,
                         ip_image=tuple(ip_image), adapter=adapter)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_step(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        job, written = generate(options, on_step)
    if as_json:
        print(json.dumps([{"path": str(w.path), "seed": w.seed, "prompt": w.prompt, "sampler": job.sampler,
                           "schedule": job.schedule, "steps": job.steps, "guidance": job.guidance,
                           "width": w.size[0], "height": w.size[1]} for w in written], indent=2))
        return
    for w in written:
        print(w.path)


def _print_image_results(job, written, as_json: bool) -> None:
    """`sdrt upscale` / `sdrt variations`: the PNGs written, or with --json their seeds, noise level and sizes."""
    if as_json:
        print(json.dumps([{"path": str(w.path), "seed": w.seed, "prompt": w.prompt, "noise_level": job.noise_level,
                           "steps": job.steps, "width": w.size[0], "height": w.size[1]} for w in written], indent=2))
        return
    for w in written:
        print(w.path)


@app.command()
def upscale(
    engine_dir: Path = typer.Argument(..., help="engine directory of the ×4 upscaler (sdrt export of "
                                                "stabilityai/stable-diffusion-x4-upscaler or another "
                                                "StableDiffusionUpscalePipeline)"),
    image: Path = typer.Argument(..., help="the low-resolution image; the output is 4× its size"),
    prompt: str = typer.Argument(..., help="what the image shows"),
    noise_level: int = typer.Option(20, help="noise added to the low-resolution image (0 … the model's "
                                             "max_noise_level, 350 for the SD upscaler)"),
    negative_prompt: Optional[str] = typer.Option(None, help="negative prompt (used when guidance > 1)"),
    steps: int = typer.Option(75, help="denoising steps (diffusers' default for this pipeline)"),
    guidance: float = typer.Option(9.0, help="classifier-free guidance scale (diffusers' default for this pipeline)"),
    sampler: Optional[str] = typer.Option(None, help="as for `sdrt run` [default: the model's own scheduler]"),
    seed: int = typer.Option(0, help="image i uses seed + i; -1 picks a random seed"),
    batch: int = typer.Option(1, help="images"),
    backend: str = typer.Option("auto", help="auto|tensorrt|ort-cuda|ort-cpu|torch"),
    out: Path = typer.Option(Path("sdrt-upscaled.png"), "-o", "--out", help="PNG to write"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of the images written"),
) -> None:
    """Upscale an image ×4 with Stable Diffusion's upscaler (StableDiffusionUpscalePipeline), guided by a prompt."""
    from sdrt.cli.generate import RunOptions, generate

    options = RunOptions(engine_dir=engine_dir, prompts=(prompt,), negative_prompt=negative_prompt, steps=steps,
                         guidance=guidance, sampler=sampler, seed=seed, batch=batch, init_image=image,
                         noise_level=noise_level, needs="upscale", backend=backend, out=out, as_json=as_json)
    _print_image_results(*generate(options), as_json)


@app.command()
def variations(
    engine_dir: Path = typer.Argument(..., help="engine directory of an unCLIP model (sdrt export of "
                                                "stabilityai/stable-diffusion-2-1-unclip or another "
                                                "StableUnCLIPImg2ImgPipeline)"),
    image: Path = typer.Argument(..., help="the image to make variations of (it enters as its CLIP embedding)"),
    prompt: str = typer.Argument("", help="optional text to steer the variations"),
    noise_level: int = typer.Option(0, help="noise added to the image embedding (0 … 999): more, more varied"),
    negative_prompt: Optional[str] = typer.Option(None, help="negative prompt (used when guidance > 1)"),
    steps: int = typer.Option(20, help="denoising steps (diffusers' default for this pipeline)"),
    guidance: float = typer.Option(10.0, help="classifier-free guidance scale (diffusers' default for this pipeline)"),
    sampler: Optional[str] = typer.Option(None, help="as for `sdrt run` [default: the model's own scheduler]"),
    width: Optional[int] = typer.Option(None, help="output width [default: the model's size]"),
    height: Optional[int] = typer.Option(None, help="output height [default: the model's size]"),
    seed: int = typer.Option(0, help="variation i uses seed + i; -1 picks a random seed"),
    batch: int = typer.Option(4, help="how many variations"),
    backend: str = typer.Option("auto", help="auto|tensorrt|ort-cuda|ort-cpu|torch"),
    out: Path = typer.Option(Path("sdrt-variation.png"), "-o", "--out", help="PNG to write (index appended for "
                                                                              "several)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of the images written"),
) -> None:
    """Variations of an image with Stable Diffusion 2.1 unCLIP (StableUnCLIPImg2ImgPipeline)."""
    from sdrt.cli.generate import RunOptions, generate

    options = RunOptions(engine_dir=engine_dir, prompts=(prompt,), negative_prompt=negative_prompt, steps=steps,
                         guidance=guidance, sampler=sampler, seed=seed, batch=batch, width=width, height=height,
                         init_image=image, noise_level=noise_level, needs="variations", backend=backend, out=out,
                         as_json=as_json)
    _print_image_results(*generate(options), as_json)


@app.command()
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
) -> None:
    """Build fp16 TensorRT plans per resolution profile for an engine directory."""
    wanted = tuple(c.strip() for c in components.split(",")) if components else None
    if not show_plan:
        _build_plans(engine_dir, resolution, dynamic, batch, guidance, wanted, optimization_level, refittable,
                     prompt_chunks)
        return
    from sdrt.engines import trt_dir

    cc = tuple(int(v) for v in compute_capability.split(".")) if compute_capability else None
    for p in trt_dir.plan(engine_dir, _profiles(engine_dir, resolution, dynamic, batch, guidance, prompt_chunks),
                          wanted, cc, trt_version):
        print(f"{p.component:<15} {p.profile.name():<28} {'exists ' if p.exists else 'to build'} {p.file}")


def _profiles(engine_dir: Path, resolution: list[str], dynamic: str | None, batch: str, guidance: bool,
              prompt_chunks: str = "1"):
    from sdrt.engines import trt_profiles
    from sdrt.runtime.loader import open_dir

    d = open_dir(engine_dir)
    return trt_profiles.profiles(resolution, dynamic, batch, guidance, d.vae_scale_factor * d.latent_multiple,
                                 prompt_chunks)


def _build_plans(engine_dir: Path, resolution: list[str], dynamic: str | None, batch: str, guidance: bool,
                 components: tuple[str, ...] | None, optimization_level: int, refittable: bool,
                 prompt_chunks: str = "1") -> None:
    from sdrt.engines import trt_dir
    from sdrt.engines.tensorrt import device_info
    from sdrt.engines.trt_build import BuildOptions

    profiles = _profiles(engine_dir, resolution, dynamic, batch, guidance, prompt_chunks)
    cc, version = device_info()
    planned = trt_dir.plan(engine_dir, profiles, components, cc, version)
    options = BuildOptions(optimization_level=optimization_level, refittable=refittable,
                           timing_cache=Path(engine_dir) / "trt" / f"timing_cache_sm{cc[0]}{cc[1]}_trt{version}.cache")
    trt_dir.build(engine_dir, planned, options, cc, version,
                  lambda p, status: console.print(f"{p.component} {p.profile.name()}: {status}", highlight=False))


@app.command()
def samplers(as_json: bool = typer.Option(False, "--json", help="print the table as JSON")) -> None:
    """List the samplers: sdrt's name, AUTOMATIC1111's names, the diffusers scheduler each equals, and more.

    --sampler takes any name in the first two columns (case and spacing do not matter). A name with a schedule
    suffix ("DPM++ 2M Karras") selects that schedule; otherwise --schedule does (default: the model's).
    """
    from rich.table import Table

    from sdrt.runtime.samplers.registry import REGISTRY, display_names

    rows = [{"name": s.name, "a1111": list(display_names(s)), "diffusers": s.diffusers_class,
             "diffusers_config": dict(s.diffusers_config), "stochastic": s.stochastic,
             "schedules": ["default", "sgm_uniform", *s.conversions], "description": s.description}
            for s in REGISTRY.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="sdrt samplers", caption="every sampler also takes --schedule default and sgm_uniform "
                                                 "(= simple); `sdrt samplers --json` has the diffusers configs")
    for column in ("name", "AUTOMATIC1111 names", "diffusers scheduler", "noise", "sigma schedules"):
        table.add_column(column, no_wrap=column == "name")
    for r in rows:
        config = " ".join(f"{k}={v}" for k, v in r["diffusers_config"].items())
        table.add_row(r["name"], "\n".join(r["a1111"]) or "-",
                      r["diffusers"].removesuffix("Scheduler") + (f"\n{config}" if config else ""),
                      "random" if r["stochastic"] else "-", ", ".join(r["schedules"][2:]) or "-")
    Console().print(table)


@app.command()
def grid(
    engine_dir: Path = typer.Argument(..., help="engine directory written by `sdrt export`"),
    prompt: str = typer.Argument(..., help="the prompt (an axis `prompt=…` replaces it per cell)"),
    x: Optional[str] = typer.Option(None, "--x", help="FIELD=V1,V2,… across the columns, e.g. sampler=\"Euler a,UniPC\""),
    y: Optional[str] = typer.Option(None, "--y", help="FIELD=V1,V2,… down the rows, e.g. steps=4,8,20"),
    z: Optional[str] = typer.Option(None, "--z", help="FIELD=V1,V2,…: one sub-grid per value, e.g. seed=1,2"),
    negative_prompt: Optional[str] = typer.Option(None, help="negative prompt"),
    steps: Optional[int] = typer.Option(None, help="steps where no axis sets them [default: 30, or the preset's]"),
    guidance: Optional[float] = typer.Option(None, help="guidance scale [default: 7.5, or the preset's]"),
    sampler: Optional[str] = typer.Option(None, help="sampler where no axis sets it (`sdrt samplers`)"),
    schedule: Optional[str] = typer.Option(None, help="sigma schedule where no axis sets it"),
    seed: int = typer.Option(0, help="seed where no axis sets it"),
    width: Optional[int] = typer.Option(None, help="image width in pixels"),
    height: Optional[int] = typer.Option(None, help="image height in pixels"),
    preset: Optional[str] = typer.Option(None, help="lightning-1step|lightning-2step|lightning-4step|lightning-8step|turbo"),
    max_batch: int = typer.Option(4, help="images per engine batch (compatible cells share batches)"),
    backend: str = typer.Option("auto", help="auto|tensorrt|ort-cuda|ort-cpu|torch"),
    out: Path = typer.Option(Path("grid.png"), "-o", "--out", help="grid PNG; the cells go to <name>-cells/"),
) -> None:
    """AUTOMATIC1111's X/Y/Z plot: every combination of the axes' values, one labelled grid."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sdrt.cli.generate import RunOptions, build_request
    from sdrt.cli.grid import parse_axis, run_grid
    from sdrt.runtime.pipeline import Pipeline

    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1 (got {max_batch})")
    axes = [parse_axis(f"--{name}", text) for name, text in (("x", x), ("y", y), ("z", z)) if text]
    if not axes:
        raise UserError("give at least one axis: --x FIELD=V1,V2,… (and --y, --z)")
    base_request = build_request(RunOptions(engine_dir=engine_dir, prompts=(prompt,), negative_prompt=negative_prompt,
                                            steps=steps, guidance=guidance, sampler=sampler, schedule=schedule,
                                            seed=seed, width=width, height=height, preset=preset))
    base = {k: v for group in base_request.to_dict().values() for k, v in group.items()}
    base = {("prompt" if k == "text" else "negative_prompt" if k == "negative" else k): v for k, v in base.items()}
    pipe = Pipeline.load(engine_dir, backend=backend)
    with Progress(TextColumn("cells"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("cells", total=None)
        path, cells = run_grid(pipe, base, axes, out, Path(engine_dir).name, max_batch,
                               lambda done, total: bar.update(task, completed=done, total=total))
    print(path)


@app.command(name="triton-repo")
def triton_repo(
    engine_dir: Path = typer.Argument(..., help="engine directory written by `sdrt export`"),
    output: Path = typer.Option(..., "-o", "--output", help="model repository to write (Triton's --model-repository)"),
    name: Optional[str] = typer.Option(None, help="model name (default: the engine directory's name)"),
    max_batch: int = typer.Option(4, help="Triton's max_batch_size: images per engine batch"),
    instances: int = typer.Option(1, help="model instances (one Python process each) per device"),
    kind: str = typer.Option("auto", help="cpu|gpu|auto: the instance group's kind (auto: GPU where Triton sees one)"),
    backend: str = typer.Option("auto", help="sdrt backend inside the model: auto|tensorrt|ort-cuda|ort-cpu|torch"),
    copy_engine: bool = typer.Option(False, "--copy-engine", help="copy the engine directory into the repository "
                                                                  "instead of naming its absolute path"),
    queue_delay_ms: float = typer.Option(10.0, help="how long Triton's dynamic batcher gathers a batch"),
    queue_timeout: float = typer.Option(300.0, help="seconds a request may wait in Triton's queue before it is rejected"),
    max_queue_size: int = typer.Option(64, help="requests Triton queues before it rejects new ones"),
    warmup: bool = typer.Option(True, help="add model_warmup, so that the model is ready only once warm"),
    force: bool = typer.Option(False, help="write into a non-empty repository (replacing NAME there)"),
) -> None:
    """Write a Triton model repository whose Python-backend model drives sdrt's batching service."""
    from sdrt.serve.triton.repo import RepoOptions, write_repo

    written = write_repo(RepoOptions(engine_dir=engine_dir, repo=output, name=name, max_batch=max_batch,
                                     instances=instances, kind=kind, backend=backend, copy_engine=copy_engine,
                                     force=force, queue_delay_ms=queue_delay_ms, queue_timeout_s=queue_timeout,
                                     max_queue_size=max_queue_size, warmup=warmup))
    print(written.model_dir)


@app.command()
def serve(
    engine_dir: Path = typer.Argument(..., help="engine directory written by `sdrt export`"),
    host: str = typer.Option("127.0.0.1", help="address to bind; the default answers this machine only"),
    port: int = typer.Option(7860, help="port to listen on (0: any free port; the URL printed says which)"),
    max_batch: int = typer.Option(4, help="images per engine batch (concurrent compatible requests share it)"),
    max_wait_ms: float = typer.Option(10.0, help="how long a request waits for batch-mates"),
    queue_size: int = typer.Option(64, help="queued requests; more are answered 429 with Retry-After"),
    timeout_s: float = typer.Option(300.0, help="per-request deadline in seconds, queue wait included; 504 past "
                                                "it (0: none)"),
    api_key_env: Optional[str] = typer.Option(None, help="environment variable holding an API key; clients then "
                                                         "send `Authorization: Bearer KEY`"),
    max_body_mb: float = typer.Option(32.0, help="largest request body in MiB; 413 above"),
    backend: str = typer.Option("auto", help="auto|tensorrt|ort-cuda|ort-cpu|torch"),
    warmup: bool = typer.Option(True, help="run one small generation before /readyz reports ready"),
    log_level: str = typer.Option("info", help="uvicorn's log level: critical|error|warning|info|debug"),
    lora_dir: Optional[Path] = typer.Option(None, help="folder of LoRA .safetensors files that requests may name "
                                                       "(`loras`, `<lora:NAME:SCALE>`), by file stem"),
    embeddings_dir: Optional[Path] = typer.Option(None, help="folder of textual inversions every prompt may use "
                                                             "(trigger word: the file's stem)"),
) -> None:
    """Serve an engine directory over HTTP: OpenAI Images, AUTOMATIC1111's /sdapi/v1, health and metrics.

    One batching service per process; SIGTERM lets in-flight requests finish and exits 0.
    """
    import os

    from sdrt.runtime.loader import open_dir
    from sdrt.serve.app import ServeConfig, serve as run_server

    if max_batch < 1 or queue_size < 1 or max_wait_ms < 0 or max_body_mb <= 0 or timeout_s < 0:
        raise UserError("--max-batch and --queue-size must be at least 1, --max-wait-ms and --timeout-s at least 0, "
                        "--max-body-mb above 0")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env, "")
        if not api_key:
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
    open_dir(engine_dir)  # a folder that is no engine directory fails here, before binding
    for flag, folder in (("--lora-dir", lora_dir), ("--embeddings-dir", embeddings_dir)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{flag} {folder}: not a directory; give the folder that holds the files")
    config = ServeConfig(engine_dir=engine_dir, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
                         timeout_s=timeout_s or None, api_key=api_key, max_body_bytes=int(max_body_mb * 2 ** 20),
                         backend=backend, warmup=warmup, lora_dir=lora_dir, embeddings_dir=embeddings_dir)
    code = run_server(config, host=host, port=port, log_level=log_level,
                      announce=lambda line: print(line, flush=True))
    if code:
        raise typer.Exit(code)


def _register_bench() -> None:
    from sdrt.cli.bench_cmd import bench  # options only; the harness is imported when the command runs

    app.command(name="bench")(bench)


_register_bench()


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A shell that starts us in the background sets SIGINT to "ignore"; Ctrl-C / kill -INT must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app()
        code = 0
    except SystemExit as e:  # typer ends every command this way
        code = e.code
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        console.print("interrupted; nothing was left on disk", highlight=False)
        code = 130
    _exit_without_teardown(code)


def _exit_without_teardown(code) -> None:
    """End the process once the command is done, without the interpreter's own teardown: with torch and ONNX
    Runtime loaded, freeing every module and object at exit took ≈ 0.4 s of a 2.5 s `sdrt run` on this CPU
    (`python -c "import torch"` 1.40 s against 1.00 s with os._exit). Exit handlers still run (logging, weakref
    finalizers such as temporary folders), the standard streams are flushed, and everything sdrt writes is already
    closed and renamed into place. With another non-daemon thread still running, Python's normal exit (which waits
    for it) is kept."""
    import atexit
    import os
    import threading

    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    code = 0 if code is None else int(code)
    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written anyway
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
