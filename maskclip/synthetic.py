"""Synthetic shapes with compositional captions, for demos and tests.

Each row is one coloured shape on a plain background, e.g. "a small red circle on the left of a
blue background"; its `label` is the shape name (`class_names()`) and its `colour` the shape's
colour (`colour_names()`): either column can be a zero-shot label (`data.label_column`). Row i
depends only on (seed, i), never on n or start.

    rows = generate(1000, image_size=32, seed=0)   # [{"key", "jpg", "caption", "label", "colour"}]
    scenes = generate_scenes(100, image_size=64, objects=3)   # ... + "mask" (maskclip.dense)

Scenes (`make_scene`) hold several shapes of different classes, each in its own cell of a grid,
with a caption naming every one ("a red star above a blue circle", "a green cross at the top
left and ...") and a per-pixel class mask (classes `scene_classes()`: background + SHAPES), for
dense evaluation.

What a short run learns (measured on the quickstart job, maskclip_tiny, 200 steps of 64 on 2
CPUs): the colours, not the shapes. Own caption with one word swapped, 512 validation images:
the shape's colour is told apart 98.8% of the time (chance 12.5%), its shape 12.3% and its
position 18.9% (chance 20%); a linear probe for the shape on the image features reaches 20%.
Colour is a global pixel statistic, and shape colour + background colour (56 pairs) already
tell the pairs of a batch of 64 apart, so the contrastive loss hardly needs the shape. The
quickstart's zero-shot therefore classifies the `colour` column (top-1 0.95 on that model, where
the shape label gave chance, 0.12); shapes need a longer run.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from .dense import IGNORE, encode_mask

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "hexagon")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
POSITIONS = {  # name -> (dx, dy) direction of the shape centre from the image centre
    "left": (-1, 0),
    "right": (1, 0),
    "top": (0, -1),
    "bottom": (0, 1),
    "centre": (0, 0),
}
SIZES = {"small": 0.45, "large": 0.7}  # shape diameter as a fraction of the image side

_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_CAPTIONS = (
    "a {size} {colour} {shape} {where} of a {bg} background",
    "a {colour} {shape} {where}, on {bg}",
    "{where} there is a {size} {colour} {shape}",
    "a {bg} picture with a {size} {colour} {shape} {where}",
    "a {size} {shape} in {colour} {where} of the image",
)
_SUPERSAMPLE = 4
_NOISE_STD = 6.0


def class_names() -> list[str]:
    """The `label` column's classes: the shape names."""
    return list(SHAPES)


def colour_names() -> list[str]:
    """The `colour` column's classes: the shape colours."""
    return list(COLOURS)


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        a = rot + k * math.pi / 5 - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "ring":
        d.ellipse(box, outline=fill, width=max(1, round(0.4 * r)))
    elif shape == "square":
        s = r * 0.85
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "triangle":
        d.regular_polygon((cx, cy, r), 3, rotation=0, fill=fill)
    elif shape == "hexagon":
        d.regular_polygon((cx, cy, r), 6, rotation=0, fill=fill)
    elif shape == "cross":
        w = 0.3 * r
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "star":
        d.polygon(_star(cx, cy, r, 0.0), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_row(index: int, image_size: int = 32, seed: int = 0) -> dict:
    """Row `index` of the synthetic set: {"key", "jpg", "caption", "label", "colour"}."""
    rng = np.random.default_rng([seed, index])
    names = list(COLOURS)
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour, bg = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    template = _CAPTIONS[rng.integers(len(_CAPTIONS))]

    side = image_size * _SUPERSAMPLE
    r = SIZES[size] * side / 2 * rng.uniform(0.9, 1.05)
    shift = max(0.0, side / 2 - r - 0.03 * side)  # push towards the edge, keep the shape inside
    dx, dy = POSITIONS[position]
    jitter = rng.uniform(-0.04, 0.04, size=2) * side
    cx, cy = side / 2 + dx * shift + jitter[0], side / 2 + dy * shift + jitter[1]

    img = Image.new("RGB", (side, side), COLOURS[bg])
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLOURS[colour])
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    a = np.asarray(img, dtype=np.float32) + rng.normal(0.0, _NOISE_STD, (image_size, image_size, 3))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    where = _WHERE[position]
    caption = template.format(size=size, colour=colour, shape=shape, where=where, bg=bg)
    return {
        "key": f"{index:09d}",
        "jpg": buf.getvalue(),
        "caption": caption,
        "label": shape,
        "colour": colour,
    }


