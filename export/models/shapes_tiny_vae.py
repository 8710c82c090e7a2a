"""A tiny VAE (diffusers' `AutoencoderTiny`, TAESD's architecture) for the shapes model, trained here in minutes, so
`--vae tiny`, previews and the tiny VAE's accuracy cost can be measured on a model that draws something.

    python -m sdrt.export.models.shapes_tiny_vae OUT_FOLDER [--model FOLDER] [--minutes 10] [--ship]

TAESD's conventions (../shared/reference/customization.md §6.2): the decoder takes UNet-space latents (the shapes
VAE's latents times its scaling_factor; AutoencoderTiny's own scaling_factor stays 1.0) and the encoder returns
them. Training, the full VAE frozen: each batch of 16 rendered 128×128 images is encoded by the full VAE (one
posterior sample, scaled); a random 64×64 crop of the batch (8×8 latents: the convolutions see every position,
at a quarter of the cost) trains the tiny decoder, latents → the rendered image (MSE in [−1, 1]), and the tiny
encoder, image → the posterior mean (MSE). Width 32 instead of TAESD's 64 (the shapes are flat colours). The
result is an AutoencoderTiny folder that `sdrt export MODEL --tiny-vae OUT_FOLDER` exports like TAESD.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdrt.export.exporter import versions
from sdrt.export.models import shapes_data as data
from sdrt.export.models.shapes_train import (TRAINED_WITH, load_frozen, replace_folder, run_trainer, to_tensor,
    trainer_parser)

WIDTH = 32


def build_tiny_vae():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(encoder_block_out_channels=(WIDTH,) * 4, decoder_block_out_channels=(WIDTH,) * 4)


def train_tiny_vae(model: Path, out: Path, minutes: float = 10.0, seed: int = 0, threads: int = 1,
                   log=lambda line: print(line, flush=True)) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = load_frozen(model)[0]
    scale = vae.config.scaling_factor
    tiny = build_tiny_vae().train()
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    losses, t0, step = [], time.time(), 0
    while time.time() - t0 < minutes * 60:
        images = to_tensor(data.batch(rng, 16)[0])  # [16, 3, 128, 128] in [−1, 1]
        with torch.no_grad():
            dist = vae.encode(images).latent_dist
            mean = dist.mean * scale  # [16, 4, 16, 16], UNet space
            z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * scale
        i, j = rng.randrange(0, 9), rng.randrange(0, 9)  # the crop's latent offset: 8×8 of 16×16
        z, mean = z[:, :, i:i + 8, j:j + 8], mean[:, :, i:i + 8, j:j + 8]
        crop = images[:, :, 8 * i:8 * i + 64, 8 * j:8 * j + 64]
        decode_loss = torch.nn.functional.mse_loss(tiny.decode(z).sample, crop)
        encode_loss = torch.nn.functional.mse_loss(tiny.encode(crop).latents, mean)
        opt.zero_grad(set_to_none=True)
        (decode_loss + encode_loss).backward()
        frac = min((time.time() - t0) / (minutes * 60), 1.0)
        for g in opt.param_groups:
            g["lr"] = 1e-3 * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
        opt.step()
        step += 1
        losses.append((float(decode_loss.detach()), float(encode_loss.detach())))
        if step % 50 == 0:
            d, e = np.mean(losses[-50:], axis=0)
            log(f"tiny vae step {step} decode {d:.4f} encode {e:.4f} ({time.time() - t0:.0f}s)")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tiny.eval().save_pretrained(tmp, safe_serialization=True)
    d, e = np.mean(losses[-50:], axis=0)
    record = {"command": f"python -m sdrt.export.models.shapes_tiny_vae {out} --minutes {minutes} --seed {seed} "
                         f"--threads {threads}",
              "seed": seed, "steps": step, "batch": 16, "crop": 64, "seconds": round(time.time() - t0, 1),
              "width": WIDTH,
              "final_decode_mse": float(d), "final_encode_mse": float(e),
              "versions": versions(TRAINED_WITH, python=True)}
    (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    replace_folder(tmp, out)
    return record


def main(argv: list[str] | None = None) -> None:
    a = trainer_parser("python -m sdrt.export.models.shapes_tiny_vae", __doc__.split("\n")[0], minutes=10.0).parse_args(argv)
    run_trainer(a, lambda model: train_tiny_vae(model, a.out, a.minutes, a.seed, a.threads), {a.out: "tiny-vae"})


if __name__ == "__main__":
    main(sys.argv[1:])
