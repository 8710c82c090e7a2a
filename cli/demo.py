"""`make demo`: export the embedded shapes model (export/shapes.py, trained here on captioned shapes) and draw
three prompts with it at 128×128, 20 Euler steps, guidance 7.5.

The weights ship inside the package (export/shapes_model, fp16, content hashes checked before use), so this runs
offline on a fresh machine.
Usage: python -m sdrt.cli.demo OUTPUT_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

PROMPTS = ("a red circle on a blue background", "a large yellow star on a black background",
           "a small white square on the left on a green background")


def main(folder: Path) -> list[Path]:
    from sdrt.cli.generate import RunOptions, generate
    from sdrt.export.exporter import ExportConfig, export
    from sdrt.export.shapes import write_shapes_pipeline

    console = Console()
    folder.mkdir(parents=True, exist_ok=True)
    model = write_shapes_pipeline(folder / "shapes-model")  # verifies the shipped files' SHA-256 first
    engine_dir = folder / "engine"
    export(ExportConfig(model=str(model), output=engine_dir, precision="fp32"),
           lambda name, status: console.print(f"  export {name}: {status}"))
    written = []
    for i, prompt in enumerate(PROMPTS):
        _, [image] = generate(RunOptions(engine_dir=engine_dir, prompts=(prompt,), steps=20, guidance=7.5,
                                         sampler="euler", seed=i, width=128, height=128,
                                         out=folder / f"demo-{i}.png"))
        written.append(image.path)
        console.print(f"{prompt!r}: {image.path.absolute()}")
    console.print(f"engine directory: {engine_dir.absolute()}")
    return written


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/demo"))
