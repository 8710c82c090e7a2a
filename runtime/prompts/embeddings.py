"""Textual-inversion embeddings: the files in the wild, read without pickle code (reference/customization.md §3).

Formats (one or more vectors each):
- AUTOMATIC1111 `.pt`: a dict whose `string_to_param` holds the (n, dim) tensor;
- AUTOMATIC1111/Civitai `.safetensors`: `emb_params` (n, dim);
- SDXL `.safetensors`: `clip_l` (n, 768) for the first text encoder and `clip_g` (n, 1280) for the second;
- diffusers `learned_embeds.safetensors` / `.bin`: {token: (dim,) or (n, dim)}.
`.pt`/`.bin` are torch pickles, loaded with `weights_only=True` (tensors and plain containers only).
The trigger word is the file's stem (AUTOMATIC1111's rule), whatever token a file names inside.

How a prompt uses them (runtime/prompts/encode.py): in the `a1111` syntax the trigger's token sequence is found
anywhere in the prompt and the vectors are spliced in its place (AUTOMATIC1111's EmbeddingsWithFixes); in
`plain` and `compel` the trigger becomes added tokens `name name_1 … name_{n-1}` as diffusers'
load_textual_inversion + maybe_convert_prompt make it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sdrt.runtime.errors import UserError

SUFFIXES = (".safetensors", ".pt", ".bin")
SDXL_KEYS = ("clip_l", "clip_g")  # first, second text encoder


class EmbeddingError(UserError):
    """An embedding file that cannot be read or does not fit the model; the message names the file."""


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str  # the trigger word
    path: Path
    vectors: tuple  # one (n, dim) float32 array per text encoder of the model (SD: 1, SDXL: 2, refiner: 1)

    @property
    def count(self) -> int:
        return self.vectors[0].shape[0]


def _arrays(path: Path) -> dict:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        import torch

        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EmbeddingError(f"embedding {path}: no such file") from None
    except Exception as e:  # safetensors' and torch's own errors: a damaged or foreign file
        raise EmbeddingError(f"embedding {path} cannot be read as {suffix[1:]} ({type(e).__name__}: "
                             f"{str(e)[:120]})") from None
    if isinstance(data, dict) and "string_to_param" in data:  # AUTOMATIC1111 .pt
        data = data["string_to_param"]
    if not isinstance(data, dict):
        raise EmbeddingError(f"embedding {path} holds a {type(data).__name__}, not a dict of tensors")
    out = {}
    for key, value in data.items():
        if hasattr(value, "detach"):
            out[str(key)] = value.detach().float().cpu().numpy()
    return out


def _matrix(path: Path, key: str, value) -> np.ndarray:
    value = np.asarray(value, dtype=np.float32)
    if value.ndim == 1:
        value = value[None]
    if value.ndim != 2 or value.shape[0] < 1:
        raise EmbeddingError(f"embedding {path}: {key} has shape {list(value.shape)}; expected (vectors, width)")
    if not np.isfinite(value).all():
        raise EmbeddingError(f"embedding {path}: {key} holds NaN or infinite values")
    return value


@functools.lru_cache(maxsize=256)
def _load(path: str, mtime: float, slots: tuple[tuple[str, int], ...]) -> Embedding:
    p = Path(path)
    if p.suffix.lower() not in SUFFIXES:
        raise EmbeddingError(f"embedding {p}: unknown file type {p.suffix or '(none)'}; expected "
                             f"{', '.join(SUFFIXES)}")
    arrays = _arrays(p)
    vectors = []
    for key, width in slots:
        if key in SDXL_KEYS:
            if key not in arrays:
                raise EmbeddingError(f"embedding {p} has no {key} vectors; an SDXL model needs clip_l and clip_g "
                                     "(an SD 1.x/2.x embedding does not fit SDXL)")
            value = _matrix(p, key, arrays[key])
        else:
            keys = [k for k in arrays if k not in SDXL_KEYS] or [k for k in ("clip_l",) if k in arrays]
            if len(keys) != 1:
                raise EmbeddingError(f"embedding {p} holds {len(arrays)} tensors ({', '.join(sorted(arrays))[:80]});"
                                     " expected one (emb_params, string_to_param or a diffusers token)")
            value = _matrix(p, keys[0], arrays[keys[0]])
        if value.shape[1] != width:
            raise EmbeddingError(f"embedding {p}: its vectors are {value.shape[1]} wide but this model's text "
                                 f"encoder takes {width}; it was made for another model family")
        vectors.append(value)
    if len({v.shape[0] for v in vectors}) > 1:
        raise EmbeddingError(f"embedding {p}: clip_l and clip_g hold different numbers of vectors")
    if vectors[0].shape[0] > 75:
        raise EmbeddingError(f"embedding {p} has {vectors[0].shape[0]} vectors; at most 75 fit a prompt chunk")
    return Embedding(p.stem, p, tuple(vectors))


def slots_for(model_dir) -> tuple[tuple[str, int], ...]:
    """(file key, width) per text encoder of the model: SD ("*": the file's one tensor), SDXL clip_l + clip_g,
    the SDXL refiner clip_g."""
    import json

    out = []
    sdxl = len(model_dir.text_encoder_names) == 2 or model_dir.text_encoder_names == ["text_encoder_2"]
    for name in model_dir.text_encoder_names:
        try:
            width = int(json.loads((model_dir.path / name / "config.json").read_text())["hidden_size"])
        except (OSError, ValueError, KeyError, TypeError):
            raise EmbeddingError(f"{model_dir.path / name / 'config.json'} is missing or has no hidden_size") \
                from None
        out.append(("clip_g" if name == "text_encoder_2" else "clip_l" if sdxl else "*", width))
    return tuple(out)


def load(path: str | Path, slots: Sequence[tuple[str, int]]) -> Embedding:
    """One embedding file for a model with these text-encoder `slots` (cached by path and mtime)."""
    p = Path(path).expanduser()
    try:
        mtime = os.stat(p).st_mtime
    except OSError:
        raise EmbeddingError(f"embedding {p}: no such file") from None
    return _load(str(p.resolve()), mtime, tuple(slots))


def resolve(entries: Sequence[str], folder: str | Path | None, slots) -> tuple[Embedding, ...]:
    """Files and names (looked up in `folder`, any suffix) → embeddings; every file in `folder` that fits the model
    comes too, as in AUTOMATIC1111, whose embeddings folder is always active (files that do not fit are skipped;
    files named explicitly must fit). Later entries with the same trigger win."""
    found: dict[str, Embedding] = {}
    folder = Path(folder).expanduser() if folder else None
    if folder is not None:
        if not folder.is_dir():
            raise EmbeddingError(f"embeddings folder {folder} is not a directory")
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in SUFFIXES and f.is_file():
                try:
                    e = load(f, slots)
                except EmbeddingError:  # made for another family (or damaged): skipped, as AUTOMATIC1111 does
                    continue
                found[e.name] = e
    for entry in entries:
        if not isinstance(entry, (str, os.PathLike)):
            raise EmbeddingError(f"embedding {entry!r} is not a file name")
        path = Path(entry).expanduser()
        if not path.exists() and folder is not None:
            matches = [folder / f"{entry}{s}" for s in SUFFIXES if (folder / f"{entry}{s}").is_file()]
            if not matches:
                raise EmbeddingError(f"embedding {entry!r}: no such file, and no {entry}"
                                     f"{{{','.join(SUFFIXES)}}} in {folder}")
            path = matches[0]
        e = load(path, slots)
        found[e.name] = e
    return tuple(found.values())
