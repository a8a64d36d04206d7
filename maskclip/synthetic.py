"""Synthetic shapes with compositional captions, for demos and tests.

Each row is one coloured shape on a plain background, e.g. "a small red circle on the left of a
blue background"; its `label` is the shape name (`class_names()`) and its `colour` the shape's
colour (`colour_names()`): either column can be a zero-shot label (`data.label_column`). Row i
depends only on (seed, i), never on n or start.

    rows = generate(1000, image_size=32, seed=0)   # [{"key", "jpg", "caption", "label", "colour"}]

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
