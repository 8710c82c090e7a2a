"""Training the embedded "shapes" model (export/models/shapes.py) from a seed, and its command line.

Three stages, each recorded in OUT/training.json: the VAE on 64×64 crops; its decoder fine-tuned on whole images with
the encoder frozen; the UNet and text encoder together on cached VAE latents, which may be resumed for further rounds
with stronger offset noise. Also the helpers the extras' trainers share (export/models/shapes_lora.py,
shapes_controlnet.py, shapes_tiny_vae.py): the frozen model, latents, noise, arguments, shipping.

    python -m sdrt.export.models.shapes_train train OUT [--seed 0] [--vae-minutes M] [--unet-minutes M]
    python -m sdrt.export.models.shapes_train render OUT [--count N]
    python -m sdrt.export.models.shapes_train write OUT          # the shipped model as a diffusers folder (fp32)

The shipped training.json records these as `python -m sdrt.export.models.shapes …`: the module they lived in then.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from sdrt.export.exporter import versions
from sdrt.export.models import shapes_data as data
from sdrt.export.models.shapes import (SCHEDULER, add_extra, build_text_encoder, build_unet, build_vae, pack,
    write_shapes_pipeline, write_tokenizer)

TRAINED_WITH = ("torch", "diffusers", "transformers", "numpy")  # the versions a training record notes, after Python's


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images [n, h, w, 3] → float [n, 3, h, w] in [−1, 1], what the VAE takes."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# --- training ---------------------------------------------------------------------------------------------

def train_vae(out: Path, seed: int, minutes: float, log) -> dict:
    """MSE + small KL on rendered images; stops after `minutes` of wall time (or max steps)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    losses, t0, step = [], time.time(), 0
    while time.time() - t0 < minutes * 60:
        images, _ = data.batch(rng, 16)
        x = _random_crops(to_tensor(images), 64, rng)  # 64×64 crops: 4× the steps for the same compute
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        kl = post.kl().mean() / (4 * 16 * 16)
        loss = mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        elapsed = (time.time() - t0) / (minutes * 60)
        for g in opt.param_groups:  # cosine decay over the wall-time budget
            g["lr"] = 2e-3 * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(elapsed, 1.0))))
        opt.step()
        step += 1
        losses.append((step, float(mse.detach()), float(kl.detach())))
        if step % 100 == 0:
            log(f"vae step {step} mse {np.mean([l[1] for l in losses[-100:]]):.5f} kl {float(kl):.2f} "
                f"({time.time() - t0:.0f}s)")
    vae.eval()
    # latent scale: 1/std of the latents over fresh images, as SD's scaling_factor
    with torch.no_grad():
        zs = torch.cat([vae.encode(to_tensor(data.batch(rng, 32)[0])).latent_dist.mean for _ in range(4)])
    scale = float(1.0 / zs.std())
    vae.register_to_config(scaling_factor=round(scale, 5))
    vae.save_pretrained(out / "vae", safe_serialization=True)
    return {"steps": step, "batch": 16, "crop": 64, "seconds": round(time.time() - t0, 1),
            "scaling_factor": round(scale, 5),
            "final_mse": float(np.mean([l[1] for l in losses[-50:]])), "losses": losses[::10] + losses[-1:]}