def generate(n: int, image_size: int = 32, seed: int = 0, start: int = 0) -> list[dict]:
    """Rows start .. start+n-1; each is reproducible from (seed, index) alone."""
    return [make_row(i, image_size, seed) for i in range(start, start + n)]


# ----------------------------------------------------------------------------- multi-object scenes

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_CELL_NAMES = {  # (column, row) of a 3x3 grid -> name; a 2x2 grid uses the corners
    (0, 0): "top left",
    (1, 0): "top",
    (2, 0): "top right",
    (0, 1): "left",
    (1, 1): "centre",
    (2, 1): "right",
    (0, 2): "bottom left",
    (1, 2): "bottom",
    (2, 2): "bottom right",
}
_SCENE_CAPTIONS = (  # {objects}: "a red star at the top left and a blue circle ..."
    "{objects}",
    "{objects}, on {bg}",
    "{a_bg} picture with {objects}",
)
_LIST_CAPTIONS = (  # {objects}: "a red star and a blue circle" (no positions)
    "{number} shapes on {a_bg} background: {objects}",
    "a picture of {objects}",
)
MAX_OBJECTS = 7  # distinct colours: 8 minus the background


def scene_classes() -> list[str]:
    """The classes of a scene's mask (classes.txt): 0 = background, i = SHAPES[i - 1]."""
    return ["background", *SHAPES]


def cell_name(col: int, row: int, grid: int) -> str:
    """The name of cell (col, row) of a 2x2 or 3x3 grid: "top left", "top", ..., "centre"."""
    if grid not in (2, 3):
        raise ValueError(f"cells are named in 2x2 and 3x3 grids only (got {grid}x{grid})")
    if grid == 2:
        col, row = col * 2, row * 2
    return _CELL_NAMES[(col, row)]


def where_phrase(name: str) -> str:
    """A cell name as a caption phrase: "at the top left", "on the left", "in the centre"."""
    return _WHERE.get(name, f"at the {name}")


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _relation(a: tuple[int, int], b: tuple[int, int]) -> str:
    """Where cell a lies from cell b: 'above', 'to the left of', 'above and to the left of'."""
    vertical = {-1: "above", 1: "below"}.get(int(np.sign(a[1] - b[1])))
    horizontal = {-1: "to the left of", 1: "to the right of"}.get(int(np.sign(a[0] - b[0])))
    return " and ".join(w for w in (vertical, horizontal) if w)


