"""`sdrt grid` (AUTOMATIC1111's X/Y/Z plot): axis parsing, the layout, batching of compatible cells, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import run_sdrt
from sdrt.cli.grid import Axis, cells, layout, parse_axis
from sdrt.runtime import batching
from sdrt.runtime.errors import UserError
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import Request


def test_parse_axis_types_and_quoting():
    assert parse_axis("--x", "steps=4, 8,20") == Axis("steps", (4, 8, 20))
    assert parse_axis("--x", "guidance=1.5,7") == Axis("guidance", (1.5, 7.0))
    assert parse_axis("--y", 'sampler=Euler a,"DPM++ 2M Karras",UniPC').values == ("Euler a", "DPM++ 2M Karras",
                                                                                   "UniPC")
    assert parse_axis("--x", 'prompt="a cat, sitting",a dog').values == ("a cat, sitting", "a dog")


@pytest.mark.parametrize("text,fragment", [("steps", "FIELD=VALUE"), ("stepz=1,2", "not a request field"),
                                           ("steps=4,eight", "'eight' is not an integer"),
                                           ("batch=1,2", "not a request field")])
def test_bad_axes(text, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_axis("--x", text)


def test_cells_enumerate_z_then_y_then_x():
    axes = [Axis("sampler", ("a", "b", "c")), Axis("steps", (1, 2)), Axis("seed", (5, 6))]
    grid = cells(axes)
    assert len(grid) == 12
    assert grid[0] == ((0, 0, 0), {"sampler": "a", "steps": 1, "seed": 5})
    assert grid[4] == ((0, 1, 1), {"sampler": "b", "steps": 2, "seed": 5})
    assert grid[11] == ((1, 1, 2), {"sampler": "c", "steps": 2, "seed": 6})


def test_layout_places_cells_and_labels():
    colours = [[[Image.new("RGB", (40, 30), (10 * (k * 6 + j * 3 + i), 100, 200)) for i in range(3)]
                for j in range(2)] for k in range(2)]
    canvas, where = layout(colours, ["X: a", "X: b", "X: c"], ["Y: 1", "Y: 2"], ["Z: 5", "Z: 6"])
    left, top = where["cell"]
    dx, dy = where["pitch"]
    assert left > 0 and top > 0 and (dx, dy) == (40, 30)
    a = np.asarray(canvas)
    for k in range(2):
        for j in range(2):
            for i in range(3):
                x0, y0 = k * where["z_offset"] + left + i * dx, top + j * dy
                assert (a[y0:y0 + dy, x0:x0 + dx] == np.asarray(colours[k][j][i])).all()
    assert (a[:top, left:left + 3 * dx] < 128).any(), "no column labels drawn"
    assert (a[top:, :left] < 128).any(), "no row labels drawn"
    assert canvas.size == (2 * where["z_offset"] - (where["z_offset"] - left - 3 * dx), top + 2 * dy)


def test_merged_batch_equals_separate_jobs(exported):
    """Compatible cells share one batch (different prompts and seeds) and still give their own images."""
    pipe = Pipeline.load(exported("sd15", "fp32"), backend="ort-cpu")
    common = dict(steps=3, guidance=5.0, sampler="euler_a", width=32, height=32)
    jobs = [pipe.validate(Request.of(prompt=p, seed=s, **common)) for p, s in (("a cat", 3), ("a dog", 11))]
    other = pipe.validate(Request.of(prompt="a cat", seed=3, **{**common, "steps": 4}))
    assert batching.group(jobs + [other], 4) == [[0, 1], [2]]
    merged = pipe.generate(batching.merge(jobs))
    for job, image in zip(jobs, merged):
        alone = pipe.generate(job)[0]
        assert int(np.abs(np.asarray(alone, dtype=int) - np.asarray(image, dtype=int)).max()) <= 1


def test_grid_cli_end_to_end(exported, tmp_path):
    out = tmp_path / "grid.png"
    result = run_sdrt("grid", str(exported("sd15", "fp32")), "a castle", "--x", "sampler=Euler a,DPM++ 2M Karras",
                      "--y", "steps=2,3", "--width", "32", "--height", "32", "--seed", "4", "-o", str(out))
    assert result.returncode == 0, result.stderr
    grid = Image.open(out)
    cell_files = sorted((tmp_path / "grid-cells").glob("*.png"))
    assert [p.name for p in cell_files] == ["z0-y0-x0.png", "z0-y0-x1.png", "z0-y1-x0.png", "z0-y1-x1.png"]
    assert grid.width > 64 and grid.height > 64
    assert "X/Y/Z plot: sampler=Euler a,DPM++ 2M Karras; steps=2,3" in grid.text["parameters"]
    cell = Image.open(tmp_path / "grid-cells" / "z0-y1-x1.png")
    assert "Steps: 3, Sampler: DPM++ 2M Karras" in cell.text["parameters"]
    # the cell is the image `sdrt run` makes with the same settings
    single = tmp_path / "single.png"
    assert run_sdrt("run", str(exported("sd15", "fp32")), "a castle", "--sampler", "DPM++ 2M Karras", "--steps", "3",
                    "--width", "32", "--height", "32", "--seed", "4", "-o", str(single)).returncode == 0
    diff = np.abs(np.asarray(Image.open(single), dtype=int) - np.asarray(cell, dtype=int)).max()
    assert diff <= 1


def test_grid_cli_bad_cell_is_one_line(exported, tmp_path):
    result = run_sdrt("grid", str(exported("sd15", "fp32")), "a castle", "--x", "steps=2,100000",
                      "-o", str(tmp_path / "g.png"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "grid cell steps=100000: --steps must be at most" in lines[0], result.stderr
    assert not list(tmp_path.iterdir())
