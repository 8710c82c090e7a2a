"""`make demo`: export the embedded tiny SDXL-Lightning model, then generate one image from it.

The tiny model has random weights, so the image is noise; README shows how to run a real model.
Usage: python -m sdrt.cli.demo OUTPUT_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console


def main(folder: Path) -> None:
    from sdrt.cli.generate import RunOptions, generate
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.tiny import write_tiny_pipeline

    console = Console()
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "tiny-sdxl-lightning"
    if not (model / "model_index.json").exists():
        write_tiny_pipeline("sdxl-lightning", model)
    engine_dir = folder / "engine"
    export(ExportConfig(model=str(model), output=engine_dir, precision="fp16"),
           lambda name, status: console.print(f"  export {name}: {status}"))
    _, [written] = generate(RunOptions(engine_dir=engine_dir, prompts=("a photo of an astronaut riding a horse",),
                                       preset="lightning-4step", seed=42, width=64, height=64,
                                       out=folder / "demo.png"))
    png = written.path
    console.print(f"engine directory: {engine_dir.absolute()}")
    console.print(f"image: {png.absolute()} (random tiny weights: expect noise)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/demo"))
