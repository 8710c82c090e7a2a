"""`sdrt run`: options → one Request → validated Job → Pipeline → PNG files with their generation parameters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdrt.runtime import image_io
from sdrt.runtime.errors import UserError
from sdrt.runtime.pipeline import Generation, Pipeline
from sdrt.runtime.samplers.presets import PRESETS
from sdrt.runtime.request import Request
from sdrt.runtime.loader import open_dir
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.job import Job
from sdrt.runtime.validate import validate

OnStep = Callable[[str, int, int], None]  # (stage, steps done, total)

# request field → how `sdrt run` spells it (InvalidRequest names fields, the CLI names its own flags)
FLAGS = {"prompt": "PROMPT", "denoising_end": "--refiner-start", "images_per_prompt": "--batch", "loras": "--lora",
         "embeddings": "--embedding", "controls": "--control", "adapter_name": "--adapter", "adapter_image": "--adapter",
         "adapter_scale": "--adapter", "photomaker_images": "--photomaker-image"}


UPSCALE_FLAGS = {"init_image": "IMAGE"}  # `sdrt upscale DIR IMAGE PROMPT`, `sdrt variations DIR IMAGE`
# commands that need one kind of engine directory: (ModelInfo property, what to export for it)
KINDS = {"upscale": ("upscaler", "a ×4 upscaler's engine directory (sdrt export of a StableDiffusionUpscalePipeline "
                                 "such as stabilityai/stable-diffusion-x4-upscaler)"),
         "variations": ("unclip", "an unCLIP engine directory (sdrt export of a StableUnCLIPImg2ImgPipeline such as "
                                  "stabilityai/stable-diffusion-2-1-unclip)")}


def flag(field: str, flags: dict = FLAGS) -> str:
    if field.startswith("controls["):  # controls[i].name / .scale / .image: the i-th --control
        return "--control"
    name = field.split(".")[-1]
    return flags.get(name, "--" + name.replace("_", "-"))


def as_cli_error(e: InvalidRequest, upscale: bool = False) -> UserError:
    return UserError(f"{flag(e.field, FLAGS | UPSCALE_FLAGS if upscale else FLAGS)} {e.message}")


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
    outpaint: str | None = None  # "left=64,right=64,top=0,bottom=32" (runtime/tasks/outpaint.py)
    outpaint_fill: str | None = None  # edge | blur | noise
    outpaint_blur: int | None = None  # soft border, pixels
    noise_level: int | None = None  # the ×4 upscaler's (runtime/tasks/upscale.py)
    depth_map: Path | None = None  # depth-to-image's depth (runtime/tasks/depth.py); None: the estimator runs
    needs: str | None = None  # `sdrt upscale` / `sdrt variations`: the kind the engine directory must hold (KINDS)
    then_upscale: Path | None = None  # `sdrt run --then-upscale DIR`: each image goes through this ×4 upscaler
    refiner: Path | None = None
    refiner_start: float = 0.8
    preset: str | None = None
    backend: str = "auto"
    out: Path = Path("sdrt.png")
    as_json: bool = False
    loras: tuple[tuple[str, float], ...] = ()  # (file or name, scale), applied at load (runtime/lora/adapters.py)
    lora_dir: Path | None = None  # where LoRA names and <lora:NAME:SCALE> prompt tags are looked up
    prompt_syntax: str = "a1111"  # a1111 | compel | plain (runtime/prompts/encode.py)
    clip_skip: int = 0
    max_sequence_length: int | None = None  # SD3's T5 tokens (None: 256)
    embeddings: tuple[Path, ...] = ()  # textual-inversion files (runtime/prompts/embeddings.py); trigger = file stem
    embeddings_dir: Path | None = None  # every file in it is active, as in AUTOMATIC1111
    vae: str = "full"  # full | tiny (export/extras/tiny_vae.py)
    preview: bool = False  # write each step's latents, decoded by the tiny VAE, as OUT-step-K.png
    vae_tiling: str = "auto"  # auto | on | off (runtime/vae_tiling.py)
    ort_cache: bool = False  # keep ONNX Runtime's optimized graphs for faster later starts (engines/ort_cache.py)
    cache_interval: int = 1  # step caching (runtime/denoiser/step_cache.py)
    controls: tuple[str, ...] = ()  # "NAME=IMAGE[:SCALE]" (runtime/conditioning/controlnet.py)
    control_windows: tuple[str, ...] = ()  # "NAME=START:END": one net's own window
    control_start: float = 0.0
    control_end: float = 1.0
    guess_mode: bool = False
    control_preprocess: str | None = None  # "canny[:LOW:HIGH]"
    ip_image: tuple[str, ...] = ()  # "[NAME=]IMAGE[:SCALE]", repeatable (runtime/conditioning/ip_adapter.py)
    adapter: str | None = None  # T2I-Adapter "NAME=IMAGE[:SCALE]" (runtime/conditioning/t2i_adapter.py)
    instantid_face: Path | None = None  # .npy raw face embedding, or a photo (runtime/conditioning/instantid.py)
    instantid_kps: Path | None = None  # .npy [5, 2] keypoints or the keypoint image
    identitynet_scale: float = 0.8
    instantid_ip_scale: float = 0.8
    enhance_face_region: bool = False  # InstantID's "enhance non-face region" (the demo's default: on)
    instantid_bbox: str | None = None  # "X1,Y1,X2,Y2": its face box in output pixels
    pulid_id: Path | None = None  # .npz ID-encoder inputs or .npy ID tokens (runtime/conditioning/pulid.py)
    pulid_photo: Path | None = None  # a photo whose face gives the inputs' embedding (the ArcFace part)
    pulid_scale: float = 0.8
    pulid_mode: str = "fidelity"
    pulid_start_step: int = 0
    pulid_zero_tokens: int | None = None
    photomaker_images: tuple[Path, ...] = ()  # photos of one person (runtime/conditioning/photomaker.py)
    photomaker_trigger: str = "img"
    photomaker_style_strength: float = 20.0
    photomaker_faces: Path | None = None  # v2: .npy [N, 512] raw ArcFace embeddings, one per photo
    face_models: Path | None = None  # insightface's ONNX models, to read faces from photos (conditioning/faces.py)


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
    outpaint = o.outpaint
    if outpaint is None and (o.outpaint_fill is not None or o.outpaint_blur is not None):
        raise UserError("--outpaint-fill and --outpaint-blur apply to --outpaint; give the margins with "
                        "--outpaint left=..,right=..,top=..,bottom=..")
    if outpaint is not None:
        extra = {"fill": o.outpaint_fill, "blur": o.outpaint_blur}
        outpaint = ",".join([outpaint] + [f"{k}={v}" for k, v in extra.items() if v is not None])
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
        outpaint=outpaint,
        noise_level=None if o.then_upscale else o.noise_level,  # with --then-upscale: the upscaler's
        depth_map=image_io.load_image(o.depth_map, None) if o.depth_map else None,  # its own mode (16-bit too)
        denoising_end=o.refiner_start if o.refiner else None,
        loras=o.loras,
        face_models=str(o.face_models) if o.face_models is not None else None,
        prompt_syntax=o.prompt_syntax,
        clip_skip=o.clip_skip,
        max_sequence_length=o.max_sequence_length,
        embeddings=tuple(str(e) for e in o.embeddings),
        vae=o.vae,
        vae_tiling=o.vae_tiling,
        cache_interval=o.cache_interval,
        controls=_controls(o.controls, o.control_windows),
        control_start=o.control_start,
        control_end=o.control_end,
        guess_mode=o.guess_mode,
        control_preprocess=o.control_preprocess,
        **_ip_fields(o.ip_image),
        **_adapter_fields(o.adapter),
        **_instantid_fields(o),
        **_pulid_fields(o),
        **_photomaker_fields(o),
    )


def _photomaker_fields(o: RunOptions) -> dict:
    """--photomaker-image PATH … (and v2's --photomaker-faces FILE.npy) with the trigger and style strength."""
    if not o.photomaker_images and o.photomaker_faces is None:
        return {}
    out = {"photomaker_images": tuple(image_io.load_image(p) for p in o.photomaker_images) or None,
           "photomaker_trigger": o.photomaker_trigger, "photomaker_style_strength": o.photomaker_style_strength}
    if o.photomaker_faces is not None:
        import numpy as np

        try:
            out["photomaker_faces"] = np.load(o.photomaker_faces, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"--photomaker-faces {o.photomaker_faces}: cannot read a .npy array "
                            f"({str(e).splitlines()[0]})") from None
    return out


def _instantid_fields(o: RunOptions) -> dict:
    """--instantid-face FILE(.npy | photo), --instantid-kps FILE(.npy | image) and the two scales → the InstantID
    fields."""
    if o.instantid_face is None and o.instantid_kps is None:
        if o.enhance_face_region or o.instantid_bbox is not None:
            raise UserError("--enhance-face-region and --instantid-bbox are InstantID options; give --instantid-face "
                            "with them")
        return {}
    out = {"identitynet_scale": o.identitynet_scale, "instantid_ip_scale": o.instantid_ip_scale,
           "enhance_face_region": o.enhance_face_region}
    if o.instantid_bbox is not None:
        try:
            out["instantid_bbox"] = [float(v) for v in o.instantid_bbox.split(",")]
        except ValueError:
            raise UserError(f"--instantid-bbox {o.instantid_bbox}: must be X1,Y1,X2,Y2 (the face box in output "
                            "pixels)") from None
    for name, path in (("instantid_face", o.instantid_face), ("instantid_kps", o.instantid_kps)):
        if path is None or path.suffix.lower() != ".npy":
            out[name] = image_io.load_image(path) if path is not None else None
            continue
        try:
            import numpy as np

            out[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"--{name.replace('_', '-')} {path}: cannot read a .npy array "
                            f"({str(e).splitlines()[0]})") from None
    return out


def _pulid_fields(o: RunOptions) -> dict:
    """--pulid-id FILE (.npz: the ID encoder's inputs by name; .npy: the ID tokens), --pulid-photo PHOTO (alone: all
    three inputs from the photo, runtime/conditioning/pulid_photo.py; with a .npz: its embedding) and the controls."""
    if o.pulid_id is None:
        if o.pulid_photo is None:
            return {}
        return {"pulid_id": {"embedding": image_io.load_image(o.pulid_photo)}, "pulid_scale": o.pulid_scale,
                "pulid_mode": o.pulid_mode, "pulid_start_step": o.pulid_start_step,
                "pulid_zero_tokens": o.pulid_zero_tokens}
    import numpy as np

    try:
        with open(o.pulid_id, "rb") as f:
            data = np.load(f, allow_pickle=False)
            given = {k: data[k] for k in data.files} if isinstance(data, np.lib.npyio.NpzFile) else data
    except (OSError, ValueError) as e:
        raise UserError(f"--pulid-id {o.pulid_id}: cannot read a .npz/.npy array ({str(e).splitlines()[0]})") from None
    if o.pulid_photo is not None:
        if not isinstance(given, dict):
            raise UserError(f"--pulid-photo needs --pulid-id as .npz with the ID encoder's inputs (eva_embedding, "
                            f"eva_hidden); {o.pulid_id} holds ID tokens, which need no photo")
        given = given | {"embedding": image_io.load_image(o.pulid_photo)}
    return {"pulid_id": given, "pulid_scale": o.pulid_scale, "pulid_mode": o.pulid_mode,
            "pulid_start_step": o.pulid_start_step, "pulid_zero_tokens": o.pulid_zero_tokens}


def _controls(texts, windows) -> tuple:
    """--control NAME=IMAGE[:SCALE] … with --control-window NAME=START:END for nets with their own window."""
    own = {}
    for text in windows:
        name, eq, rest = text.partition("=")
        start, colon, end = rest.partition(":")
        try:
            own[name] = {"start": float(start), "end": float(end)}
        except ValueError:
            raise UserError(f"--control-window {text!r}: give NAME=START:END, fractions of the schedule such as "
                            "canny=0:0.6") from None
        if not (eq and colon and name):
            raise UserError(f"--control-window {text!r}: give NAME=START:END")
    parsed = [parse_control(t) for t in texts]
    unknown = sorted(set(own) - {name for name, _, _ in parsed})
    if unknown:
        raise UserError(f"--control-window {unknown[0]}: no --control {unknown[0]}=IMAGE to apply it to")
    return tuple({"name": name, "image": image_io.load_image(path), "scale": scale, **own.get(name, {})}
                 for name, path, scale in parsed)


def _adapter_fields(text: str | None) -> dict:
    if text is None:
        return {}
    name, path, scale = parse_control(text, "--adapter")
    return {"adapter_name": name, "adapter_image": image_io.load_image(path), "adapter_scale": scale}


def _ip_fields(texts) -> dict:
    """--ip-image [NAME=]IMAGE[:SCALE] …: images for the directory's one adapter (ip_image, ip_scale), or with NAME=
    for the named adapters of several (ip_adapters); each adapter's images share its one scale."""
    if isinstance(texts, str):
        texts = (texts,)
    if not texts:
        return {}
    groups: dict[str | None, list] = {}  # adapter name (None: the only one) → [(text, path, scale), …]
    for text in texts:
        name, eq, rest = text.partition("=")
        named = bool(eq and name and rest) and "/" not in name and not Path(text).exists()
        path, scale = parse_image_scale(rest if named else text, "--ip-image")
        groups.setdefault(name if named else None, []).append((rest if named else text, path, scale))
    if None in groups and len(groups) > 1:
        raise UserError("--ip-image: name the adapter of every image (NAME=IMAGE) or of none")
    fields = []
    for name, parsed in groups.items():
        scales = {scale for text, path, scale in parsed if path != Path(text)}  # the scales given with ":SCALE"
        if len(scales) > 1:
            raise UserError(f"--ip-image: the images {'of ' + name + ' ' if name else ''}share the IP-Adapter's one "
                            f"scale; give it once (got {', '.join(f'{s:g}' for s in sorted(scales))})")
        scale = scales.pop() if scales else 1.0
        if any(path.suffix.lower() == ".npy" for _, path, _ in parsed):  # FaceID: face embeddings [D] or [faces, D]
            if name is None or not all(path.suffix.lower() == ".npy" for _, path, _ in parsed):
                raise UserError("--ip-image FILE.npy: face embeddings go to a named FaceID adapter, each as "
                                "NAME=FILE.npy[:SCALE], without images for the same adapter")
            fields.append({"name": name, "embeds": _load_embeds([path for _, path, _ in parsed]), "scale": scale})
            continue
        images = tuple(image_io.load_image(path) for _, path, _ in parsed)
        fields.append({"name": name, "image": images[0] if len(images) == 1 else images, "scale": scale})
    if fields[0]["name"] is None:
        return {"ip_image": fields[0]["image"], "ip_scale": fields[0]["scale"]}
    return {"ip_adapters": tuple(fields)}


def _load_embeds(paths):  # → numpy array [faces, D]
    """.npy files of face embeddings ([D] or [faces, D] each; e.g. insightface's normed_embedding) → [faces, D]."""
    import numpy as np

    arrays = []
    for path in paths:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"--ip-image {path}: cannot read face embeddings ({str(e).splitlines()[0]})") from None
        array = np.atleast_1d(array)
        arrays.append(array.reshape(-1, array.shape[-1]))
    try:
        return np.concatenate(arrays).astype(np.float32)
    except ValueError:
        raise UserError("--ip-image: the .npy face embeddings have different widths: "
                        + ", ".join(str(list(a.shape)) for a in arrays)) from None


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
    size: tuple[int, int] = (0, 0)  # the image written (after --then-upscale: 4× the job's)


