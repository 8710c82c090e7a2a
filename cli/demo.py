"""`make demo`: export the embedded shapes model (export/models/shapes.py, trained here on captioned shapes) and draw
three prompts with it, four images each (seeds 0-3, 4-7, 8-11) at 128×128, 20 Euler steps, guidance 7.5, into
demo-P-I.png and one sheet, demo.png (a row per prompt).

The weights ship inside the package (export/models/shapes_model, fp16, content hashes checked before use), so this runs
offline on a fresh machine.
Usage: python -m sdrt.cli.demo OUTPUT_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

IMAGES = 4  # per prompt
PROMPTS = ("a red circle on a blue background", "a large yellow star on a black background",
           "a small white square on the left on a green background")


def main(folder: Path) -> list[Path]:
    from sdrt.cli.generate import RunOptions, generate
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.models.shapes import tiny_vae_of, write_shapes_pipeline

    console = Console()
    folder.mkdir(parents=True, exist_ok=True)
    model = write_shapes_pipeline(folder / "shapes-model")  # verifies the shipped files' SHA-256 first
    engine_dir = folder / "engine"
    export(ExportConfig(model=str(model), output=engine_dir, precision="fp32", tiny_vae=tiny_vae_of(model)),
           lambda name, status: console.print(f"  export {name}: {status}"))
    written = []
    for i, prompt in enumerate(PROMPTS):
        _, images = generate(RunOptions(engine_dir=engine_dir, prompts=(prompt,), steps=20, guidance=7.5,
                                        sampler="euler", seed=4 * i, batch=IMAGES, width=128, height=128,
                                        out=folder / f"demo-{i}.png"))
        written += [image.path for image in images]
        console.print(f"{prompt!r}: {', '.join(str(image.path.absolute()) for image in images)}")
    sheet = folder / "demo.png"
    _sheet(written, sheet)
    console.print(f"all of them: {sheet.absolute()}")
    console.print(f"engine directory: {engine_dir.absolute()}")
    return written


def _sheet(paths: list[Path], out: Path) -> None:
    """The images in rows of IMAGES, one row per prompt, its text on the right (temp file, then rename)."""
    from PIL import Image, ImageDraw

    side = 128
    sheet = Image.new("RGB", (IMAGES * side + 330, len(PROMPTS) * side), "white")
    draw = ImageDraw.Draw(sheet)
    for k, path in enumerate(paths):
        sheet.paste(Image.open(path).convert("RGB"), ((k % IMAGES) * side, (k // IMAGES) * side))
    for r, prompt in enumerate(PROMPTS):
        draw.text((IMAGES * side + 8, r * side + side // 2 - 6), repr(prompt), fill="black")
    tmp = out.with_name(out.name + ".tmp.png")
    sheet.save(tmp)
    tmp.replace(out)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/demo"))
