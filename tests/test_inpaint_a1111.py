"""AUTOMATIC1111-style inpainting (runtime/tasks/inpaint_a1111.py): the mask arithmetic against OpenCV and A1111's
documented examples, and on the tiny sd15 export: each fill, blur and "only masked" changes the image, unmasked
pixels stay the original's, and "only masked" equals crop → inpaint → paste done by hand with the plain inpaint task."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.request import Request
from sdrt.runtime.tasks import inpaint_a1111 as a1

SIZE, STEPS = 32, 3


def _picture(width: int, height: int, seed: int = 3) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 100.0)], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 25, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _mask(width: int, height: int, box) -> Image.Image:
    m = Image.new("L", (width, height), 0)
    m.paste(255, box)
    return m


def test_the_mask_blur_is_opencvs_gaussian_and_the_crop_expands_to_the_aspect():
    cv2 = pytest.importorskip("cv2")
    mask = np.asarray(_mask(40, 30, (10, 8, 25, 20)))
    for bx, by in ((4, 4), (2, 6), (1, 0)):
        ours = np.asarray(a1.blur_mask(Image.fromarray(mask), bx, by), int)
        ref = mask
        if bx:
            ref = cv2.GaussianBlur(ref, (2 * int(2.5 * bx + 0.5) + 1, 1), bx)
        if by:
            ref = cv2.GaussianBlur(ref, (1, 2 * int(2.5 * by + 0.5) + 1), by)
        assert np.abs(ours - ref.astype(int)).max() <= 1, (bx, by)
    # A1111's docstring: a 128x32 region processed at 512x512 grows to 128x128
    assert a1.expand_crop_region((100, 200, 228, 232), 512, 512, 1024, 1024) == (100, 152, 228, 280)
    box = a1.expand_crop_region((90, 10, 100, 20), 32, 16, 100, 100)  # pushed back inside the right edge
    assert box == (80, 10, 100, 20)
    assert a1.crop_region(_mask(20, 20, (5, 6, 9, 12)), 3) == (2, 3, 12, 15)
    assert a1.crop_region(Image.new("L", (8, 8)), 4) is None


def test_fill_replaces_only_the_masked_pixels():
    image, mask = _picture(32, 32), _mask(32, 32, (8, 8, 24, 24))
    filled = np.asarray(a1.fill(image, mask), int)
    original = np.asarray(image, int)
    inside = np.asarray(mask) == 255
    assert np.array_equal(filled[~inside], original[~inside])
    assert np.abs(filled[inside] - original[inside]).mean() > 20  # the noise inside is gone: a smooth fill


@pytest.fixture(scope="module")
def pipe(ort_pipelines):
    return ort_pipelines("sd15")


def _run(pipe, image, mask, width=SIZE, height=SIZE, **inpaint):
    request = Request.of(prompt="a red ball", init_image=image, mask=mask, strength=0.75, steps=STEPS, seed=5,
                         width=width, height=height, sampler="Euler", inpaint=inpaint)
    return np.asarray(pipe.generate(request)[0], int)


def test_each_setting_changes_the_image_and_unmasked_pixels_stay(pipe):
    image, mask = _picture(SIZE, SIZE), _mask(SIZE, SIZE, (10, 10, 22, 22))
    image.paste((255, 255, 255), (10, 10, 22, 22))  # what `original` keeps and `fill` replaces: far from its surroundings
    original = np.asarray(image, int)
    runs = {fill: _run(pipe, image, mask, fill=fill, only_masked=False, mask_blur=2) for fill in a1.FILLS}
    outside = np.asarray(a1.blur_mask(mask, 2, 2)) == 0
    assert outside.sum() > 300
    for fill, out in runs.items():
        assert np.array_equal(out[outside], original[outside]), fill  # A1111's overlay: the original exactly
    inside = np.asarray(mask) == 255
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(runs[a][inside] - runs[b][inside]).mean() > 3, (a, b)
    blurred = _run(pipe, image, mask, fill="original", only_masked=False, mask_blur=4)
    sharp = _run(pipe, image, mask, fill="original", only_masked=False, mask_blur=0)
    assert np.abs(blurred - runs["original"]).mean() > 1 and np.abs(sharp - runs["original"]).mean() > 1
    hard = np.asarray(mask) == 0
    assert np.array_equal(sharp[hard], original[hard])  # no blur: every unmasked pixel is the original's
    inverted = _run(pipe, image, mask, fill="original", only_masked=False, mask_blur=0, invert=True)
    assert np.array_equal(inverted[inside], original[inside]) and not np.array_equal(inverted, sharp)


def test_only_masked_equals_crop_inpaint_paste_by_hand(pipe):
    big = _picture(64, 64, seed=8)
    mask = _mask(64, 64, (36, 40, 52, 50))  # 16x10: grows to 16x16 around it, then resized to 32x32
    out = _run(pipe, big, mask, fill="fill", only_masked=True, padding=2, mask_blur=1)
    assert out.shape == (64, 64, 3)  # the original's size: the inpainted crop is pasted back

    blurred = a1.blur_mask(mask, 1, 1)
    ys, xs = np.nonzero(np.asarray(blurred))
    x1, y1, x2, y2 = xs.min() - 2, ys.min() - 2, xs.max() + 1 + 2, ys.max() + 1 + 2
    side = max(x2 - x1, y2 - y1)  # square output: grow the short side, split as A1111 (floor half first)
    grow = side - (y2 - y1)
    y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
    box = (int(x1), int(y1), int(x2), int(y2))
    crop_image = big.crop(box).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    crop_mask = blurred.crop(box).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    plain = Request.of(prompt="a red ball", init_image=a1.fill(crop_image, crop_mask), mask=crop_mask, strength=0.75,
                       steps=STEPS, seed=5, width=SIZE, height=SIZE, sampler="Euler")
    generated = pipe.generate(plain)[0].resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.LANCZOS)
    alpha = np.asarray(blurred, np.float64)[..., None] / 255  # the paste: generated where the blurred mask is
    canvas = np.asarray(big, np.float64).copy()
    canvas[box[1]:box[3], box[0]:box[2]] = np.asarray(generated, np.float64) * alpha[box[1]:box[3], box[0]:box[2]] \
        + canvas[box[1]:box[3], box[0]:box[2]] * (1 - alpha[box[1]:box[3], box[0]:box[2]])
    assert np.abs(out - canvas).max() <= 2  # premultiplied 8-bit compositing rounds
    whole = _run(pipe, big, mask, width=64, height=64, fill="fill", only_masked=False, padding=2, mask_blur=1)
    inside = np.asarray(mask) == 255
    assert np.abs(whole[inside] - out[inside]).mean() > 3


def test_bad_settings_name_the_field(pipe):
    from sdrt.runtime.fields import InvalidRequest

    image, mask = _picture(SIZE, SIZE), _mask(SIZE, SIZE, (8, 8, 20, 20))
    for inpaint, field in (({"fill": "sky"}, "inpaint.fill"), ({"mask_blur": -1}, "inpaint.mask_blur"),
                           ({"colour": 1}, "inpaint.colour"), ({"only_masked": 1}, "inpaint.only_masked")):
        with pytest.raises(InvalidRequest) as e:
            pipe.validate(Request.of(prompt="x", init_image=image, mask=mask, inpaint=inpaint))
        assert e.value.field == field
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(Request.of(prompt="x", init_image=image, inpaint={}))
    assert e.value.field == "inpaint"
