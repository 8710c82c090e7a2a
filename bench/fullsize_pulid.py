"""A PuLID v1 file at full size for a UNet config, random weights: the layout of guozinan/PuLID's pulid_v1.bin
(reference/identity.md §3: IDEncoder 54.9 M params, 70 id_to_k/id_to_v pairs 340.8 M on SDXL), for `sdrt bench
--conditioning` (what the ID attention costs per step, what the ID encoder costs once per identity).

    python -m sdrt.bench.fullsize_pulid MODEL_FOLDER OUT.bin
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

TOKENS, LAYERS, HIDDEN = 5, 5, 1024  # PuLID's IDEncoder: 5 body tokens, 5 EVA layers, 1024-wide MLPs
ID_COND = 512 + 768  # ArcFace ‖ EVA-CLIP


def _mlp(prefix: str, widths: tuple[int, ...], g: torch.Generator) -> dict:
    """Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear at the file's indices 0, 1, 3, 4, 6."""
    state, (w_in, h1, h2, w_out) = {}, widths
    for index, (fan_in, fan_out) in zip((0, 3, 6), ((w_in, h1), (h1, h2), (h2, w_out))):
        state[f"{prefix}.{index}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
        state[f"{prefix}.{index}.bias"] = torch.zeros(fan_out)
    for index, width in ((1, h1), (4, h2)):
        state[f"{prefix}.{index}.weight"], state[f"{prefix}.{index}.bias"] = torch.ones(width), torch.zeros(width)
    return state


def pulid_state(model_folder: Path, seed: int = 0) -> dict:
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(model_folder / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    cross = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    state = _mlp("id_adapter.body", (ID_COND, HIDDEN, HIDDEN, cross * TOKENS), g)
    for j in range(LAYERS):
        state |= _mlp(f"id_adapter.mapping_{j}", (HIDDEN, HIDDEN, HIDDEN, cross), g)
        state |= _mlp(f"id_adapter.mapping_patch_{j}", (HIDDEN, HIDDEN, HIDDEN, cross), g)
    for i, name in enumerate(unet.attn_processors):  # the file's <i>: the position in attn_processors
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape[0]
            for proj in ("id_to_k", "id_to_v"):
                state[f"id_adapter_attn_layers.{i}.{proj}.weight"] = torch.randn(hidden, cross, generator=g) / cross ** 0.5
    return state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_folder", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    state = pulid_state(args.model_folder)
    partial = args.out.with_name(args.out.name + ".partial")
    torch.save(state, partial)
    partial.rename(args.out)
    params = sum(v.numel() for v in state.values())
    print(f"{args.out}: {params / 1e6:.1f} M parameters, {args.out.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