def train_decoder(out: Path, seed: int, minutes: float, log) -> dict:
    """Fine-tune the VAE decoder on whole 128×128 images with the encoder frozen: the latent space (what the UNet
    learns) stays fixed. The first stage trains on 64×64 crops, and its decoder then smears the borders of whole
    images (right and bottom edges, a corner blob: MSE 0.033 on whole images against 0.0056 on crops).

    Independent of the UNet stage, so it may run beside it; it rewrites vae/ with the better decoder.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 3)
    rng = random.Random(seed + 3)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    encoder_state = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "post_quant"))}
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    losses, t0, step, bs = [], time.time(), 0, 8
    while time.time() - t0 < minutes * 60:
        images, _ = data.batch(rng, bs)
        x = to_tensor(images)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        mse = torch.nn.functional.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        mse.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        frac = min((time.time() - t0) / (minutes * 60), 1.0)
        for g in opt.param_groups:
            g["lr"] = 5e-4 * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
        opt.step()
        step += 1
        losses.append((step, float(mse.detach()), 0.0))
        if step % 100 == 0:
            log(f"decoder step {step} mse {np.mean([l[1] for l in losses[-100:]]):.5f} ({time.time() - t0:.0f}s)")
        if step % 500 == 0:
            vae.save_pretrained(out / "vae_decoder", safe_serialization=True)
    state = vae.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder_state.items())  # the encoder did not move
    vae.save_pretrained(out / "vae_decoder", safe_serialization=True)
    return {"steps": step, "batch": bs, "crop": None, "seconds": round(time.time() - t0, 1),
            "final_mse": float(np.mean([l[1] for l in losses[-100:]])), "losses": losses[::10] + losses[-1:]}


def _random_crops(x: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    out = []
    for img in x:
        top, left = rng.randrange(0, x.shape[2] - size + 1, 8), rng.randrange(0, x.shape[3] - size + 1, 8)
        out.append(img[:, top:top + size, left:left + size])
    return torch.stack(out)


def _encode_dataset(vae, rng: random.Random, n: int, log) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Latent distributions (mean, std) of n rendered training images, with their captions."""
    means, stds, captions = [], [], []
    with torch.no_grad():
        for i in range(0, n, 64):
            images, caps = data.batch(rng, 64)
            dist = vae.encode(to_tensor(images)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            captions += caps
            if i % 1024 == 0:
                log(f"encoded {i + 64}/{n}")
    return torch.cat(means), torch.cat(stds), captions


def train_unet(out: Path, seed: int, minutes: float, n_images: int, log, resume: bool = False,
               offset_noise: float = 0.1) -> dict:
    """UNet and text encoder together on cached VAE latents, epsilon objective, 10 % caption dropout.

    offset_noise: the training noise gets offset_noise · N(0, 1) per image and channel added (Guttenberg's offset
    noise). SD's schedule leaves √ᾱ_T ≈ 0.068 of the signal at the last timestep, so without it a model learns to
    read an image's mean colour from the initial noise (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed"): here whole flat backgrounds came out in random colours (background accuracy ≈ 20 %).
    A round at 0.1 made them the same wrong colour (mostly red or orange, 14 % right); a further round at 0.35 from
    those weights brought them to 100 % (training.json: unet_more, unet_more_2).

    resume=True continues from the (EMA) weights in out/unet and out/text_encoder with a fresh optimizer,
    a shorter warm-up and half the peak learning rate, on freshly rendered images.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed + 1 + 10 * resume)
    rng = random.Random(seed + 1 + 10 * resume)
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    scale = vae.config.scaling_factor
    vocab = write_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    text = build_text_encoder(vocab)
    unet = build_unet()
    if resume:
        unet = UNet2DConditionModel.from_pretrained(out / "unet")
        text = CLIPTextModel.from_pretrained(out / "text_encoder")
    peak, warmup = (5e-4, 50) if resume else (1e-3, 200)
    t_enc = time.time()
    means, stds, captions = _encode_dataset(vae, rng, n_images, log)
    encode_s = time.time() - t_enc
    del vae
    ids_all = tokenizer(captions + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty_ids = ids_all[-1:]
    ids_all = ids_all[:-1]
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "timestep_spacing"})
    acp = noise_sched.alphas_cumprod
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    ema = {k: v.detach().clone() for k, v in list(unet.state_dict().items()) + [
        ("text." + k, v) for k, v in text.state_dict().items()]}
    losses, t0, step, bs = [], time.time(), 0, 32
    budget = minutes * 60
    gen = torch.Generator().manual_seed(seed + 2)
    while time.time() - t0 < budget:
        idx = torch.randint(0, len(captions), (bs,), generator=gen)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        ids = ids_all[idx].clone()
        drop = torch.rand(bs, generator=gen) < 0.1
        ids[drop] = empty_ids
        t = torch.randint(0, 1000, (bs,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        if offset_noise:
            noise = noise + offset_noise * torch.randn(bs, z.shape[1], 1, 1, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        ctx = text(ids).last_hidden_state
        pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        frac = min((time.time() - t0) / budget, 1.0)
        warm = min(1.0, (step + 1) / warmup)
        for g in opt.param_groups:
            g["lr"] = peak * warm * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
        opt.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            cur = dict(unet.state_dict()) | {"text." + k: v for k, v in text.state_dict().items()}
            for k, v in cur.items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        losses.append((step, float(loss)))
        if step % 50 == 0:
            log(f"unet step {step} loss {np.mean([l[1] for l in losses[-50:]]):.4f} ({time.time() - t0:.0f}s)")
        if step % 1000 == 0:
            _save_unet_text(out, unet, text, ema)
    _save_unet_text(out, unet, text, ema)
    return {"steps": step, "batch": bs, "seconds": round(time.time() - t0, 1), "cached_latents": n_images,
            "resumed": resume, "peak_lr": peak, "offset_noise": offset_noise,
            "encode_seconds": round(encode_s, 1), "caption_dropout": 0.1, "ema": 0.999,
            "final_loss": float(np.mean([l[1] for l in losses[-200:]])), "losses": losses[::20] + losses[-1:]}


def _save_unet_text(out: Path, unet, text, ema: dict) -> None:
    """Save the EMA weights (unet/, text_encoder/) without disturbing the training copies."""
    import copy

    u, te = copy.deepcopy(unet), copy.deepcopy(text)
    u.load_state_dict({k: v for k, v in ema.items() if not k.startswith("text.")})
    te.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("text.")})
    u.save_pretrained(out / "unet", safe_serialization=True)
    te.save_pretrained(out / "text_encoder", safe_serialization=True)


# --- what the extras' trainers (export/models/shapes_lora.py, shapes_controlnet.py, shapes_tiny_vae.py) share -----

def load_frozen(model: Path):
    """(vae, text encoder, tokenizer, unet) of a shapes-model diffusers folder in eval mode, the UNet without
    gradients: the parts an adapter is trained against."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = Path(model)  # loaded in the order the trainers first used
    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    text = CLIPTextModel.from_pretrained(model / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    unet = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    unet.requires_grad_(False)
    return vae, text, tokenizer, unet


def training_alphas() -> torch.Tensor:
    """ᾱ_t of the model's training schedule (DDPM with SCHEDULER's betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "timestep_spacing"}).alphas_cumprod


def sample_latents(vae, images: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """Scaled latents of uint8 images, one posterior sample each (no gradients)."""
    with torch.no_grad():
        dist = vae.encode(to_tensor(images)).latent_dist
        return (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * vae.config.scaling_factor


def add_noise(z: torch.Tensor, acp: torch.Tensor, gen: torch.Generator):
    """(noisy latents, timesteps, noise): uniform t, then √ᾱ_t·z + √(1−ᾱ_t)·ε."""
    t = torch.randint(0, 1000, (z.shape[0],), generator=gen)
    noise = torch.randn(z.shape, generator=gen)
    a = acp[t].view(-1, 1, 1, 1)
    return a.sqrt() * z + (1 - a).sqrt() * noise, t, noise


def trainer_parser(prog: str, description: str, minutes: float):
    """The arguments every adapter trainer takes: OUT, --model, --minutes, --seed, --threads, --ship."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("out", type=Path)
    p.add_argument("--model", type=Path, default=None, help="a diffusers folder (default: the shipped shapes model)")
    p.add_argument("--minutes", type=float, default=minutes)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ship", action="store_true", help="then add it to the package (export/models/shapes_model/extras)")
    return p


def run_trainer(args, train, shipped_as: dict[Path, str]) -> None:
    """What every adapter trainer's main does after parsing: train(model) against --model or the shipped model
    written to a temporary folder, then, with --ship, add_extra(src, rel) for each of `shipped_as`; print the
    record without its versions."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record = train(args.model or write_shapes_pipeline(Path(tmp) / "model"))
    if args.ship:
        for src, rel in shipped_as.items():
            add_extra(src, rel)
    print(json.dumps({k: v for k, v in record.items() if k != "versions"}))


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing what was there (the trainers save beside, then rename)."""
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def assemble(out: Path) -> None:
    """Write model_index.json and the scheduler so `out` is a full StableDiffusionPipeline folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(out / "vae"), unet=UNet2DConditionModel.from_pretrained(out / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(out / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        scheduler=EulerDiscreteScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out / "tokenizer")  # transformers 5 saves tokenizer.json only; add CLIP's own files


def more_rounds(record: dict) -> list[str]:
    """The record's resumed UNet rounds in order: unet_more, unet_more_2, …"""
    keys = [k for k in record if k == "unet_more" or k.startswith("unet_more_")]
    return sorted(keys, key=lambda k: 1 if k == "unet_more" else int(k.rsplit("_", 1)[1]))


def _plot(record: dict, path: Path) -> None:
    """A loss plot as a PNG drawn with PIL (no matplotlib dependency)."""
    from PIL import Image, ImageDraw

    unet = list(record["unet"]["losses"])
    done = record["unet"]["steps"]
    for key in more_rounds(record):  # each resumed round continues the step count
        unet += [(done + s, v) for s, v in record[key]["losses"]]
        done += record[key]["steps"]
    series = [("vae mse", [(s, m) for s, m, _ in record["vae"]["losses"]], (40, 70, 220)),
              ("unet eps mse", unet, (220, 40, 40))]
    if "decoder" in record:
        series.append(("decoder mse", [(s, m) for s, m, _ in record["decoder"]["losses"]], (40, 170, 60)))
    w, h = 20 + 300 * len(series), 360
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    for i, (name, pts, colour) in enumerate(series):
        if not pts:
            continue
        x0, x1 = 20 + i * 300, 290 + i * 300
        steps = [p[0] for p in pts]
        vals = np.log10(np.maximum([p[1] for p in pts], 1e-6))
        lo, hi = float(vals.min()), float(vals.max()) + 1e-9
        xy = [(x0 + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (x1 - x0), 320 - (v - lo) / (hi - lo) * 260)
              for s, v in zip(steps, vals)]
        d.line(xy, fill=colour, width=1)
        d.rectangle([x0, 60, x1, 320], outline="black")
        d.text((x0, 20), f"{name} (log10 {lo:.2f}..{hi:.2f}), steps 0..{steps[-1]}", fill="black")
    img.save(path)


def train(out: Path, seed: int = 0, vae_minutes: float = 8, unet_minutes: float = 36, n_images: int = 8000,
          stages: str = "vae,unet,decoder", decoder_minutes: float = 20, threads: int = 1,
          more_minutes: float = 0, offset_noise: float = 0.1) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)  # 1: on a busy 2-core machine, 2 OpenMP threads stall at every barrier
    log_file = (out / "train.log").open("a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    record_path = out / "training.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record |= {"command": f"python -m sdrt.export.models.shapes_train train {out} --seed {seed} "
                          f"--vae-minutes {vae_minutes} --unet-minutes {unet_minutes} --images {n_images} "
                          f"--decoder-minutes {decoder_minutes} --stages {stages} --threads {threads} "
                          f"--more-minutes {more_minutes} --offset-noise {offset_noise}",
               "seed": seed, "versions": versions(TRAINED_WITH, python=True), "threads": torch.get_num_threads()}
    t0 = time.time()
    if "vae" in stages:
        log("training the VAE")
        record["vae"] = train_vae(out, seed, vae_minutes, log)
        record_path.write_text(json.dumps(record, indent=1))
    if "unet" in stages:
        log("training the UNet and text encoder")
        record["unet"] = train_unet(out, seed, unet_minutes, n_images, log)
    if "more" in stages:  # another UNet/text-encoder round, resumed from the last one's EMA weights
        log(f"continuing the UNet and text encoder (offset noise {offset_noise})")
        rounds = more_rounds(record)
        key = "unet_more" if not rounds else f"unet_more_{len(rounds) + 1}"
        record[key] = train_unet(out, seed, more_minutes, n_images, log, resume=True, offset_noise=offset_noise) | \
            {"offset_noise": offset_noise}
    if "decoder" in stages:
        log("fine-tuning the VAE decoder (encoder frozen)")
        record["decoder"] = train_decoder(out, seed, decoder_minutes, log)
    if (out / "vae_decoder").is_dir():  # the fine-tuned decoder replaces the first one
        shutil.rmtree(out / "vae")
        (out / "vae_decoder").rename(out / "vae")
    assemble(out)
    record["wall_seconds"] = round(time.time() - t0 + record.get("wall_seconds", 0) * ("vae" not in stages), 1)
    record["params"] = {}
    for name in ("vae", "unet", "text_encoder"):
        from safetensors.torch import load_file

        record["params"][name] = sum(t.numel() for t in load_file(out / name / _weights_name(out / name)).values())
    record_path.write_text(json.dumps(record, indent=1))
    if "vae" in record and "unet" in record:
        _plot(record, out / "loss.png")
    log(f"done in {record['wall_seconds']}s")
    return record


def _weights_name(folder: Path) -> str:
    return next(p.name for p in folder.glob("*.safetensors"))


# --- CLI --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sdrt.export.models.shapes_train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the model from a seed into OUT (a diffusers folder)")
    t.add_argument("out", type=Path)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--vae-minutes", type=float, default=8)
    t.add_argument("--unet-minutes", type=float, default=36)
    t.add_argument("--images", type=int, default=8000, help="rendered images whose VAE latents the UNet trains on")
    t.add_argument("--decoder-minutes", type=float, default=20)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--more-minutes", type=float, default=0, help="stage 'more': resumed UNet/text-encoder training")
    t.add_argument("--offset-noise", type=float, default=0.1, help="stage 'more': the offset noise's scale")
    t.add_argument("--stages", default="vae,unet,decoder",
                   help="any of vae, unet, decoder (decoder only needs vae, so it may run beside unet)")
    t.add_argument("--pack", action="store_true", help="then copy the result into the package (export/models/shapes_model)")
    r = sub.add_parser("render", help="draw N captioned examples of the data set into OUT")
    r.add_argument("out", type=Path)
    r.add_argument("--count", type=int, default=16)
    r.add_argument("--seed", type=int, default=0)
    w = sub.add_parser("write", help="write the shipped (hash-checked) model as a diffusers folder")
    w.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "train":
        train(a.out, a.seed, a.vae_minutes, a.unet_minutes, a.images, a.stages, a.decoder_minutes, a.threads,
              a.more_minutes, a.offset_noise)
        if a.pack:
            pack(a.out)
    elif a.cmd == "render":
        from PIL import Image

        a.out.mkdir(parents=True, exist_ok=True)
        rng = random.Random(a.seed)
        lines = []
        for i in range(a.count):
            spec = data.random_spec(rng)
            Image.fromarray(data.render(spec, rng)).save(a.out / f"{i:04d}.png")
            lines.append(f"{i:04d}.png\t{spec.caption}")
        (a.out / "captions.tsv").write_text("\n".join(lines) + "\n")
        print(f"{a.count} images and captions.tsv in {a.out}")
    else:
        print(write_shapes_pipeline(a.out))


if __name__ == "__main__":
    main()
