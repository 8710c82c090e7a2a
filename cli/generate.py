"""`sdrt run`: options → one Request → validated Job → Pipeline → PNG files with their generation parameters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdrt.runtime import image_io
from sdrt.runtime.errors import UserError
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.presets import PRESETS
from sdrt.runtime.request import Request
from sdrt.runtime.loader import open_dir
from sdrt.runtime.validate import InvalidRequest, Job, validate

OnStep = Callable[[str, int, int], None]  # (stage, steps done, total)

# request field → how `sdrt run` spells it (InvalidRequest names fields, the CLI names its own flags)
FLAGS = {"prompt": "PROMPT", "denoising_end": "--refiner-start", "images_per_prompt": "--batch", "loras": "--lora",
         "embeddings": "--embedding", "controls": "--control", "adapter_name": "--adapter", "adapter_image": "--adapter",
         "adapter_scale": "--adapter"}


def flag(field: str) -> str:
    if field.startswith("controls["):  # controls[i].name / .scale / .image: the i-th --control
        return "--control"
    name = field.split(".")[-1]
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def as_cli_error(e: InvalidRequest) -> UserError:
    return UserError(f"{flag(e.field)} {e.message}")


@dataclass(frozen=True)
class RunOptions:
    engine_dir: Path
    prompts: tuple[str, ...]
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float = 0.0
    sampler: str | None = None
    schedule: str | None = None
    karras: bool = False
    seed: int = 0
    width: int | None = None
    height: int | None = None
    batch: int = 1
    init_image: Path | None = None
    strength: float | None = None
    mask: Path | None = None
    refiner: Path | None = None
    refiner_start: float = 0.8
    preset: str | None = None
    backend: str = "auto"
    out: Path = Path("sdrt.png")
    as_json: bool = False
    loras: tuple[tuple[str, float], ...] = ()  # (file or name, scale), applied at load (runtime/lora.py)
    lora_dir: Path | None = None  # where LoRA names and <lora:NAME:SCALE> prompt tags are looked up
    prompt_syntax: str = "a1111"  # a1111 | compel | plain (runtime/prompt_encode.py)
    clip_skip: int = 0
    embeddings: tuple[Path, ...] = ()  # textual-inversion files (runtime/embeddings.py); trigger = file stem
    embeddings_dir: Path | None = None  # every file in it is active, as in AUTOMATIC1111
    controls: tuple[str, ...] = ()  # "NAME=IMAGE[:SCALE]" (runtime/controlnet.py)
    control_start: float = 0.0
    control_end: float = 1.0
    guess_mode: bool = False
    ip_image: str | None = None  # "IMAGE[:SCALE]" (runtime/ip_adapter.py)
    adapter: str | None = None  # T2I-Adapter "NAME=IMAGE[:SCALE]" (runtime/t2i_adapter.py)


def parse_image_scale(text: str, flag: str) -> tuple[Path, float]:
    """`IMAGE[:SCALE]` → (path, scale)."""
    path, colon, scale = text.rpartition(":")
    if colon and path:
        try:
            return Path(path), float(scale)
        except ValueError:
            if Path(path).is_file() and not Path(text).exists():
                raise UserError(f"{flag} {text!r}: the scale {scale!r} is not a number") from None
    return Path(text), 1.0


def parse_control(text: str, flag: str = "--control") -> tuple[str, Path, float]:
    """`NAME=IMAGE[:SCALE]` → (name, image path, scale); the scale is checked by validation."""
    name, eq, rest = text.partition("=")
    if not eq or not name or not rest:
        raise UserError(f"{flag} {text!r}: give NAME=IMAGE or NAME=IMAGE:SCALE")
    return (name, *parse_image_scale(rest, flag))


def build_request(o: RunOptions) -> Request:
    if o.preset is not None and o.preset not in PRESETS:
        raise UserError(f"--preset {o.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    preset = PRESETS.get(o.preset)
    if o.karras and o.schedule not in (None, "karras"):
        raise UserError(f"--karras and --schedule {o.schedule} contradict each other; give one")
    return Request.of(
        prompt=o.prompts,
        negative_prompt=o.negative_prompt,
        steps=o.steps if o.steps is not None else (preset.steps if preset else 30),
        guidance=o.guidance if o.guidance is not None else (preset.guidance if preset else 7.5),
        guidance_rescale=o.guidance_rescale,
        sampler=o.sampler or (preset.sampler if preset else None),
        schedule="karras" if o.karras else o.schedule,
        timestep_spacing=preset.timestep_spacing if preset else None,
        prediction_type=preset.prediction_type if preset else None,
        seed=o.seed,
        width=o.width,
        height=o.height,
        batch=o.batch,
        init_image=image_io.load_image(o.init_image) if o.init_image else None,
        strength=o.strength,
        mask=image_io.load_image(o.mask, "L") if o.mask else None,
        denoising_end=o.refiner_start if o.refiner else None,
        loras=o.loras,
        prompt_syntax=o.prompt_syntax,
        clip_skip=o.clip_skip,
        embeddings=tuple(str(e) for e in o.embeddings),
        controls=tuple((name, image_io.load_image(path), scale) for name, path, scale in map(parse_control, o.controls)),
        control_start=o.control_start,
        control_end=o.control_end,
        guess_mode=o.guess_mode,
        **_ip_fields(o.ip_image),
        **_adapter_fields(o.adapter),
    )


def _adapter_fields(text: str | None) -> dict:
    if text is None:
        return {}
    name, path, scale = parse_control(text, "--adapter")
    return {"adapter_name": name, "adapter_image": image_io.load_image(path), "adapter_scale": scale}


def _ip_fields(text: str | None) -> dict:
    if text is None:
        return {}
    path, scale = parse_image_scale(text, "--ip-image")
    return {"ip_image": image_io.load_image(path), "ip_scale": scale}


def output_paths(out: Path, count: int) -> list[Path]:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file (got {out})")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


@dataclass(frozen=True)
class Written:
    path: Path
    seed: int
    prompt: str


def generate(o: RunOptions, on_step: OnStep = lambda stage, done, total: None) -> tuple[Job, list[Written]]:
    request = build_request(o)
    try:  # before any engine loads: bad input costs nothing and leaves nothing behind
        job = validate(request, open_dir(o.engine_dir), lora_dir=o.lora_dir,
                       embeddings_dir=o.embeddings_dir)
    except InvalidRequest as e:
        raise as_cli_error(e) from None
    paths = output_paths(o.out, job.count)
    image_io.check_writable(paths[0])
    pipe = Pipeline.load(o.engine_dir, backend=o.backend, lora_dir=o.lora_dir,
                         embeddings_dir=o.embeddings_dir)
    latents = _run(pipe, job, "base" if o.refiner else "denoise", on_step)
    decoder = pipe
    if o.refiner:
        refiner = Pipeline.load(o.refiner, backend=o.backend, embeddings_dir=o.embeddings_dir)
        follow = Request.of(prompt=job.prompt, negative_prompt=job.negative_prompt, steps=job.steps,
                            guidance=job.guidance, guidance_rescale=job.guidance_rescale, sampler=job.sampler,
                            schedule=job.schedule, seed=job.seed, batch=job.images_per_prompt, init_latents=latents,
                            denoising_start=o.refiner_start, prompt_syntax=job.syntax, clip_skip=job.clip_skip,
                            embeddings=tuple(str(e) for e in o.embeddings))
        try:
            follow_job = refiner.validate(follow)
        except InvalidRequest as e:
            raise as_cli_error(e) from None
        latents = _run(refiner, follow_job, "refiner", on_step)
        decoder = refiner
    images = decoder.decode(latents)
    width, height = images[0].size
    written = []
    for i, (image, path) in enumerate(zip(images, paths)):
        prompt = job.prompt[i // job.images_per_prompt]
        params = image_io.GenerationParameters(
            prompt=prompt, negative_prompt=o.negative_prompt or "", steps=job.steps, sampler=job.sampler_label,
            cfg_scale=job.guidance, seed=job.seeds[i], width=width, height=height, model=Path(o.engine_dir).name)
        written.append(Written(image_io.save_png(image, path, params), job.seeds[i], prompt))
    return job, written


def _run(pipe: Pipeline, job: Job, stage: str, on_step: OnStep):
    latents = None
    total = pipe.steps_to_run(job)
    for done, latents in enumerate(pipe.denoise(job), start=1):
        on_step(stage, done, total)
    return latents