def generate(o: RunOptions, on_step: OnStep = lambda stage, done, total: None) -> tuple[Job, list[Written]]:
    request = build_request(o)
    model = open_dir(o.engine_dir)
    if o.needs is not None and not getattr(model.info, KINDS[o.needs][0]):
        raise UserError(f"{o.engine_dir} holds a {model.info.family.value} model ({model.info.pipeline_class}); "
                        f"sdrt {o.needs} needs {KINDS[o.needs][1]}")
    try:  # before any engine loads: bad input costs nothing and leaves nothing behind
        job = validate(request, model, lora_dir=o.lora_dir, embeddings_dir=o.embeddings_dir)
    except InvalidRequest as e:
        raise as_cli_error(e, o.needs is not None) from None
    paths = output_paths(o.out, job.count)
    image_io.check_writable(paths[0])
    if o.preview:
        _check_preview(o.engine_dir)
    upscaler = _check_then_upscale(o, job)
    pipe = Pipeline.load(model, backend=o.backend, lora_dir=o.lora_dir,
                         embeddings_dir=o.embeddings_dir, ort_config=_ort_config(o))
    previews = _previews(pipe, paths) if o.preview else None
    run = _run(pipe, job, "base" if o.refiner else "denoise", on_step, previews)
    if o.refiner:
        latents = run.final_latents()
        refiner = Pipeline.load(o.refiner, backend=o.backend, embeddings_dir=o.embeddings_dir,
                                ort_config=_ort_config(o))
        follow = Request.of(prompt=job.prompt, negative_prompt=job.negative_prompt, steps=job.steps,
                            guidance=job.guidance, guidance_rescale=job.guidance_rescale, sampler=job.sampler,
                            schedule=job.schedule, seed=job.seed, batch=job.images_per_prompt, init_latents=latents,
                            denoising_start=o.refiner_start, prompt_syntax=job.syntax, clip_skip=job.clip_skip,
                            embeddings=tuple(str(e) for e in o.embeddings), vae=job.vae,
                            vae_tiling=o.vae_tiling)
        try:
            follow_job = refiner.validate(follow)
        except InvalidRequest as e:
            raise as_cli_error(e) from None
        run = _run(refiner, follow_job, "refiner", on_step)
    images = run.finish(run.decode(), job)
    if upscaler is not None:  # txt2img → ×4: each image with its own prompt and seed
        up = Pipeline.load(o.then_upscale, backend=o.backend)
        images = [_run(up, up.validate(_upscale_request(o, job, i, image)), "upscale ×4", on_step).decode()[0]
                  for i, image in enumerate(images)]
    written = []
    for i, (image, path) in enumerate(zip(images, paths)):
        params = job.parameters(i, Path(o.engine_dir).name, size=images[0].size)
        written.append(Written(image_io.save_png(image, path, params), job.seeds[i], params.prompt, image.size))
    return job, written


