"""Groundwork of the shapes model (issue 14): the captioned dataset and the pixel classifier that scores images.

No trained weights ship yet: a first training run on a busy 2-core CPU stayed near chance accuracy (14-25 %), so
`make demo` still uses the random tiny model. These tests check what is already right: captions, the caption
tokenizer, and that the classifier reads rendered ground truth.
"""

from __future__ import annotations

import random

from sdrt.bench import shapes_eval
from sdrt.export import shapes, shapes_data
from sdrt.export.shapes_data import Spec


def test_classifier_reads_rendered_ground_truth():
    rng = random.Random(123)
    specs = [shapes_data.random_spec(rng, held_out=i % 4 == 0) for i in range(120)]
    result = shapes_eval.score(specs, [shapes_data.render(s, rng) for s in specs])
    assert result["all"]["background"] >= 0.95 and result["all"]["colour"] >= 0.95
    assert result["all"]["shape"] >= 0.95, result["all"]


def test_captions_and_tokenizer_cover_the_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    shapes.write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    caption = Spec("star", "purple", "white", "small", "left").caption
    assert caption == "a small purple star on the left on a white background"
    ids = tok(caption).input_ids
    assert len(ids) == len(caption.split()) + 2  # every caption word is one token
