"""Semantic check of the embedded shapes model: does the generated image show what the caption asks for?

Each image is classified by pixel analysis alone: every pixel is snapped to the nearest palette colour
(pixels far from all of them are ignored); the background is the most common colour, the shape colour the
most common other colour; the shape kind comes from its largest connected region's fill ratio in its
bounding box (square ≈ 1.0, circle ≈ 0.79, triangle ≈ 0.5, star ≈ 0.35) and whether the box's corners
are filled. Captions are fixed: colour/shape pairs the training set drew ("seen") and pairs it never did
("held-out", shapes_data.HELD_OUT).

    python -m sdrt.bench.shapes_eval [--engine DIR] [--precision fp32|fp16] [--backend ort-cpu|torch] [--steps 20]
                                     [--guidance 7.5] [--sampler euler] [--cache-interval N] [-o FOLDER]

Without --engine the shipped model is exported (with --cache-interval > 1 also its step-caching graphs) into a
temporary folder first. Reports the accuracy a speed-up that trades exactness (fp16, step caching) costs.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.export.models.shapes_data import COLOURS, HELD_OUT, Spec

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
_MAX_DIST = 80.0  # RGB distance beyond which a pixel belongs to no palette colour (blurred edges)
_MIN_SHAPE_PIXELS = 40


@dataclass(frozen=True)
class Seen:
    background: str | None
    colour: str | None
    shape: str | None
    fill: float = 0.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (plain BFS; images are 128×128)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        size, queue = 0, deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best


def shape_kind(mask: np.ndarray) -> tuple[str, float]:
    """circle | square | triangle | star from a shape mask, and the fill ratio it was decided by."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    fill = float(box.mean())
    h, w = box.shape
    k = max(1, min(h, w) // 8)
    corners = np.mean([box[:k, :k].mean(), box[:k, -k:].mean(), box[-k:, :k].mean(), box[-k:, -k:].mean()])
    if fill > 0.88 or (fill > 0.8 and corners > 0.6):
        return "square", fill
    if fill > 0.64:
        return "circle", fill
    if fill > 0.42:
        return "triangle", fill
    return "star", fill


def classify(image) -> Seen:
    """Background colour, shape colour and shape kind of an RGB image (PIL image or HWC uint8 array)."""
    px = np.asarray(image, dtype=np.float32)[..., :3]
    dist = np.linalg.norm(px[:, :, None, :] - _PALETTE[None, None], axis=-1)  # H×W×colours
    label = dist.argmin(-1)
    label[dist.min(-1) > _MAX_DIST] = -1
    counts = np.bincount(label[label >= 0].ravel(), minlength=len(_NAMES))
    if counts.sum() == 0:
        return Seen(None, None, None)
    bg = int(counts.argmax())
    counts[bg] = 0
    if counts.max() < _MIN_SHAPE_PIXELS:
        return Seen(_NAMES[bg], None, None)
    fg = int(counts.argmax())
    kind, fill = shape_kind(_largest_component(label == fg))
    return Seen(_NAMES[bg], _NAMES[fg], kind, fill)


def eval_specs() -> list[Spec]:
    """The fixed caption set: 8 seen and 4 held-out colour/shape pairs, 3 variants each."""
    seen = [("red", "circle"), ("blue", "square"), ("orange", "triangle"), ("white", "star"),
            ("yellow", "circle"), ("green", "square"), ("black", "triangle"), ("purple", "star")]
    backgrounds = ["blue", "black", "yellow", "red", "green", "white", "purple", "orange"]
    specs = []
    for i, (colour, shape) in enumerate(seen + sorted(HELD_OUT)):
        bgs = [b for b in backgrounds if b != colour]
        specs += [Spec(shape, colour, bgs[i % len(bgs)]),
                  Spec(shape, colour, bgs[(i + 3) % len(bgs)], size="large"),
                  Spec(shape, colour, bgs[(i + 5) % len(bgs)], position=("left", "right", "top", "bottom")[i % 4])]
    return specs


def score(specs: list[Spec], images) -> dict:
    """Accuracy per attribute, overall and split into seen / held-out pairs."""
    rows = []
    for spec, image in zip(specs, images):
        got = classify(image)
        rows.append({"caption": spec.caption, "held_out": (spec.colour, spec.shape) in HELD_OUT,
                     "background": got.background == spec.background, "colour": got.colour == spec.colour,
                     "shape": got.shape == spec.shape, "seen_as": [got.background, got.colour, got.shape]})
    out = {}
    for split, subset in (("all", rows), ("seen", [r for r in rows if not r["held_out"]]),
                          ("held_out", [r for r in rows if r["held_out"]])):
        if subset:
            out[split] = {k: round(sum(r[k] for r in subset) / len(subset), 3) for k in ("background", "colour", "shape")}
            out[split]["n"] = len(subset)
    out["rows"] = rows
    return out


def generate(engine, specs: list[Spec], backend: str = "ort-cpu", steps: int = 20,
             guidance: float = 7.5, seed: int = 0, batch: int = 12, sampler: str = "euler",
             cache_interval: int = 1, vae: str = "full") -> list:
    """Images for `specs`, `batch` captions per request, request k seeded seed + k·batch (image i: seed + i).
    `engine`: an engine directory (loaded here with `backend`) or a loaded Pipeline."""
    from sdrt.runtime.pipeline import Pipeline, Request

    pipe = engine if isinstance(engine, Pipeline) else Pipeline.load(engine, backend=backend)
    images = []
    for i in range(0, len(specs), batch):
        chunk = specs[i:i + batch]
        images += pipe.generate(Request.of(prompt=tuple(s.caption for s in chunk), steps=steps, guidance=guidance,
                                           sampler=sampler, seed=seed + i, cache_interval=cache_interval,
                                           vae=vae))
    return images


def export_shipped(folder: Path, precision: str = "fp32", deepcache: bool = False) -> Path:
    """Write the shipped model as a diffusers folder and export it, with the tiny VAE trained for it
    (export/models/shapes_tiny_vae.py) beside the full one; returns the engine directory."""
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.shapes import tiny_vae_of, write_shapes_pipeline

    model = folder / "shapes-model"
    if not (model / "model_index.json").exists():
        write_shapes_pipeline(model)
    engine = folder / f"engine-{precision}{'-deepcache' if deepcache else ''}"
    export(ExportConfig(model=str(model), output=engine, precision=precision, deepcache=deepcache,
                        tiny_vae=tiny_vae_of(model)), lambda name, status: None)
    return engine


VARIANTS = (  # (label, precision, backend, sampler, cache_interval, vae): what `--compare` measures
    ("ORT CPU fp32, Euler", "fp32", "ort-cpu", "euler", 1, "full"),
    ("ORT CPU fp16, Euler", "fp16", "ort-cpu", "euler", 1, "full"),
    ("ORT CPU fp32, Euler, tiny VAE", "fp32", "ort-cpu", "euler", 1, "tiny"),
    ("ORT CPU fp32, Euler, step caching every 2", "fp32", "ort-cpu", "euler", 2, "full"),
    ("ORT CPU fp32, Euler, step caching every 3", "fp32", "ort-cpu", "euler", 3, "full"),
    ("torch fp32 (the reference modules), Euler", "fp32", "torch", "euler", 1, "full"),
)


def compare(folder: Path, steps: int = 20, guidance: float = 7.5, seed: int = 0) -> list[dict]:
    """Accuracy beside speed for each VARIANT (the exactness trades: fp16, the tiny VAE, step caching): the 36
    captions, timed from the first request to the last image (engines loaded and one warm-up image first), as seconds
    per image."""
    import time

    from sdrt.runtime.pipeline import Pipeline

    specs, rows = eval_specs(), []
    for label, precision, backend, sampler, interval, vae in VARIANTS:
        engine = export_shipped(folder, precision, deepcache=interval > 1)
        pipe = Pipeline.load(engine, backend=backend)  # loaded outside the timing
        generate(pipe, specs[:1], steps=2, guidance=guidance, sampler=sampler, cache_interval=interval, vae=vae)  # warm-up
        start = time.perf_counter()
        images = generate(pipe, specs, steps=steps, guidance=guidance, seed=seed, sampler=sampler,
                          cache_interval=interval, vae=vae)
        seconds = time.perf_counter() - start
        result = score(specs, images)
        rows.append({"variant": label, "precision": precision, "backend": backend, "sampler": sampler,
                     "cache_interval": interval, "vae": vae, "seconds_per_image": seconds / len(specs),
                     **{k: result["all"][k] for k in ("background", "colour", "shape")},
                     "held_out": {k: result["held_out"][k] for k in ("background", "colour", "shape")}})
    return rows


def compare_markdown(rows: list[dict], command: str, steps: int, guidance: float, meta: dict) -> str:
    m = meta["machine"]
    lines = [f"# The shapes model: accuracy beside speed ({steps} steps, guidance {guidance:g}, 36 captions)", "",
             f"- command: `{command}`",
             f"- machine: {m['cpu']}, {m['cores_logical']} logical cores, {m['memory_gib']} GiB",
             f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
             f"- created: {meta['created']}", "",
             "| variant | s / image (3 requests of 12, engines loaded) | background | shape colour | shape kind | held-out colour |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seconds_per_image']:.3f} | {r['background']:.0%} | {r['colour']:.0%} | "
                     f"{r['shape']:.0%} | {r['held_out']['colour']:.0%} |")
    return "\n".join(lines) + "\n"


def grid(images, columns: int):
    """The images side by side, `columns` per row (PIL)."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet


def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    p = argparse.ArgumentParser(prog="python -m sdrt.bench.shapes_eval", description=__doc__.split("\n")[0])
    p.add_argument("--engine", type=Path, help="an exported engine directory (default: export the shipped model)")
    p.add_argument("--precision", default="fp32", help="precision of the export when --engine is not given")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--cache-interval", type=int, default=1, help="step caching every N steps (DeepCache, branch 0)")
    p.add_argument("--vae", default="full", choices=("full", "tiny"), help="decode with the full VAE or the tiny one")
    p.add_argument("--save", type=Path, help="write the generated images, a grid and result.json here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--compare", type=Path, metavar="FOLDER", help="measure every variant (fp32, fp16, tiny VAE, "
                   "step caching, torch) for accuracy and seconds per image; write FOLDER/result.md and result.json")
    a = p.parse_args(argv)
    if a.compare:
        from datetime import datetime, timezone

        from sdrt.bench.machine import machine_info, versions

        with tempfile.TemporaryDirectory() as tmp:
            rows = compare(Path(tmp), a.steps, a.guidance, a.seed)
        command = "python -m sdrt.bench.shapes_eval " + " ".join(argv if argv is not None else sys.argv[1:])
        a.compare.mkdir(parents=True, exist_ok=True)
        meta = {"machine": machine_info(), "versions": versions(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (a.compare / "result.json").write_text(json.dumps({"rows": rows, "command": command, **meta}, indent=1) + "\n")
        text = compare_markdown(rows, command, a.steps, a.guidance, meta)
        (a.compare / "result.md").write_text(text)
        print(text)
        return
    specs = eval_specs()
    with tempfile.TemporaryDirectory() as tmp:
        engine = a.engine or export_shipped(Path(tmp), a.precision, a.cache_interval > 1)
        images = generate(engine, specs, a.backend, a.steps, a.guidance, a.seed, sampler=a.sampler,
                          cache_interval=a.cache_interval, vae=a.vae)
    result = score(specs, images)
    result["settings"] = {"command": "python -m sdrt.bench.shapes_eval " + " ".join(argv or []),
                          "backend": a.backend, "precision": a.precision, "steps": a.steps, "guidance": a.guidance,
                          "sampler": a.sampler, "cache_interval": a.cache_interval, "vae": a.vae, "seed": a.seed}
    if a.save:
        a.save.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(a.save / f"{i:02d}.png")
        grid(images, 12).save(a.save / "grid.png")
        (a.save / "result.json").write_text(json.dumps(result, indent=1))
    if a.json:
        print(json.dumps(result, indent=1))
        return
    for r in result["rows"]:
        mark = "".join("✓" if r[k] else "✗" for k in ("background", "colour", "shape"))
        print(f"{mark} {'held-out' if r['held_out'] else 'seen    '} {r['caption']!r} → {r['seen_as']}")
    print(f"backend {a.backend}, {a.steps} Euler steps, guidance {a.guidance}, seed {a.seed}")
    for split in ("all", "seen", "held_out"):
        s = result[split]
        print(f"{split:8s} n={s['n']:2d}  background {s['background']:.0%}  colour {s['colour']:.0%}  "
              f"shape {s['shape']:.0%}")


if __name__ == "__main__":
    main(sys.argv[1:])
