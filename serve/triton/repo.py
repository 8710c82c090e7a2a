"""`sdrt triton-repo`: a Triton Inference Server model repository over an engine directory.

    write_repo(RepoOptions(engine_dir="sd15-fp16", repo="models", name="sd15", max_batch=4, kind="gpu"))

writes

    models/sd15/config.pbtxt     backend "python", max_batch_size, dynamic batching whose queue rejects on timeout,
                                 instance_group, the inputs and outputs below, parameters (engine_dir, backend, …),
                                 a warm-up size (initialize() warms up: "ready" means warm)
    models/sd15/1/model.py       serve/triton/model.py: drives runtime/service.py in-process
    models/sd15/1/engine/        a copy of the engine directory (only with copy_engine; otherwise config.pbtxt
                                 names the engine directory by its absolute path)

Inputs (each request may carry several rows; each row is one image): `prompt` STRING; optional
`negative_prompt` STRING, `seed` INT64 (-1: random), `steps` INT32, `guidance_scale` FP32, `width`/`height` INT32,
`sampler` STRING (sdrt's or AUTOMATIC1111's name). Outputs: `image` UINT8 [H, W, 3] and `seed` UINT64 (the seed
each image used; 64-bit unsigned because a random seed may exceed INT64).

The repository is built in a temporary folder next to REPO and renamed into place at the end, so a failure
leaves nothing half-written.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import UserError

KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU", "auto": "KIND_AUTO"}
MAX_BATCH = 64
MAX_INSTANCES = 64
MODEL_SOURCE = Path(__file__).with_name("model.py")

# (Triton input name, data type, required); the model maps them onto Request.of's flat keys
INPUTS = (
    ("prompt", "TYPE_STRING", True),
    ("negative_prompt", "TYPE_STRING", False),
    ("seed", "TYPE_INT64", False),
    ("steps", "TYPE_INT32", False),
    ("guidance_scale", "TYPE_FP32", False),
    ("width", "TYPE_INT32", False),
    ("height", "TYPE_INT32", False),
    ("sampler", "TYPE_STRING", False),
)
OUTPUTS = (("image", "TYPE_UINT8", (-1, -1, 3)), ("seed", "TYPE_UINT64", (1,)))


@dataclass(frozen=True)
class RepoOptions:
    engine_dir: Path
    repo: Path
    name: str | None = None  # None: the engine directory's name
    max_batch: int = 4  # Triton's max_batch_size = the service's images per engine batch
    instances: int = 1  # model instances (one Python process each) per device
    kind: str = "auto"  # cpu | gpu | auto (Triton: GPU where it sees one)
    backend: str = "auto"  # sdrt backend inside the model; auto: ort-cpu on CPU instances, else TensorRT/ORT CUDA
    copy_engine: bool = False
    force: bool = False  # write into a non-empty REPO, replacing REPO/NAME
    queue_delay_ms: float = 10.0  # Triton's max_queue_delay: how long it gathers a batch
    queue_timeout_s: float = 300.0  # a request still queued after this is rejected
    max_queue_size: int = 64  # requests Triton queues before it rejects new ones
    warmup: bool = True


@dataclass(frozen=True)
class WrittenRepo:
    repo: Path
    model_dir: Path
    engine_dir: str  # as config.pbtxt names it
    config: str


def default_name(engine_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(engine_dir).resolve().name).strip("._") or "sdrt"
    return name


def _check(options: RepoOptions) -> str:
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not whole(options.max_batch) or not 1 <= options.max_batch <= MAX_BATCH:
        raise UserError(f"--max-batch must be an integer in 1 … {MAX_BATCH} (got {options.max_batch!r})")
    if not whole(options.instances) or not 1 <= options.instances <= MAX_INSTANCES:
        raise UserError(f"--instances must be an integer in 1 … {MAX_INSTANCES} (got {options.instances!r})")
    if options.kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)} (got {options.kind!r})")
    if options.backend not in ("auto", "ort-cpu", "ort-cuda", "tensorrt", "torch"):
        raise UserError(f"--backend must be auto, ort-cpu, ort-cuda, tensorrt or torch (got {options.backend!r})")
    if not options.queue_delay_ms >= 0 or not options.queue_timeout_s > 0 or \
            not (whole(options.max_queue_size) and options.max_queue_size >= 1):
        raise UserError("the queue delay must be ≥ 0 ms, the queue timeout > 0 s and the queue size ≥ 1")
    name = options.name if options.name is not None else default_name(options.engine_dir)
    if not name or name in (".", "..") or name.startswith(".") or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UserError(f"--name {name!r} is not a model name: use letters, digits, '_', '-' and '.', "
                        "not starting with '.'")
    return name


def _pbtxt_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(name: str, options: RepoOptions, engine_dir: str, warmup_size: tuple[int, int]) -> str:
    """config.pbtxt (protobuf text format) for the model."""
    lines = [
        f"# written by `sdrt triton-repo` for {engine_dir}",
        f"name: {_pbtxt_string(name)}",
        'backend: "python"',
        f"max_batch_size: {options.max_batch}",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {int(round(options.queue_delay_ms * 1000))}",
        "  default_queue_policy {",
        "    timeout_action: REJECT",
        f"    default_timeout_microseconds: {int(round(options.queue_timeout_s * 1e6))}",
        "    allow_timeout_override: true",
        f"    max_queue_size: {options.max_queue_size}",
        "  }",
        "}",
        "instance_group [",
        f"  {{ count: {options.instances} kind: {KINDS[options.kind]} }}",
        "]",
        "input [",
    ]
    for i, (input_name, dtype, required) in enumerate(INPUTS):
        comma = "," if i < len(INPUTS) - 1 else ""
        optional = "" if required else " optional: true"
        lines.append(f'  {{ name: "{input_name}" data_type: {dtype} dims: [ 1 ]{optional} }}{comma}')
    lines += ["]", "output ["]
    for i, (output_name, dtype, dims) in enumerate(OUTPUTS):
        comma = "," if i < len(OUTPUTS) - 1 else ""
        lines.append(f'  {{ name: "{output_name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}{comma}')
    lines.append("]")
    params = {"engine_dir": engine_dir, "backend": options.backend,
              "max_wait_ms": "5",  # the service's own gathering: Triton has batched already
              "request_timeout_s": f"{options.queue_timeout_s:g}"}
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: {_pbtxt_string(value)} }} }}')
    if options.warmup:  # initialize() generates these before it returns, so Triton's "ready" means warm
        width, height = warmup_size
        lines.append(f'parameters {{ key: "warmup" value: {{ string_value: "{width}x{height}" }} }}')
        lines.append(f"# ready means warm: initialize() draws one image and a full batch, 1 step, {width}x{height}")
    return "\n".join(lines) + "\n"


def _check_repo(repo: Path, name: str, force: bool) -> None:
    if repo.exists() and not repo.is_dir():
        raise UserError(f"{repo} exists and is not a directory; choose another -o/--output")
    if repo.is_dir() and any(repo.iterdir()) and not force:
        raise UserError(f"{repo} is not empty; pass --force to write {name} into it (an existing {repo / name} "
                        "is replaced, other models are kept)")


def write_repo(options: RepoOptions) -> WrittenRepo:
    """Write the repository (atomically) and return where; UserError for anything the caller must fix."""
    from sdrt.runtime.loader import open_dir

    name = _check(options)
    engine = Path(options.engine_dir)
    d = open_dir(engine)  # UserError for a missing or non-engine directory
    for component in (d.info.layout.denoiser, "vae_decoder", *d.text_encoder_names):
        d.onnx_path(component)
    if not d.text_encoder_names:
        raise UserError(f"{engine} has no text encoder (text_encoder/model.onnx); re-export the engine directory")
    repo = Path(options.repo).absolute()
    _check_repo(repo, name, options.force)
    if engine.resolve() == repo.resolve() or repo.resolve() in engine.resolve().parents:
        raise UserError(f"the repository {repo} must not contain the engine directory {engine}")
    if options.copy_engine and engine.resolve() in repo.resolve().parents:
        raise UserError(f"with --copy-engine the repository {repo} must lie outside the engine directory {engine}")
    multiple = d.vae_scale_factor * d.latent_multiple
    size = max(d.default_size // multiple * multiple, multiple)

    repo.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{repo.name}.", suffix=".sdrt-tmp", dir=repo.parent))
    try:
        model_dir = tmp / name
        version = model_dir / "1"
        version.mkdir(parents=True)
        if options.copy_engine:
            shutil.copytree(engine, version / "engine")
            engine_ref = "engine"  # relative: the model resolves it against its own folder (NAME/1)
        else:
            engine_ref = str(engine.resolve())
        shutil.copyfile(MODEL_SOURCE, version / "model.py")
        config = render_config(name, options, engine_ref, (size, size))
        (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
        _check_repo(repo, name, options.force)  # again: something may have appeared meanwhile
        if not repo.exists():
            tmp.rename(repo)
            tmp = None
        else:
            if not any(repo.iterdir()):
                repo.rmdir()
                tmp.rename(repo)
                tmp = None
            else:  # --force: replace REPO/NAME only
                target = repo / name
                if target.exists() or target.is_symlink():
                    target.rename(tmp / ".replaced")
                model_dir.rename(target)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return WrittenRepo(repo=repo, model_dir=repo / name, engine_dir=engine_ref, config=config)
