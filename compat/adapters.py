"""diffusers' LoRA and textual-inversion loaders over sdrt's (runtime/lora/, runtime/prompts/embeddings.py).

diffusers (0.42, loaders/lora_pipeline.py + peft.py) keeps named adapters: `load_lora_weights` injects one and makes
it the only active adapter of every model it touches (the others keep theirs); `set_adapters(names, weights)`
activates several with weights; `fuse_lora(lora_scale)` merges the active ones (× lora_scale) into the weights;
`cross_attention_kwargs={"scale": s}` scales the unfused ones for one call. sdrt applies whole files at a scale
(a request's `loras`, or the pipeline's resident set), which is each of these; the one state it cannot hold, two
adapters each active on different components after a second load, is refused at the call with what to do.
Textual inversion: sdrt's trigger word is the file's stem, so a file loaded under another `token` is linked there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from sdrt.runtime.prompts import embeddings as ti

_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
_TI_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")  # diffusers' TEXT_INVERSION_NAME(_SAFE)


def _refuse(method: str, kwargs: dict) -> None:
    given = sorted(k for k, v in kwargs.items() if v is not None)
    if given:
        raise TypeError(f"{method}: sdrt does not support {', '.join(given)}")


def _file(path, weight_name, defaults: tuple[str, ...], what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: sdrt reads files; give a path, not a {type(path).__name__} (save a state dict "
                        "with safetensors.torch.save_file first)")
    p = Path(path).expanduser()
    if p.is_dir():
        names = (weight_name,) if weight_name else defaults
        found = [p / n for n in names if (p / n).is_file()]
        if not found:
            raise ValueError(f"{what}: {p} holds no {' or '.join(names)}; name the file with weight_name=")
        return found[0]
    if not p.is_file():
        raise ValueError(f"{what}: {p} is not a file or folder here (sdrt does not download from the Hub)")
    return p


class AdapterMixin:
    """LoRA and textual inversion on `self._runtime` (compat/pipeline.DiffusersDraws)."""

    def _init_adapters(self) -> None:
        self._init_lora_state()
        self._fused = False
        self._embeddings: list[str] = []
        self._ti_dir: Path | None = None

    # ---- LoRA ----
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None, **kwargs) -> None:
        _refuse("load_lora_weights", kwargs)
        path = _file(pretrained_model_name_or_path_or_dict, weight_name, (_LORA_FILE,), "load_lora_weights")
        name = adapter_name or f"default_{len(self._loras)}"
        if name in self._loras:
            raise ValueError(f"load_lora_weights: adapter name {name!r} is already in use; give another adapter_name")
        ref = self._runtime.adapters.resolve([(str(path), 1.0)])[0]  # LoraError (a ValueError) if it does not fit
        self._loras[name] = ref
        kept = [(n, w) for n, w in self._active if not set(self._loras[n].components) <= set(ref.components)]
        if kept:
            self._split = (f"after loading {name!r}, diffusers keeps {', '.join(repr(n) for n, _ in kept)} active on "
                           "the components it does not touch; sdrt applies whole adapters: choose them with "
                           "set_adapters(names, adapter_weights)")
        self._active = [(name, 1.0)]

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self._loras]
        if unknown:
            raise ValueError(f"set_adapters: no adapter named {', '.join(map(repr, unknown))}; loaded: "
                             f"{', '.join(map(repr, self._loras)) or 'none'}")
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names) or any(isinstance(w, dict) for w in weights):
            raise ValueError("set_adapters: adapter_weights is one number per adapter (sdrt scales whole adapters, "
                             "not per component)")
        self._active = [(n, 1.0 if w is None else float(w)) for n, w in zip(names, weights)]
        self._split = None

    def get_active_adapters(self) -> list[str]:
        return [n for n, _ in self._active]

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names=None, **kwargs) -> None:
        _refuse("fuse_lora", {k: v for k, v in kwargs.items() if k != "safe_fusing"})  # components: all, always
        scale = float(lora_scale)
        chosen = None
        if adapter_names is not None:
            weights = dict(self._active)
            names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
            chosen = [(n, weights.get(n, 1.0)) for n in names]
        self._runtime.adapters.set_base(self._lora_refs(scale, chosen))  # the resident engines, rebuilt once
        # diffusers scales the active adapters by lora_scale before merging and leaves them so (lora_base.py
        # _fuse_lora_apply → scale_layer): after unfuse_lora they stay at weight × lora_scale
        self._active = [(n, w * scale) for n, w in self._active]
        self._fused = True

    def unfuse_lora(self, **kwargs) -> None:
        _refuse("unfuse_lora", kwargs)
        self._runtime.adapters.set_base(())
        self._fused = False

    def unload_lora_weights(self) -> None:
        self.unfuse_lora()
        self._init_lora_state()

    def _init_lora_state(self) -> None:
        self._loras: dict[str, object] = {}  # adapter name → LoraRef (path, components)
        self._active: list[tuple[str, float]] = []
        self._split: str | None = None  # why the active set is not whole files (see the module docstring)

    def _lora_refs(self, scale: float = 1.0, chosen=None):
        if chosen is None and self._split is not None:
            raise ValueError(self._split)
        unknown = [n for n, _ in chosen or () if n not in self._loras]
        if unknown:
            raise ValueError(f"fuse_lora: no adapter named {', '.join(map(repr, unknown))}")
        return tuple(replace(self._loras[n], scale=w * scale) for n, w in (chosen or self._active) if w * scale != 0)

    def _request_loras(self, scale: float) -> tuple:
        """The call's LoRAs: none while fused (the resident engines hold them), else the active ones × `scale`."""
        return () if self._fused else tuple((r.path, r.scale) for r in self._lora_refs(scale))

    # ---- textual inversion ----
    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | None = None,
                               weight_name: str | None = None, **kwargs) -> None:
        _refuse("load_textual_inversion", kwargs)  # tokenizer=, text_encoder=: sdrt fills every encoder from one file
        path = _file(pretrained_model_name_or_path, weight_name, _TI_FILES, "load_textual_inversion")
        d = self._runtime.dir
        missing = [n for n in d.text_encoder_names if not (d.path / f"{n}_embeds" / "model.onnx").is_file()]
        if missing:
            raise ValueError(f"load_textual_inversion: this engine directory has no inputs_embeds variant of "
                             f"{', '.join(missing)}; re-export the model with textual-inversion support")
        ti.load(path, ti.slots_for(d))  # an EmbeddingError naming the file if it does not fit the model
        token = token or _stored_token(path)
        if token != path.stem:
            if self._ti_dir is None:
                self._ti_dir = Path(tempfile.mkdtemp(prefix="sdrt-compat-ti-"))
            linked = self._ti_dir / f"{token}{path.suffix}"
            linked.unlink(missing_ok=True)
            try:
                os.link(path, linked)
            except OSError:
                shutil.copyfile(path, linked)
            path = linked
        self._embeddings = [e for e in self._embeddings if Path(e).stem != token] + [str(path)]


def _stored_token(path: Path) -> str:
    """The token diffusers reads from a file given no `token`: a one-tensor file's key (diffusers' format)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            keys = list(f.keys())
        if len(keys) == 1 and keys[0] not in ("emb_params", *ti.SDXL_KEYS):
            return keys[0]
    raise ValueError(f"load_textual_inversion: {path.name} names no token of its own; pass token=")
