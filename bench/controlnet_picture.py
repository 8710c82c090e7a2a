"""README's ControlNet picture: a control image beside sdrt's output without and with the ControlNet.

    python -m sdrt.bench.controlnet_picture OUT.png [--workdir build/controlnet-picture]

The models are the tiny random-weight SD 1.5 and ControlNet the tests build (export/tiny.py): there is no trained
model here yet, so the outputs are texture, not pictures. The last tile is where the ControlNet changed the output
(|with − without|, stretched). Regenerate it when a trained embedded model exists.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SCALE = 3  # shown at 192 px


def control_image() -> Image.Image:
    """A white ring and bar on black, as a canny map would look."""
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 42, 42), outline="white", width=3)
    draw.rectangle((44, 8, 50, 56), outline="white", width=2)
    return image


def render(workdir: Path) -> Image.Image:
    from sdrt.export.exporter import ExportConfig, add_controlnets, export
    from sdrt.export.tiny import write_tiny_controlnet, write_tiny_pipeline
    from sdrt.runtime.pipeline import Pipeline, Request

    model = workdir / "tiny-sd15"
    if not (model / "model_index.json").exists():
        write_tiny_pipeline("sd15", model)
    engine = workdir / "engine"
    if not (engine / "controlnet").is_dir():
        shutil.rmtree(engine, ignore_errors=True)
        export(ExportConfig(model=str(model), output=engine, precision="fp32"))
        net = write_tiny_controlnet(model, workdir / "canny-src", seed=1, gain=1.0)
        add_controlnets(engine, (f"{net}=canny",))
    pipe = Pipeline.load(engine, backend="ort-cpu")
    control = control_image()
    common = dict(prompt="a ring and a bar", steps=8, guidance=7.0, seed=7, width=SIZE, height=SIZE)
    plain = pipe.generate(Request.of(**common))[0]
    steered = pipe.generate(Request.of(**common, controls=[("canny", control, 1.0)]))[0]
    diff = np.abs(np.asarray(steered, dtype=np.int16) - np.asarray(plain, dtype=np.int16)).max(axis=2)
    diff = Image.fromarray(np.clip(diff * (255.0 / max(int(diff.max()), 1)), 0, 255).astype(np.uint8)).convert("RGB")
    tiles = [("control image", control), ("sdrt, no ControlNet", plain), ("sdrt + ControlNet", steered),
             ("|difference|, stretched", diff)]
    side = SIZE * SCALE
    out = Image.new("RGB", (side * len(tiles), side + 34), "white")
    draw = ImageDraw.Draw(out)
    for i, (label, image) in enumerate(tiles):
        out.paste(image.resize((side, side), Image.Resampling.NEAREST), (i * side, 0))
        draw.text((i * side + 6, side + 4), label, fill="black")
    draw.text((6, side + 19), "tiny random-weight SD 1.5 + ControlNet (test models, not trained)", fill="gray")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sdrt.bench.controlnet_picture", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--workdir", type=Path, default=Path("build/controlnet-picture"))
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    picture = render(a.workdir)
    tmp = a.out.with_name(a.out.name + ".tmp.png")
    picture.save(tmp)
    os.replace(tmp, a.out)
    print(a.out)


if __name__ == "__main__":
    main()
