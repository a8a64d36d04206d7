import io

import numpy as np
from PIL import Image

from maskclip.synthetic import (
    COLOURS,
    POSITIONS,
    SIZES,
    class_names,
    colour_names,
    generate,
)
from maskclip.templates import templates


def test_rows_reproducible_per_index():
    a = generate(10, image_size=16, seed=3)
    b = generate(4, image_size=16, seed=3, start=6)
    assert a[6:] == b
    assert generate(10, image_size=16, seed=3) == a
    assert [r["key"] for r in b] == sorted(r["key"] for r in b)
    assert int(b[0]["key"]) == 6


def test_seed_and_index_change_rows():
    a = generate(20, image_size=16, seed=0)
    c = generate(20, image_size=16, seed=1)
    assert len({r["jpg"] for r in a}) == 20
    assert sum(x["jpg"] != y["jpg"] for x, y in zip(a, c)) == 20


def test_row_contents():
    rows = generate(200, image_size=24, seed=0)
    names = class_names()
    for r in rows:
        assert set(r) == {"key", "jpg", "caption", "label", "colour"}
        assert r["label"] in names and r["colour"] in colour_names()
        words = r["caption"].replace(",", " ").split()
        assert r["label"] in words
        # the colour column is the shape's colour, named next to the shape
        i = words.index(r["label"])
        assert r["colour"] in (words[i - 1], words[i + 2] if i + 2 < len(words) else None)
        assert any(c in r["caption"] for c in COLOURS)
        assert any(s in r["caption"] for s in SIZES) or "," in r["caption"]
        img = Image.open(io.BytesIO(r["jpg"]))
        assert img.format == "JPEG" and img.size == (24, 24) and img.mode == "RGB"
    assert {r["label"] for r in rows} == set(names)  # 200 rows cover all shapes
    assert {r["colour"] for r in rows} == set(colour_names())
    assert len({r["caption"] for r in rows}) > 100


def test_caption_position_matches_image():
    # the shape colour must dominate the named side of the image
    for r in generate(60, image_size=32, seed=7):
        words = r["caption"].replace(",", " ").split()
        pos = next(p for p in POSITIONS if p in words)
        if pos == "centre" or "large" in words:
            continue
        colour = r["colour"]
        a = np.asarray(Image.open(io.BytesIO(r["jpg"])), dtype=np.float32)
        dist = np.linalg.norm(a - np.array(COLOURS[colour]), axis=-1)
        near = dist < 60
        half = {"left": near[:, :16], "right": near[:, 16:], "top": near[:16], "bottom": near[16:]}
        other = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[pos]
        assert half[pos].sum() > half[other].sum()


def test_templates_and_classes():
    assert all(t.count("{}") == 1 for t in templates("shapes"))
    assert len(set(class_names())) == len(class_names()) >= 5
    assert colour_names() == list(COLOURS)
