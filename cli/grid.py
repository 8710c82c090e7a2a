"""`sdrt grid`: AUTOMATIC1111's X/Y/Z plot. Every combination of up to three axes of request fields, one loaded
pipeline, compatible cells batched together, one labelled grid PNG plus each cell's image with its parameters.

    sdrt grid DIR "a castle" --x sampler="Euler a,DPM++ 2M Karras,UniPC" --y steps=4,8,20 --z seed=1,2

Layout as AUTOMATIC1111 draws it (scripts/xyz_grid.py): X values label the columns along the top, Y values the
rows along the left, one sub-grid per Z value side by side under its own title.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from sdrt.runtime import batching, image_io
from sdrt.runtime.errors import UserError
from sdrt.runtime.request import FLAT, Request
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.job import Job

INT_FIELDS = ("steps", "width", "height", "seed")
FLOAT_FIELDS = ("guidance", "guidance_rescale", "strength", "denoising_start", "denoising_end", "aesthetic_score",
                "negative_aesthetic_score")
NOT_AXES = ("batch", "images_per_prompt", "init_image", "mask", "init_latents")
LABEL_NAMES = {"guidance": "CFG scale", "negative_prompt": "Negative prompt"}


@dataclass(frozen=True)
class Axis:
    field: str
    values: tuple

    def label(self, value) -> str:
        name = LABEL_NAMES.get(self.field, self.field.replace("_", " ").capitalize())
        return f"{name}: {value:g}" if isinstance(value, float) else f"{name}: {value}"


def parse_axis(option: str, text: str) -> Axis:
    """'steps=4,8,20' → Axis('steps', (4, 8, 20)); values are comma-separated, quoted when they hold commas."""
    field, sep, values = text.partition("=")
    field = field.strip()
    if not sep or not values.strip():
        raise UserError(f"{option} {text!r}: write FIELD=VALUE,VALUE,… (e.g. {option} steps=4,8,20)")
    if field not in FLAT or field in NOT_AXES:
        axes = sorted(k for k in FLAT if k not in NOT_AXES)
        raise UserError(f"{option} {field!r} is not a request field that can be an axis; choose one of {', '.join(axes)}")
    raw = [v.strip() for v in next(csv.reader([values], skipinitialspace=True)) if v.strip()]
    return Axis(field, tuple(_convert(option, field, v) for v in raw))


def _convert(option: str, field: str, value: str):
    try:
        if field in INT_FIELDS:
            return int(value)
        if field in FLOAT_FIELDS:
            return float(value)
    except ValueError:
        kind = "an integer" if field in INT_FIELDS else "a number"
        raise UserError(f"{option} {field}: {value!r} is not {kind}") from None
    return value


def cells(axes: Sequence[Axis]) -> list[tuple[tuple[int, ...], dict]]:
    """((z, y, x) indices, {field: value}) for every combination; missing axes count as one value."""
    padded = list(axes) + [Axis("", (None,))] * (3 - len(axes))
    x, y, z = padded
    out = []
    for (k, zv), (j, yv), (i, xv) in itertools.product(enumerate(z.values), enumerate(y.values), enumerate(x.values)):
        fields = {a.field: v for a, v in ((x, xv), (y, yv), (z, zv)) if a.field}
        out.append(((k, j, i), fields))
    return out


# ---- layout ------------------------------------------------------------------------------------------------

def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Word-wrap `text` to lines no wider than `width` (a word longer than that keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_size(draw, f"{lines[-1]} {word}", font)[0] <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def _multiline_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, align="center")
    return right - left, bottom - top


def layout(images: list[list[list[Image.Image]]], x_labels: Sequence[str], y_labels: Sequence[str],
           z_labels: Sequence[str]) -> tuple[Image.Image, dict]:
    """images[z][y][x] (all one size) → the grid, and where things went: {"cell": (left, top) of cell (0,0,0),
    "pitch": (dx, dy), "z_offset": dz, "margins": (left, top)}.

    Labels in black on white; the left margin fits the longest Y label, the top one the X labels (and a Z title
    line when there are several Z values).
    """
    w, h = images[0][0][0].size
    font = _font(max(12, min(w, h) // 12))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 6
    x_labels = [_wrap(probe, t, font, w - pad) for t in x_labels]  # column labels wrap within their column
    line = max(_text_size(probe, t, font)[1] for t in list(y_labels) + list(z_labels) + ["Ag"])
    left = (max(_text_size(probe, t, font)[0] for t in y_labels) + 2 * pad) if any(y_labels) else 0
    title = (line + 2 * pad) if any(z_labels) else 0
    header = max(_multiline_size(probe, t, font)[1] for t in x_labels) + 2 * pad if any(x_labels) else 0
    top = title + header
    cols, rows = len(x_labels), len(y_labels)
    sub_w = left + cols * w
    gap = 2 * pad if len(images) > 1 else 0
    canvas = Image.new("RGB", (len(images) * sub_w + (len(images) - 1) * gap, top + rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, plane in enumerate(images):
        ox = k * (sub_w + gap)
        if title:
            tw, _ = _text_size(draw, z_labels[k], font)
            draw.text((ox + left + (cols * w - tw) // 2, pad), z_labels[k], fill="black", font=font)
        for i, text in enumerate(x_labels):
            tw, _ = _multiline_size(draw, text, font)
            draw.multiline_text((ox + left + i * w + (w - tw) // 2, title + pad), text, fill="black", font=font,
                                align="center")
        for j, text in enumerate(y_labels):
            _, th = _text_size(draw, text, font)
            draw.text((ox + pad, top + j * h + (h - th) // 2), text, fill="black", font=font)
        for j, row in enumerate(plane):
            for i, image in enumerate(row):
                canvas.paste(image, (ox + left + i * w, top + j * h))
    return canvas, {"cell": (left, top), "pitch": (w, h), "z_offset": sub_w + gap, "margins": (left, top)}


# ---- running ---------------------------------------------------------------------------------------------

OnCell = Callable[[int, int], None]  # (cells done, total)


def run_grid(pipe, base: dict, axes: Sequence[Axis], out: Path, model_name: str, max_batch: int = 4,
             on_cell: OnCell = lambda done, total: None) -> tuple[Path, list[Path]]:
    """Validate every cell, run compatible cells in shared batches, write the cells and then the grid."""
    from sdrt.cli.generate import as_cli_error

    if len(axes) > 3:
        raise UserError("at most three axes: --x, --y and --z")
    fields = [a.field for a in axes]
    if len(set(fields)) != len(fields):
        raise UserError(f"an axis field appears twice ({', '.join(fields)}); give each field one axis")
    grid_cells = cells(axes)
    jobs: list[Job] = []
    for index, values in grid_cells:
        try:
            jobs.append(pipe.validate(Request.of(**{**base, **values})))
        except InvalidRequest as e:
            where = ", ".join(f"{k}={v}" for k, v in values.items())
            raise UserError(f"grid cell {where}: {as_cli_error(e)}") from None
    if any(j.count != 1 for j in jobs):
        raise UserError("a grid cell is one image: give one prompt and no --batch")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file (got {out})")
    image_io.check_writable(out)
    folder = out.with_name(f"{out.stem}-cells")
    folder.mkdir(exist_ok=True)

    results: list[Image.Image | None] = [None] * len(jobs)
    done = 0
    for members in batching.group(jobs, max_batch):
        images = pipe.generate(batching.merge([jobs[m] for m in members]))
        for m, image in zip(members, images):
            results[m] = image
        done += len(members)
        on_cell(done, len(jobs))

    written = []
    for ((k, j, i), _), job, image in zip(grid_cells, jobs, results):
        params = job.parameters(0, model_name)
        written.append(image_io.save_png(image, folder / f"z{k}-y{j}-x{i}.png", params))
    padded = list(axes) + [Axis("", (None,))] * (3 - len(axes))
    x, y, z = padded
    shape = (len(z.values), len(y.values), len(x.values))
    planes = [[[results[(k * shape[1] + j) * shape[2] + i] for i in range(shape[2])] for j in range(shape[1])]
              for k in range(shape[0])]
    label = (lambda a: [a.label(v) for v in a.values] if a.field else [""])
    canvas, _ = layout(planes, label(x), label(y), label(z) if z.field else [""])
    summary = f"{base.get('prompt', '')}\nX/Y/Z plot: " + "; ".join(
        f"{a.field}={','.join(map(str, a.values))}" for a in axes) + f", Model: {model_name}"
    return image_io.save_png(canvas, out, summary), written
