"""Loading a diffusers pipeline from a hub id, a local diffusers folder or a single checkpoint file."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import UserError
from sdrt.runtime.family import SUPPORTED_PIPELINES, SUPPORTED_TEXT, UnsupportedModel

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# --family for single files → the diffusers class whose from_single_file builds it
SINGLE_FILE_CLASSES = {
    "sd15": "StableDiffusionPipeline",
    "sd21": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
    "sd15-inpaint": "StableDiffusionInpaintPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
}


@dataclass(frozen=True)
class Source:
    kind: str  # folder | hub | single_file
    location: str
    sha256: str
    vae: str | None = None
    family: str | None = None  # single files: the --family and --config they were loaded with, so that
    config: str | None = None  # `sdrt export DIR --controlnet …` loads them again the same way


def local_location(given: str | None) -> str | None:
    """A local file or folder as an absolute path (manifests are read from other working directories); hub ids
    and None unchanged."""
    if given is None:
        return None
    path = Path(given).expanduser()
    return str(path.absolute()) if path.exists() else given


def sha256_of_files(paths: list[Path], root: Path) -> str:
    """Hash of relative names and contents, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode())
        _hash_into(h, p)
    return h.hexdigest()


def sha256_of_file(path: Path) -> str:
    """SHA-256 of one file's contents (hex): what manifests and the shapes model's hashes.json record per file."""
    return _hash_into(hashlib.sha256(), path).hexdigest()


def _hash_into(h, path: Path):
    """Feed the file at `path` into the hash `h` in 4 MiB chunks (weights files are large); returns `h`."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h


def _source_hash(files: list[Path], root: Path, vae: str | None) -> str:
    digest = sha256_of_files(files, root)
    return hashlib.sha256(f"{digest}|vae={vae}".encode()).hexdigest() if vae else digest


def _folder_hash(folder: Path, vae: str | None) -> str:
    return _source_hash([p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts], folder, vae)


def _check_folder(folder: Path) -> None:
    index = folder / "model_index.json"
    if not index.exists():
        raise UserError(f"{folder} is not a diffusers pipeline folder (no model_index.json); give a diffusers "
                        "folder, a hub id like stabilityai/sdxl-turbo, or a .safetensors/.ckpt file")
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except json.JSONDecodeError as e:
        raise UserError(f"{index} is not valid JSON ({e})") from None
    if cls not in SUPPORTED_PIPELINES:
        raise UnsupportedModel(f"{folder} holds a {cls or 'pipeline of unknown class'}, which sdrt does not "
                               f"support; supported families: {SUPPORTED_TEXT}")


def _check_single_file(path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own SafetensorError / OSError on bad headers
            raise UserError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0]})") from None


def single_file_family(path: Path) -> str | None:
    """Infer the family of an original (CompVis/SGM-layout) checkpoint from its tensor names, or None."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        conv_in = "model.diffusion_model.input_blocks.0.0.weight"
        in_channels = f.get_slice(conv_in).get_shape()[1] if conv_in in keys else 4
    inpaint = "-inpaint" if in_channels == 9 else ""
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl" + inpaint
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl-refiner"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd21"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15" + inpaint
    return None


def resolve_source(model: str, vae: str | None = None) -> tuple[str, Path | None]:
    """Classify MODEL as folder / single_file / hub and validate what can be validated before loading."""
    path = Path(model).expanduser()
    if path.is_dir():
        _check_folder(path)
        return "folder", path
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"{path} is neither a diffusers folder nor a .safetensors/.ckpt checkpoint")
        _check_single_file(path)
        return "single_file", path
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        return "hub", None
    raise UserError(f"{model}: no such file or directory (expected a diffusers folder, a .safetensors/.ckpt "
                    "file, or a hub id like stabilityai/sdxl-turbo)")


def local_source_hash(model: str, vae: str | None = None) -> str | None:
    """The source hash of a local folder or file, computed without loading it; None for hub ids."""
    kind, path = resolve_source(model)
    vae = local_location(vae)
    if kind == "folder":
        return _folder_hash(path, vae)
    if kind == "single_file":
        return _source_hash([path], path.parent, vae)
    return None


def load_pipeline(model: str, *, vae: str | None = None, family: str | None = None, config: str | None = None,
                  source_hash: str | None = None):
    """Return (pipeline in fp32 on the CPU, Source). Raises UserError for anything a user can fix.

    source_hash: local_source_hash(model, vae) when the caller already computed it (hashing GBs twice is slow).
    """
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # the CLI reports failures itself, in one line
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    kind, path = resolve_source(model)
    vae = local_location(vae)
    try:
        if kind == "folder":
            extra = {"safety_checker": None} if _has_safety_checker(path) else {}
            pipe = diffusers.DiffusionPipeline.from_pretrained(path, **extra)
            digest = source_hash or _folder_hash(path, vae)
        elif kind == "hub":
            pipe = diffusers.DiffusionPipeline.from_pretrained(model)
            digest = _folder_hash(Path(pipe.config._name_or_path), vae) if Path(pipe.config._name_or_path).is_dir() \
                else hashlib.sha256(model.encode()).hexdigest()
        else:
            family = family or single_file_family(path)
            if family not in SINGLE_FILE_CLASSES:
                raise UserError(f"cannot tell the family of {path.name} from its tensor names; pass --family "
                                f"({', '.join(SINGLE_FILE_CLASSES)})")
            cls = getattr(diffusers, SINGLE_FILE_CLASSES[family])
            config = local_location(config)
            # a checkpoint saved without its VAE (first_stage_model.*) loads only with the VAE given up front
            given = ({"config": config} if config else {}) | ({"vae": _load_vae(vae)} if vae else {})
            pipe = cls.from_single_file(str(path), **given)
            digest = source_hash or _source_hash([path], path.parent, vae)
    except UserError:
        raise
    except SingleFileComponentError as e:
        raise UserError(f"cannot load {path.name}: {str(e).strip().splitlines()[0]} (a checkpoint without its VAE "
                        "needs --vae FOLDER_OR_FILE)") from None
    except ValueError as e:  # diffusers on an incomplete folder (components listed in model_index.json missing)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {model}: {first} (a diffusers pipeline folder needs every component its "
                        "model_index.json lists)") from None
    except OSError as e:
        if kind == "hub":
            raise UserError(f"cannot load {model}: it is not in the local Hugging Face cache and the hub cannot be "
                            "reached (offline?); download it where the hub is reachable, or give a local diffusers "
                            "folder or checkpoint file") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {model}: {first}") from None
    if vae and kind != "single_file":
        pipe.vae = _load_vae(vae)
    single = {"family": family, "config": config} if kind == "single_file" else {}
    return pipe, Source(kind, str(path.absolute()) if path else model, digest, vae, **single)


def _has_safety_checker(folder: Path) -> bool:
    index = json.loads((folder / "model_index.json").read_text())
    entry = index.get("safety_checker")
    return bool(entry) and entry[0] is not None


def _load_vae(vae: str):
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    try:
        if path.is_file():
            return AutoencoderKL.from_single_file(str(path))
        if path.is_dir() and not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
            path = path / "vae"
        return AutoencoderKL.from_pretrained(str(path) if path.is_dir() else vae)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the VAE {vae}: {first}") from None
