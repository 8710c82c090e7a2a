"""`sdrt run`: options → Request(s) → Pipeline → PNG files with their generation parameters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdrt.runtime import image_io
from sdrt.runtime.errors import UserError
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.presets import PRESETS

OnStep = Callable[[str, int, int], None]  # (stage, steps done, total)


@dataclass(frozen=True)
class RunOptions:
    engine_dir: Path
    prompts: tuple[str, ...]
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float = 0.0
    sampler: str | None = None
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


def build_request(o: RunOptions) -> Request:
    if o.preset is not None and o.preset not in PRESETS:
        raise UserError(f"unknown preset {o.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS.get(o.preset)
    if o.batch < 1:
        raise UserError(f"--batch must be at least 1 (got {o.batch})")
    if o.mask is not None and o.init_image is None:
        raise UserError("a mask needs an init image (--init-image) to inpaint")
    return Request(
        prompt=o.prompts,
        negative_prompt=(o.negative_prompt,) if o.negative_prompt is not None else None,
        steps=o.steps if o.steps is not None else (preset.steps if preset else 30),
        guidance=o.guidance if o.guidance is not None else (preset.guidance if preset else 7.5),
        guidance_rescale=o.guidance_rescale,
        sampler=o.sampler or (preset.sampler if preset else None),
        karras=o.karras,
        timestep_spacing=preset.timestep_spacing if preset else None,
        prediction_type=preset.prediction_type if preset else None,
        seed=o.seed,
        width=o.width,
        height=o.height,
        images_per_prompt=o.batch,
        init_image=image_io.load_image(o.init_image) if o.init_image else None,
        strength=o.strength,
        mask=image_io.load_image(o.mask, "L") if o.mask else None,
        denoising_end=o.refiner_start if o.refiner else None,
    )


def output_paths(out: Path, count: int) -> list[Path]:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file (got {out})")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def generate(o: RunOptions, on_step: OnStep = lambda stage, done, total: None) -> list[Path]:
    request = build_request(o)
    paths = output_paths(o.out, len(request.prompt) * request.images_per_prompt)
    image_io.check_writable(paths[0])
    pipe = Pipeline.load(o.engine_dir, backend=o.backend)
    pipe.check(request)
    latents = _run(pipe, request, "base" if o.refiner else "denoise", on_step)
    decoder = pipe
    if o.refiner:
        refiner = Pipeline.load(o.refiner, backend=o.backend)
        follow = Request(prompt=request.prompt, negative_prompt=request.negative_prompt, steps=request.steps,
                         guidance=request.guidance, guidance_rescale=request.guidance_rescale,
                         sampler=request.sampler, karras=request.karras, seed=request.seed,
                         init_latents=latents, denoising_start=o.refiner_start)
        latents = _run(refiner, follow, "refiner", on_step)
        decoder = refiner
    images = decoder.decode(latents)
    width, height = images[0].size
    sampler = pipe.sampler_name(request) + (" Karras" if request.karras else "")
    written = []
    for i, (image, path) in enumerate(zip(images, paths)):
        params = image_io.GenerationParameters(
            prompt=request.prompt[i // request.images_per_prompt],
            negative_prompt=o.negative_prompt or "", steps=request.steps, sampler=sampler,
            cfg_scale=request.guidance, seed=request.seed, width=width, height=height,
            model=Path(o.engine_dir).name)
        written.append(image_io.save_png(image, path, params))
    return written


def _run(pipe: Pipeline, request: Request, stage: str, on_step: OnStep):
    latents = None
    total = None
    for done, latents in enumerate(pipe.denoise(request), start=1):
        total = total or pipe.steps_to_run(request)
        on_step(stage, done, total)
    return latents
