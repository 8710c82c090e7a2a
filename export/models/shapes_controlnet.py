"""A ControlNet for the shapes model, trained here in minutes: the control image is a shape mask (white on black),
and the generated shape takes the mask's place and outline while the caption picks the colours.

    python -m sdrt.export.models.shapes_controlnet OUT_FOLDER [--model FOLDER] [--minutes 12]

Training: diffusers' ControlNetModel.from_unet(the shipped UNet) (its zero convolutions start at zero, so it begins
as a no-op), UNet, text encoder and VAE frozen; each example is a rendered caption image and the mask of its shape
drawn with the same jitter; epsilon MSE on VAE latents with 10 % caption dropout. The result is a diffusers
ControlNetModel folder that `sdrt export MODEL --controlnet OUT_FOLDER=mask` exports like any other.
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
from sdrt.export.models.shapes_train import (TRAINED_WITH, add_noise, load_frozen, replace_folder, run_trainer,
    sample_latents, trainer_parser, training_alphas)


def mask_of(spec: data.Spec, rng_state) -> np.ndarray:
    """The spec's shape in white on black, drawn with the jitter `rng_state` gives render() (uint8 HWC)."""
    rng = random.Random()
    rng.setstate(rng_state)
    return data.render(replace(spec, colour="white", background="black"), rng)


def pairs(rng: random.Random, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n (image, mask, caption) examples; half the captions leave the position out (the mask alone places it)."""
    images, masks, captions = [], [], []
    for i in range(n):
        spec = data.random_spec(rng)
        state = rng.getstate()
        images.append(data.render(spec, rng))
        masks.append(mask_of(spec, state))
        captions.append((spec if i % 2 else replace(spec, position=None)).caption)
    return np.stack(images), np.stack(masks), captions


def train_controlnet(model: Path, out: Path, minutes: float = 12.0, seed: int = 0, threads: int = 1,
                     log=print) -> dict:
    from diffusers import ControlNetModel

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae, text, tokenizer, unet = load_frozen(model)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64, 64))
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    acp = training_alphas()
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(seed + 1)
    losses, t0, step, bs = [], time.time(), 0, 16
    while time.time() - t0 < minutes * 60:
        images, masks, captions = pairs(rng, bs)
        z = sample_latents(vae, images, gen)
        with torch.no_grad():
            ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
            ids[torch.rand(bs, generator=gen) < 0.1] = empty
            ctx = text(ids).last_hidden_state
        cond = torch.from_numpy(masks).permute(0, 3, 1, 2).float() / 255.0  # [0, 1], as diffusers feeds control images
        noisy, t, noise = add_noise(z, acp, gen)
        down, mid = net(noisy, t, ctx, controlnet_cond=cond, return_dict=False)
        pred = unet(noisy, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        frac = min((time.time() - t0) / (minutes * 60), 1.0)
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            log(f"controlnet step {step} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    net.save_pretrained(tmp, safe_serialization=True)
    replace_folder(tmp, out)
    record = {"command": f"python -m sdrt.export.models.shapes_controlnet {out} --minutes {minutes} --seed {seed} "
                         f"--threads {threads}",
              "seed": seed, "steps": step, "batch": bs, "seconds": round(time.time() - t0, 1),
              "final_loss": float(np.mean(losses[-50:])), "versions": versions(TRAINED_WITH, python=True)}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    a = trainer_parser("python -m sdrt.export.models.shapes_controlnet", __doc__.split("\n")[0], minutes=12.0).parse_args(argv)
    run_trainer(a, lambda model: train_controlnet(model, a.out, a.minutes, a.seed, a.threads),
                {a.out: "controlnet-mask"})


if __name__ == "__main__":
    main(sys.argv[1:])
