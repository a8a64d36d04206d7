import io

import numpy as np
import pytest
from PIL import Image

from maskclip.dense import IGNORE, decode_mask
from maskclip.synthetic import (
    COLOURS,
    MAX_OBJECTS,
    POSITIONS,
    SHAPES,
    SIZES,
    class_names,
    colour_names,
    generate,
    generate_scenes,
    make_scene,
    scene_classes,
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


# ----------------------------------------------------------------------------- multi-object scenes


def _words(caption: str) -> list[str]:
    return caption.replace(",", " ").replace(":", " ").split()


def _centre(mask: np.ndarray, cls: int) -> tuple[float, float]:
    ys, xs = np.nonzero(mask == cls)
    return float(xs.mean()), float(ys.mean())


def test_scenes_reproducible_per_index():
    a = generate_scenes(6, image_size=16, seed=2, objects=3)
    assert generate_scenes(3, image_size=16, seed=2, start=3, objects=3) == a[3:]
    assert generate_scenes(6, image_size=16, seed=2, objects=3) == a
    b = generate_scenes(6, image_size=16, seed=3, objects=3)
    assert all(x["jpg"] != y["jpg"] and x["mask"] != y["mask"] for x, y in zip(a, b))
    assert [int(r["key"]) for r in a] == list(range(6))


@pytest.mark.parametrize("objects", [1, 2, 3, 4, 6])
def test_scene_masks_hold_the_objects_in_their_cells(objects):
    classes = scene_classes()
    assert classes == ["background", *SHAPES]
    size = 48
    grid = 2 if objects <= 4 else 3
    thirds = {"left": 0, "right": grid - 1, "top": 0, "bottom": grid - 1}
    ignored = 0
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    for r in generate_scenes(12, image_size=size, seed=5, objects=objects):
        img = np.asarray(Image.open(io.BytesIO(r["jpg"])).convert("RGB"), dtype=np.float32)
        mask = decode_mask(r["mask"], size=(size, size), num_classes=len(classes))
        present = set(np.unique(mask).tolist()) - {0, IGNORE}
        shapes = [o["shape"] for o in r["objects"]]
        assert len(set(shapes)) == objects  # different classes
        assert len({o["colour"] for o in r["objects"]}) == objects
        assert present == {classes.index(s) for s in shapes}
        areas = {s: int((mask == classes.index(s)).sum()) for s in shapes}
        assert r["label"] == max(shapes, key=lambda s: areas[s])
        assert r["colour"] == r["objects"][shapes.index(r["label"])]["colour"]
        for o in r["objects"]:
            cls = classes.index(o["shape"])
            cx, cy = _centre(mask, cls)
            col, row = int(cx * grid // size), int(cy * grid // size)
            words = o["where"].split()
            want_col = next((thirds[w] for w in words if w in ("left", "right")), grid // 2)
            want_row = next((thirds[w] for w in words if w in ("top", "bottom")), grid // 2)
            assert (col, row) == (want_col, want_row), (o, cx, cy)
            # the pixels the mask gives this object have the object's colour (by nearest palette
            # colour; a thin ring in a small cell blurs into its background under JPEG)
            near = np.linalg.norm(img[mask == cls][:, None] - palette[None], axis=-1).argmin(1)
            counts = np.bincount(near, minlength=len(COLOURS))
            mine = list(COLOURS).index(o["colour"])
            if o["shape"] == "ring":
                assert counts[mine] > 0.2 * counts.sum()
            else:
                assert counts.argmax() == mine, (o, counts)
        ignored += int((mask == IGNORE).sum())
    assert 0 < ignored < 0.05 * 12 * size * size  # only shared edge pixels are ignored


@pytest.mark.parametrize("objects", [1, 2, 3, 5, 7])
def test_scene_captions_name_exactly_the_objects(objects):
    relations = 0
    for r in generate_scenes(40, image_size=16, seed=1, objects=objects):
        words = _words(r["caption"])
        assert sorted(w for w in words if w in SHAPES) == sorted(o["shape"] for o in r["objects"])
        for o in r["objects"]:  # each shape is named with its own colour
            i = words.index(o["shape"])
            assert words[i - 1] == o["colour"], r["caption"]
        if any(w in r["caption"] for w in (" above ", " below ", " left of ", " right of ")):
            # "a red star above (and to the left of) a blue circle": cells agree
            relations += 1
            first, second = sorted(r["objects"], key=lambda o: r["caption"].index(o["shape"]))
            where1, where2 = first["where"].split(), second["where"].split()
            assert ("above" in words) == ("top" in where1 and "bottom" in where2)
            assert ("below" in words) == ("bottom" in where1 and "top" in where2)
            assert ("left" in words) == ("left" in where1 and "right" in where2)
            assert ("right" in words) == ("right" in where1 and "left" in where2)
        elif any(w in words for w in ("top", "bottom", "left", "right", "centre")):
            for o in r["objects"]:  # "a red star at the top left", "... on the left"
                phrase = {"left": "on the left", "right": "on the right", "centre": "in the centre"}
                where = phrase.get(o["where"], f"at the {o['where']}")
                assert f"{o['colour']} {o['shape']} {where}" in r["caption"]
    assert (relations > 5) == (objects == 2)


def test_scene_limits():
    with pytest.raises(ValueError, match="objects must be 1..7"):
        make_scene(0, objects=MAX_OBJECTS + 1)
