"""LoRA at export: W += Σ scale · ΔW in the torch modules before they are traced (`sdrt export --lora`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sdrt.runtime.lora.keys import UnetLayout
from sdrt.runtime.lora.files import Model, deltas
from sdrt.runtime.lora.refs import resolve


# ---- export: fusing into the torch modules before they are traced ----------------------------------------

def model_from_modules(modules: dict, unet_config: dict, family: str) -> Model:
    """The Model of torch components ({"unet": module, "text_encoder": module, …}) for export-time fusing."""
    import torch

    from sdrt.runtime.lora.keys import canonical

    targets = {}
    for component, module in modules.items():
        targets[component] = {canonical(component, n): tuple(m.weight.shape) for n, m in module.named_modules()
                              if n and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return Model(targets, UnetLayout.from_config(unet_config), family)


def fuse_into_modules(modules: dict, model: Model, entries: Sequence[tuple[str, float]]) -> list[dict]:
    """W += Σ scale · ΔW (fp32) in the torch modules; returns the manifest's record of each file."""
    import torch

    refs = resolve([(str(Path(p).expanduser()), s) for p, s in entries], model, None)
    for component, module in modules.items():
        names = {n for n, _ in module.named_modules()}
        with torch.no_grad():
            for path, delta in deltas(refs, model, component).items():
                target = module.get_submodule(path if path in names else "text_model." + path)
                w = target.weight
                target.weight.copy_((w.float() + torch.from_numpy(delta).reshape(w.shape)).to(w.dtype))
    return [{"file": Path(r.path).name, "sha256": r.sha256, "scale": r.scale, "components": list(r.components)}
            for r in refs]