def _upscale_request(o: RunOptions, job: Job, i: int, image) -> Request:
    """The ×4 upscaler's request for image i of `job` (its prompt, negative prompt, seed, steps and guidance)."""
    negative = None if job.negative_prompt is None else job.negative_prompt[i // job.images_per_prompt]
    return Request.of(prompt=job.prompt[i // job.images_per_prompt], negative_prompt=negative, init_image=image,
                      steps=job.steps, guidance=job.guidance, seed=job.seeds[i], noise_level=o.noise_level)


def _check_then_upscale(o: RunOptions, job: Job):
    """--then-upscale: the directory is a ×4 upscaler and the upscaled size passes its checks, before any work."""
    if o.then_upscale is None:
        return None
    from PIL import Image

    model = open_dir(o.then_upscale)
    if not model.info.upscaler:
        raise UserError(f"--then-upscale {o.then_upscale} holds a {model.info.family.value} model "
                        f"({model.info.pipeline_class}); it needs {KINDS['upscale'][1]}")
    try:
        validate(_upscale_request(o, job, 0, Image.new("RGB", (job.width, job.height))), model)
    except InvalidRequest as e:
        field = "the image" if e.field == "init_image" else flag(e.field)
        raise UserError(f"--then-upscale: {field} {e.message}") from None
    return model


def _run(pipe: Pipeline, job: Job, stage: str, on_step: OnStep, previews: Callable | None = None) -> Generation:
    """The job's steps, reported to `on_step` (and written as previews); the Generation then decodes them."""
    run = Generation(pipe, job)
    total = run.total
    for done, latents in enumerate(run.steps(), start=1):
        if previews is not None:
            previews(done, latents)
        on_step(stage, done, total)
    return run


def _ort_config(o: RunOptions):
    if not o.ort_cache:
        return None
    from sdrt.engines.ort import OrtConfig

    return OrtConfig(cache_optimized=True)


def _check_preview(engine_dir: Path) -> None:
    from sdrt.runtime.job import TINY_VAE

    if not (Path(engine_dir) / TINY_VAE["decode"] / "model.onnx").exists():
        raise UserError(f"--preview decodes every step with the tiny VAE, and {engine_dir} has no "
                        f"{TINY_VAE['decode']}; export the model with --tiny-vae, or drop --preview")


def _previews(pipe: Pipeline, paths: list[Path]) -> Callable:
    """Step K's latents, decoded by the tiny VAE, to OUT-step-K.png (OUT-i-step-K.png for image i of several)."""
    def write(step: int, latents) -> None:
        for image, path in zip(pipe.preview(latents), paths):
            image_io.save_png(image, path.with_name(f"{path.stem}-step-{step}{path.suffix}"), f"preview, step {step}")
    return write
