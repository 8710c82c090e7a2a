"""Statistics over the timed runs: median, p90 and the rest per stage, achieved FLOP/s, and image quality (PSNR)."""

from __future__ import annotations

from sdrt.bench.measure.timing import STAGE_OF, STAGES


def stats(values: list[float]) -> dict:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "min": float(a.min()),
            "max": float(a.max()), "mean": float(a.mean()), "n": int(a.size)}


def run_flops(sample: dict, per_image: dict[str, int]) -> dict:
    """FLOPs of one run per stage, from the calls it made (batch × per-image count of that component)."""
    out = {"text_encoding": 0, "unet": 0, "vae_decode": 0}
    for component, batch, _ in sample["calls"]:  # the step-caching full graph counts as the UNet; its shallow one 0
        count = per_image.get(component, per_image.get("unet", 0) if component == "unet_deepcache" else 0)
        out[STAGE_OF[component]] += batch * count
    out["end_to_end"] = sum(out.values())
    return out


def summarize(raw: dict, per_image: dict[str, int], peak_flops: float, images_per_run: int) -> dict:
    """Stats per stage over the timed runs; images/s; achieved FLOP/s per stage and its share of the peak."""
    if raw.get("status") != "ok":
        return raw
    samples = raw["samples"]
    by_stage = {stage: stats([s[stage] for s in samples]) for stage in STAGES}
    steps = len(samples[0]["unet_steps"])
    per_step = [stats([s["unet_steps"][i] for s in samples]) for i in range(steps)]
    all_steps = stats([t for s in samples for t in s["unet_steps"]]) if steps else None
    flops = run_flops(samples[0], per_image)
    achieved = {}
    for stage, count in flops.items():
        median = by_stage[stage]["median"]
        rate = count / median if median > 0 else 0.0
        achieved[stage] = {"flops": count, "flops_per_second": rate,
                           "fraction_of_peak": rate / peak_flops if peak_flops else None}
    return {**raw, "stats": {**by_stage, "unet_step": all_steps, "unet_steps": per_step},
            "images_per_second": images_per_run / by_stage["end_to_end"]["median"],
            "achieved": achieved}



def psnr(a, b) -> float:
    """PSNR in dB between two uint8 images (inf when equal)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def quality(backends: dict) -> dict:
    """With step caching or the tiny VAE: each backend's first image against diffusers' plain run (PSNR, dB)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    def image(b):
        text = b.get("image_png_b64")
        return None if not text else np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))

    reference = image(backends.get("diffusers", {}))
    if reference is None:
        return {}
    return {name: psnr(img, reference) for name, b in backends.items()
            if name != "diffusers" and (img := image(b)) is not None and img.shape == reference.shape}
