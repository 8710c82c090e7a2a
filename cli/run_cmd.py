"""`sdrt run`, `sdrt upscale`, `sdrt variations` and `sdrt grid`: options → RunOptions → sdrt.cli.generate.

The pipeline is imported when a command runs (sdrt.cli.generate loads it at import).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand
from rich.console import Console

from sdrt.cli.export_cmd import file_scale_args
from sdrt.runtime.errors import UserError

console = Console(stderr=True)


SAMPLER_HELP = ("sdrt's name ({names}) or AUTOMATIC1111's ('Euler a', 'DPM++ 2M Karras', …; `sdrt samplers` lists "
                "them) [default: the model's own scheduler]")


class RunCommand(TyperCommand):
    """`sdrt run`, whose --sampler help lists every name in the sampler registry. The names are read when the help
    is drawn: the registry imports torch, which `sdrt --help`, `sdrt info` and the like should not pay for."""

    def format_help(self, ctx, formatter):
        from sdrt.runtime.samplers.registry import NAMES

        for param in self.params:
            if param.name == "sampler":
                param.help = SAMPLER_HELP.format(names=", ".join(NAMES))
        return super().format_help(ctx, formatter)


def run(
    engine_dir: Path = typer.Argument(..., help="engine directory written by `sdrt export` (or optimum-cli)"),
    prompt: list[str] = typer.Argument(..., help="one or more prompts"),
    negative_prompt: Optional[str] = typer.Option(None, help="negative prompt (used when guidance > 1)"),
    steps: Optional[int] = typer.Option(None, help="denoising steps [default: 30, or the preset's]"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale; <= 1 turns it off [default: 7.5]"),
    guidance_rescale: float = typer.Option(0.0, help="guidance rescale (0 = off)"),
    sampler: Optional[str] = typer.Option(None, help=SAMPLER_HELP.format(names="see `sdrt samplers`")),
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
    preset: Optional[str] = typer.Option(None, help="lightning-1step|lightning-2step|lightning-4step|lightning-8step|"
                                                    "turbo|flux-schnell|sd35-turbo|pulid-lightning"),
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
    max_sequence_length: Optional[int] = typer.Option(None, help="SD3 / SD3.5: T5 tokens per prompt (diffusers' "
                                                                 "default 256, at most 512)"),
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
    instantid_face: Optional[Path] = typer.Option(None, help="InstantID: the face's raw insightface embedding "
                                                  "(`embedding`, not `normed_embedding`) as .npy, shape [512] or [1, 512]"
                                                  ", or a photo of the face (needs --face-models; its keypoints too)"),
    instantid_kps: Optional[Path] = typer.Option(None, help="InstantID: the face's 5 keypoints as .npy [5, 2] (pixels "
                                                 "of the output image; drawn as InstantID does, needs OpenCV) or the "
                                                 "keypoint image (.png)"),
    identitynet_scale: float = typer.Option(0.8, help="InstantID: IdentityNet's ControlNet scale"),
    instantid_ip_scale: float = typer.Option(0.8, help="InstantID: its IP-Adapter's scale"),
    enhance_face_region: bool = typer.Option(False, help="InstantID: its demo's \"enhance non-face region\" (on "
                                             "there): IdentityNet and the adapter act inside the face box only"),
    instantid_bbox: Optional[str] = typer.Option(None, help="InstantID: X1,Y1,X2,Y2, the face box in output pixels "
                                                 "for --enhance-face-region (default with a face photo and no "
                                                 "--instantid-kps: the photo's face)"),
    pulid_id: Optional[Path] = typer.Option(None, help="PuLID: the identity, as .npz with the ID encoder's inputs "
                                            "(embedding: raw insightface [512], eva_embedding [768], eva_hidden "
                                            "[5, 577, 1024]) or .npy with its output, the ID tokens [T, 2048]"),
    pulid_photo: Optional[Path] = typer.Option(None, help="PuLID: a photo of the face (needs --face-models); alone, "
                                               "all of the ID encoder's inputs come from it (needs an export with "
                                               "--pulid-eva and --pulid-parsing); with a --pulid-id .npz, its "
                                               "insightface embedding replaces the .npz's `embedding`"),
    pulid_scale: float = typer.Option(0.8, help="PuLID: the ID scale (the authors' 0.8)"),
    pulid_mode: str = typer.Option("fidelity", help="PuLID: fidelity (8 zero tokens, ORTHO_v2), style (the app's "
                                                    "'extremely style': 16, ORTHO) or plain"),
    pulid_start_step: int = typer.Option(0, help="PuLID: the step from which the ID attention acts (0: all, as the "
                                                 "authors on SDXL)"),
    pulid_zero_tokens: Optional[int] = typer.Option(None, help="PuLID: zero tokens appended to the ID tokens "
                                                    "(default: v1 8 fidelity / 16 style / 0 plain, v1.1 20)"),
    photomaker_image: list[Path] = typer.Option([], "--photomaker-image", help="PhotoMaker: a photo of the person "
                                                "(repeatable: the photos stack, more give more fidelity); the prompt "
                                                "holds the trigger word after the class word, e.g. 'a man img'"),
    photomaker_trigger: str = typer.Option("img", help="PhotoMaker: the trigger word (the authors' 'img')"),
    photomaker_style_strength: float = typer.Option(20.0, help="PhotoMaker: style strength in % (the authors' 20; "
                                                    "30-50 for stylisation): the first int(strength/100 · steps) "
                                                    "steps, at most 30, see the prompt without the identity"),
    photomaker_faces: Optional[Path] = typer.Option(None, help="PhotoMaker v2: each photo's raw insightface "
                                                    "embedding (`embedding`, not `normed_embedding`) as .npy [N, 512], "
                                                    "in the order of the --photomaker-image photos; without it, "
                                                    "read from the photos with --face-models"),
    face_models: Optional[Path] = typer.Option(None, help="a folder of insightface's ONNX models (antelopev2 for "
                                               "InstantID and PuLID, buffalo_l for PhotoMaker v2; non-commercial "
                                               "research licence) to read faces from photos"),
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
                         as_json=as_json, loras=file_scale_args(lora, "--lora"), lora_dir=lora_dir,
                         prompt_syntax=prompt_syntax, clip_skip=clip_skip, embeddings=tuple(embedding),
                         max_sequence_length=max_sequence_length,
                         embeddings_dir=embeddings_dir, vae=vae, preview=preview,
                         vae_tiling=vae_tiling, ort_cache=ort_cache, cache_interval=cache_interval,
                         controls=tuple(control), control_windows=tuple(control_window), control_start=control_start,
                         control_end=control_end, guess_mode=guess_mode, control_preprocess=control_preprocess,
                         ip_image=tuple(ip_image), adapter=adapter, instantid_face=instantid_face,
                         instantid_kps=instantid_kps, identitynet_scale=identitynet_scale,
                         instantid_ip_scale=instantid_ip_scale, enhance_face_region=enhance_face_region,
                         instantid_bbox=instantid_bbox, pulid_id=pulid_id, pulid_photo=pulid_photo,
                         pulid_scale=pulid_scale,
                         pulid_mode=pulid_mode, pulid_start_step=pulid_start_step,
                         pulid_zero_tokens=pulid_zero_tokens,
                         photomaker_images=tuple(photomaker_image), photomaker_trigger=photomaker_trigger,
                         photomaker_style_strength=photomaker_style_strength, photomaker_faces=photomaker_faces,
                         face_models=face_models)
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
    preset: Optional[str] = typer.Option(None, help="lightning-1step|lightning-2step|lightning-4step|lightning-8step|"
                                                    "turbo|flux-schnell|sd35-turbo|pulid-lightning"),
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