def and_list(parts: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _majority(labels: np.ndarray, factor: int, num_classes: int) -> np.ndarray:
    """[H*f, W*f] class map -> [H, W]: the class covering more than half of each f x f block,
    IGNORE where none does (edges shared about equally)."""
    h, w = labels.shape[0] // factor, labels.shape[1] // factor
    blocks = labels.reshape(h, factor, w, factor)
    out = np.full((h, w), IGNORE, dtype=np.uint8)
    for c in np.unique(labels):
        count = (blocks == c).sum(axis=(1, 3))
        out[count * 2 > factor * factor] = c
    assert int(labels.max()) < num_classes
    return out


def make_scene(index: int, image_size: int = 32, seed: int = 0, objects: int = 2) -> dict:
    """Scene `index`: `objects` shapes of different classes and colours, each in its own cell of
    a 2x2 grid (3x3 beyond 4 objects, at most MAX_OBJECTS), on a plain background.

    Returns {"key", "jpg", "caption", "label", "colour", "mask", "objects"}: `mask` is PNG bytes
    (maskclip.dense: class i = scene_classes()[i], IGNORE on edge pixels shared about equally by
    two classes); `label`/`colour` are the largest object's shape and colour; `objects` lists
    {"shape", "colour", "where"} (where = the cell's name, e.g. "top left") in reading order
    (top row first, left to right). The caption names every object, with its colour, and no other
    shape. Depends only on (seed, index, objects)."""
    if not 1 <= objects <= MAX_OBJECTS:
        raise ValueError(f"objects must be 1..{MAX_OBJECTS} (got {objects})")
    rng = np.random.default_rng([seed, index, objects, 7])
    grid = 2 if objects <= 4 else 3
    names = list(COLOURS)
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=objects, replace=False)]
    picked = rng.choice(len(names), size=objects + 1, replace=False)
    bg, colours = names[picked[0]], [names[i] for i in picked[1:]]
    cells = [divmod(int(c), grid)[::-1] for c in rng.choice(grid * grid, objects, replace=False)]

    side = image_size * _SUPERSAMPLE
    cell = side / grid
    img = Image.new("RGB", (side, side), COLOURS[bg])
    labels = Image.new("L", (side, side), 0)
    draw, draw_labels = ImageDraw.Draw(img), ImageDraw.Draw(labels)
    for shape, colour, (col, row) in zip(shapes, colours, cells):
        r = cell / 2 * rng.uniform(0.6, 0.92)
        slack = cell / 2 - r
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        _draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
        _draw_shape(draw_labels, shape, cx, cy, r, SHAPES.index(shape) + 1)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    a = np.asarray(img, dtype=np.float32) + rng.normal(0.0, _NOISE_STD, (image_size, image_size, 3))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    mask = _majority(np.asarray(labels), _SUPERSAMPLE, len(SHAPES) + 1)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)

    order = sorted(range(objects), key=lambda k: (cells[k][1], cells[k][0]))  # reading order
    objs = [
        {"shape": shapes[k], "colour": colours[k], "where": cell_name(*cells[k], grid)}
        for k in order
    ]
    named = [_a(f"{o['colour']} {o['shape']}") for o in objs]
    style = int(rng.integers(3))
    if style == 0 and objects == 2:
        rel = _relation(cells[order[0]], cells[order[1]])
        caption = f"{named[0]} {rel} {named[1]}"
        if rng.integers(2):
            caption = f"{named[1]} {_relation(cells[order[1]], cells[order[0]])} {named[0]}"
    elif style == 1:
        t = _LIST_CAPTIONS[rng.integers(len(_LIST_CAPTIONS))]
        caption = t.format(number=_NUMBERS[objects], objects=and_list(named), a_bg=_a(bg))
        if objects == 1:
            caption = caption.replace("one shapes", "one shape")
    else:
        t = _SCENE_CAPTIONS[rng.integers(len(_SCENE_CAPTIONS))]
        located = [f"{n} {where_phrase(o['where'])}" for n, o in zip(named, objs)]
        caption = t.format(objects=and_list(located), bg=bg, a_bg=_a(bg))

    areas = np.bincount(mask.ravel(), minlength=256)
    largest = max(range(objects), key=lambda k: (areas[SHAPES.index(shapes[k]) + 1], -k))
    return {
        "key": f"{index:09d}",
        "jpg": buf.getvalue(),
        "caption": caption,
        "label": shapes[largest],
        "colour": colours[largest],
        "mask": encode_mask(mask),
        "objects": objs,
    }


def generate_scenes(
    n: int, image_size: int = 32, seed: int = 0, start: int = 0, objects: int = 2
) -> list[dict]:
    """Scenes start .. start+n-1 (make_scene); each is reproducible from (seed, index) alone."""
    return [make_scene(i, image_size, seed, objects) for i in range(start, start + n)]
