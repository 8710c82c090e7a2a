"""README's ControlNet picture: control images beside sdrt's output without and with the ControlNet.

    python -m sdrt.bench.experiments.controlnet_picture OUT.png [--workdir build/controlnet-picture]

The model is the embedded shapes model (export/models/shapes.py) with the shape-mask ControlNet trained for it
(export/models/shapes_controlnet.py, shipped in export/models/shapes_model/extras/controlnet-mask), exported by `sdrt export
--controlnet` and run by `Pipeline.generate` on ONNX Runtime CPU: 128², 20 Euler steps, guidance 7.5. The prompts
name no position; the mask places the shape.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
ROWS = (  # (prompt, the mask's shape spec)
    ("a red star on a blue background", ("star", "large", "right")),
    ("a yellow circle on a purple background", ("circle", "small", "top")),
    ("a white triangle on a green background", ("triangle", None, "left")),
)


def control_image(shape: str, size: str | None, position: str | None) -> Image.Image:
    from sdrt.export.models import shapes_data as data
    from sdrt.export.models.shapes_controlnet import mask_of

    return Image.fromarray(mask_of(data.Spec(shape, "white", "black", size, position), random.Random(0).getstate()))


def render(workdir: Path) -> Image.Image:
    from sdrt.export.exporter import ExportConfig, add_controlnets, export
    from sdrt.export.models.shapes import write_shapes_pipeline
    from sdrt.runtime.pipeline import Pipeline, Request

    model = write_shapes_pipeline(workdir / "shapes-model")
    engine = workdir / "engine"
    shutil.rmtree(engine, ignore_errors=True)  # always the shipped model and ControlNet as they are now
    export(ExportConfig(model=str(model), output=engine, precision="fp32"))
    add_controlnets(engine, (f"{model / 'extras' / 'controlnet-mask'}=mask",))
    pipe = Pipeline.load(engine, backend="ort-cpu")
    tiles = []
    for i, (prompt, mask_spec) in enumerate(ROWS):
        control = control_image(*mask_spec)
        common = dict(prompt=prompt, steps=20, guidance=7.5, sampler="euler", seed=i, width=SIZE, height=SIZE)
        plain = pipe.generate(Request.of(**common))[0]
        steered = pipe.generate(Request.of(**common, controls=[("mask", control, 1.0)]))[0]
        tiles.append((prompt, control, plain, steered))
    out = Image.new("RGB", (3 * SIZE + 300, len(tiles) * SIZE + 40), "white")
    draw = ImageDraw.Draw(out)
    for c, label in enumerate(("control image", "no ControlNet", "with the ControlNet")):
        draw.text((c * SIZE + 4, 4), label, fill="black")
    for r, (prompt, *images) in enumerate(tiles):
        for c, image in enumerate(images):
            out.paste(image, (c * SIZE, 20 + r * SIZE))
        draw.text((3 * SIZE + 8, 20 + r * SIZE + SIZE // 2 - 6), repr(prompt), fill="black")
    draw.text((4, 24 + len(tiles) * SIZE), "the embedded shapes model + its shape-mask ControlNet, both trained on "
              "this CPU; sdrt on ONNX Runtime, 20 Euler steps", fill="gray")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sdrt.bench.experiments.controlnet_picture", description=__doc__.split("\n")[0])
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
