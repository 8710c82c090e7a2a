"""The captioned-shapes data set: procedurally rendered 128×128 images of one flat shape on a flat background.

Every image comes from a `Spec` (shape, colour, background colour, optional size and position); its
caption is generated from the same parameters ("a small red circle on the left on a blue background").
Colour/shape pairs in HELD_OUT never appear in training; the semantic check (sdrt.bench.shapes_eval)
asks for them to measure whether the model composes what it learnt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

SIZE = 128
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 14, None: 22, "large": 32}  # "radius" in pixels; None = unspecified (medium)
POSITIONS = {None: (64, 64), "left": (32, 64), "right": (96, 64), "top": (64, 32), "bottom": (64, 96)}
# colour/shape pairs the training set never draws (one per shape)
HELD_OUT = frozenset({("green", "triangle"), ("yellow", "star"), ("purple", "square"), ("white", "circle")})


@dataclass(frozen=True)
class Spec:
    shape: str
    colour: str
    background: str
    size: str | None = None
    position: str | None = None

    @property
    def caption(self) -> str:
        size = f"{self.size} " if self.size else ""
        where = f" on the {self.position}" if self.position else ""
        return f"a {size}{self.colour} {self.shape}{where} on a {self.background} background"


def vocabulary_corpus() -> str:
    """Every word a caption can use (the tokenizer is trained on this)."""
    lines = []
    for shape in SHAPES:
        for colour in COLOURS:
            for pos in POSITIONS:
                for size in SIZES:
                    lines.append(Spec(shape, colour, "blue" if colour != "blue" else "red", size, pos).caption)
    lines += [f"a {c} background" for c in COLOURS]
    return "\n".join(lines)


def random_spec(rng: random.Random, *, held_out: bool = False) -> Spec:
    """A random training spec (held_out=False never returns a HELD_OUT pair)."""
    while True:
        shape = rng.choice(SHAPES)
        colour = rng.choice(list(COLOURS))
        if ((colour, shape) in HELD_OUT) == held_out:
            break
    background = rng.choice([c for c in COLOURS if c != colour])
    size = rng.choice(["small", "large"]) if rng.random() < 0.5 else None
    position = rng.choice(["left", "right", "top", "bottom"]) if rng.random() < 0.5 else None
    return Spec(shape, colour, background, size, position)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up, centred on its bounding box
        w, hgt = r * 3 ** 0.5 / 2 * 1.15, 1.5 * r * 1.15 / 2
        return [(cx, cy - hgt), (cx + w, cy + hgt), (cx - w, cy + hgt)]
    if shape == "star":  # five points, inner radius 0.4 R
        pts = []
        for i in range(10):
            rad = r * 1.1 if i % 2 == 0 else r * 1.1 * 0.4
            a = -np.pi / 2 + i * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return pts
    raise ValueError(shape)


def render(spec: Spec, rng: random.Random | None = None) -> np.ndarray:
    """uint8 HWC image of the spec; rng adds a few pixels of position and size jitter."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), COLOURS[spec.background])
    draw = ImageDraw.Draw(img)
    cx, cy = POSITIONS[spec.position]
    r = SIZES[spec.size]
    if rng is not None:
        cx += rng.uniform(-5, 5)
        cy += rng.uniform(-5, 5)
        r *= rng.uniform(0.9, 1.1)
    colour = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(spec.shape, cx, cy, r), fill=colour)
    return np.asarray(img)


def batch(rng: random.Random, n: int) -> tuple[np.ndarray, list[str]]:
    specs = [random_spec(rng) for _ in range(n)]
    return np.stack([render(s, rng) for s in specs]), [s.caption for s in specs]
