"""Engines per LoRA set: rebuilt from the stored base weights plus the set's deltas, never accumulated (DESIGN.md
§4a). ONNX Runtime gets new sessions whose replaced initializers are the merged weights
(`SessionOptions.add_external_initializers`); TensorRT refits (engines/trt_refit.py); the torch reference engine adds
the deltas to a copy of its module: each backend's own `adapted` method (engines/base.py). Adapted engines are
cached per (component, LoRA set, scales), at most MAX_ADAPTED_PER_COMPONENT per component beside the resident ones,
least recently used first out."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sdrt.runtime.lora.keys import COMPONENTS
from sdrt.runtime.lora.files import LoraError, LoraRef, Model, deltas, normalize_entries
from sdrt.runtime.lora.refs import combine, resolve, set_key, touching
from sdrt.runtime.lora.weights import base_initializer, lora_component, merged_initializers, model_for, weights_map

MAX_ADAPTED_PER_COMPONENT = 2


class Adapters:
    """The engines of one pipeline per LoRA set: resident ones (the base, or the set given at load) and a
    bounded LRU of adapted ones, each built from the stored base weights plus the set's deltas."""

    def __init__(self, engine_dir, engines: Callable[[], dict], lora_dir: Path | None = None,
                 max_per_component: int = MAX_ADAPTED_PER_COMPONENT):
        self.dir = engine_dir
        self._engines = engines  # the pipeline's current engine dict (callers may wrap or replace its engines)
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.max_per_component = max_per_component
        self.base: tuple[LoraRef, ...] = ()
        self.resident: dict[str, tuple] = {}  # component → LoRA set key its resident engine holds (absent: none)
        self.cache: OrderedDict[tuple, object] = OrderedDict()
        self._model: Model | None = None

    @property
    def model(self) -> Model:
        if self._model is None:
            self._model = model_for(self.dir)
        return self._model

    def resolve(self, entries: Sequence) -> tuple[LoraRef, ...]:
        return resolve(normalize_entries(entries), self.model, self.lora_dir)

    def use(self, refs: Sequence[LoraRef], lora_dir: Path | None) -> None:
        """Pipeline.load's settings: the LoRA folder, and the set every request starts from."""
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        if refs:
            self.set_base(refs)

    def set_base(self, refs: Sequence[LoraRef]) -> None:
        """Make `refs` the set every request starts from: the resident engines are rebuilt with it."""
        self.base = tuple(refs)
        engines = self._engines()
        for name in list(engines):
            key = set_key(self.base, lora_component(name))
            if key != self.resident.get(name, ()):
                engines[name] = self._build(name, touching(self.base, name), engines[name])
                self.resident[name] = key

    def engine(self, name: str, refs: Sequence[LoraRef] = ()):
        """The engine of component `name` for a job whose own LoRAs are `refs`."""
        resident = self._engines()[name]
        if lora_component(name) not in COMPONENTS:
            return resident
        wanted = combine(self.base, refs)
        key = set_key(wanted, lora_component(name))
        if key == self.resident.get(name, ()):  # (a refitted TensorRT engine is resident with its set's key)
            return resident
        cached = self.cache.get((name, key))
        if cached is not None:
            self.cache.move_to_end((name, key))
            return cached
        engine = self._build(name, touching(wanted, lora_component(name)), resident)
        if engine is resident:  # refitted in place (TensorRT): one engine per component, resident with this set
            self.resident[name] = key
            return resident
        self.cache[(name, key)] = engine
        mine = [k for k in self.cache if k[0] == name]
        for k in mine[:max(0, len(mine) - self.max_per_component)]:
            del self.cache[k]
        return engine

    # ---- building ----
    def merged(self, name: str, refs: Sequence[LoraRef]) -> dict[str, np.ndarray]:
        """{initializer: base + Σ deltas} for component `name` and the set `refs` (empty for no LoRA)."""
        component_deltas = deltas(refs, self.model, lora_component(name))
        doc = weights_map(self.dir.path, name)
        return merged_initializers(self.dir.path / name, doc, component_deltas)

    def _build(self, name: str, refs: Sequence[LoraRef], template):
        """`template`'s engine holding the base weights plus `refs`' deltas: the backend's own swap (ONNX Runtime: a
        new session; TensorRT: a refit in place, which returns `template`; torch: a module copy), engines/base.py."""
        adapt = getattr(template, "adapted", None)
        if adapt is None:
            raise LoraError(f"LoRAs at load need the ONNX Runtime, TensorRT or torch backend, not "
                            f"{type(template).__name__}")
        doc = lambda: weights_map(self.dir.path, name)  # noqa: E731 (read when a backend needs it)
        return adapt(AdaptedWeights(
            onnx_path=self.dir.onnx_path(name),
            merged=lambda: self.merged(name, refs),
            base=lambda init: base_initializer(self.dir.path / name, doc(), doc().get("external", {})[init]),
            module_deltas=lambda: deltas(refs, self.model, name)))


@dataclass(frozen=True)
class AdaptedWeights:
    """What an engine's `adapted` may read to take a LoRA set (each computed only when called): the component's
    ONNX file, its merged initializers (ONNX names, as the weights map and TensorRT's refit name them), one
    initializer's stored base value (what a refit pushes back), and the deltas by torch module path."""

    onnx_path: Path
    merged: Callable[[], dict[str, np.ndarray]]
    base: Callable[[str], np.ndarray]
    module_deltas: Callable[[], dict[str, np.ndarray]]
