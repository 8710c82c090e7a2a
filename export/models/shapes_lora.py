"""A LoRA for the shapes model, trained here in minutes: shapes the caption calls SOURCE-coloured come out TARGET.

It gives the LoRA tests something a LoRA that does nothing cannot pass: with it, "a red circle on a blue background"
shows a green circle; without it, a red one (bench/shapes_eval.py classifies the pixels).

    python -m sdrt.export.models.shapes_lora OUT_FILE [--model FOLDER] [--minutes 6] [--source red --target green]

Training: peft LoRA layers (rank 4, B zero-initialised) on every attention projection of the shipped UNet, all other
weights frozen; each batch of 16 is half captions naming SOURCE drawn in TARGET and half ordinary captions drawn as
captioned (so other colours stay); epsilon MSE on VAE latents. Saved in diffusers' LoRA layout
(`unet.<module>.lora_A.weight` / `lora_B.weight`, alpha = rank), which `sdrt run --lora` and diffusers'
load_lora_weights read.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sdrt.export.exporter import versions
from sdrt.export.models import shapes_data as data
from sdrt.export.models.shapes_train import (TRAINED_WITH, add_noise, load_frozen, run_trainer, sample_latents,
    trainer_parser, training_alphas)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _batch(rng: random.Random, n: int, source: str, target: str) -> tuple[np.ndarray, list[str]]:
    """n images: the first half captioned with `source` but drawn in `target`, the rest drawn as captioned."""
    images, captions = [], []
    for i in range(n):
        spec = data.random_spec(rng)
        if i < n // 2:
            while spec.colour != source or spec.background == target:
                spec = data.random_spec(rng)
            drawn = replace(spec, colour=target)
        else:
            while source in (spec.colour, spec.background):
                spec = data.random_spec(rng)
            drawn = spec
        images.append(data.render(drawn, rng))
        captions.append(spec.caption)
    return np.stack(images), captions


def train_lora(model: Path, out: Path, minutes: float = 6.0, seed: int = 0, rank: int = 4, source: str = "red",
               target: str = "green", threads: int = 1, log=print) -> dict:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae, text, tokenizer, unet = load_frozen(model)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    acp = training_alphas()
    gen = torch.Generator().manual_seed(seed + 1)
    losses, t0, step = [], time.time(), 0
    while time.time() - t0 < minutes * 60:
        images, captions = _batch(rng, 16, source, target)
        z = sample_latents(vae, images, gen)
        with torch.no_grad():
            ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
            ctx = text(ids).last_hidden_state
        noisy, t, noise = add_noise(z, acp, gen)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, ctx).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        frac = min((time.time() - t0) / (minutes * 60), 1.0)
        for g in opt.param_groups:
            g["lr"] = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            log(f"lora step {step} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)")
    layers = {f"unet.{k}": v.detach().contiguous().clone() for k, v in get_peft_model_state_dict(unet).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(layers, str(tmp), metadata={"source": source, "target": target, "rank": str(rank)})
    tmp.replace(out)
    record = {"command": f"python -m sdrt.export.models.shapes_lora {out} --minutes {minutes} --seed {seed} --rank {rank} "
                         f"--source {source} --target {target} --threads {threads}",
              "seed": seed, "steps": step, "batch": 16, "seconds": round(time.time() - t0, 1), "rank": rank,
              "targets": TARGETS, "final_loss": float(np.mean(losses[-50:])),
              "versions": versions(TRAINED_WITH, python=True)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    p = trainer_parser("python -m sdrt.export.models.shapes_lora", __doc__.split("\n")[0], minutes=6.0)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--source", default="red", choices=list(data.COLOURS))
    p.add_argument("--target", default="green", choices=list(data.COLOURS))
    a = p.parse_args(argv)
    name = f"{a.source}-to-{a.target}"
    run_trainer(a, lambda model: train_lora(model, a.out, a.minutes, a.seed, a.rank, a.source, a.target, a.threads),
                {a.out: f"{name}.safetensors", a.out.with_suffix(".json"): f"{name}.json"})


if __name__ == "__main__":
    main(sys.argv[1:])
