"""The dense-label format: per-pixel class masks beside img2dataset-style image-text rows.

A dense-labelled dataset folder holds Parquet shards whose rows have, besides `jpg` and
`caption`, a `mask` column: PNG bytes, single channel, 8-bit, the image's size, pixel value =
class index, `IGNORE` (255) = not labelled. Beside the shards, `classes.txt` names the classes:
line i is the name of class i (class 0 may be `background`).

    names = parse_classes(text)                  # ["background", "circle", ...]
    png = encode_mask(np.array([[0, 1], [1, 255]], np.uint8))
    m = decode_mask(png, size=(w, h), num_classes=len(names))   # [h, w] uint8, checked

This module is the only place that reads or writes the format's masks; the service's data tools,
its evaluation and the synthetic data all go through it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MASK_COLUMN = "mask"
CLASSES_FILE = "classes.txt"
IGNORE = 255
MAX_CLASSES = 255  # 0..254; 255 is IGNORE


class MaskError(ValueError):
    """A mask that does not follow the format (the message says how; the caller adds where)."""


def parse_classes(text: str) -> list[str]:
    """`classes.txt` contents -> class names (line i = class i); blank trailing lines dropped.
    Raises MaskError for an empty list, a blank name inside the list, duplicates, or > 255."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise MaskError(f"{CLASSES_FILE} lists no classes")
    for i, name in enumerate(lines):
        if not name:
            raise MaskError(f"{CLASSES_FILE} line {i + 1} is blank")
    seen: dict[str, int] = {}
    for i, name in enumerate(lines):
        if name in seen:
            raise MaskError(
                f"{CLASSES_FILE} names {name!r} twice (lines {seen[name] + 1} and {i + 1})"
            )
        seen[name] = i
    if len(lines) > MAX_CLASSES:
        raise MaskError(f"{CLASSES_FILE} lists {len(lines)} classes; at most {MAX_CLASSES} fit")
    return lines


def format_classes(names: list[str]) -> str:
    """Class names -> `classes.txt` contents (checked by `parse_classes`)."""
    text = "".join(f"{n}\n" for n in names)
    parse_classes(text)
    return text


def encode_mask(mask: np.ndarray) -> bytes:
    """[H, W] integer class indices (0..254, 255 = ignore) -> PNG bytes (mode L)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise MaskError(f"a mask is 2-D (H, W), got shape {m.shape}")
    if m.size and (m.min() < 0 or m.max() > IGNORE):
        raise MaskError(f"mask values must be in 0..{IGNORE}, got {m.min()}..{m.max()}")
    buf = io.BytesIO()
    Image.fromarray(m.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(
    data: bytes, size: tuple[int, int] | None = None, num_classes: int | None = None
) -> np.ndarray:
    """PNG bytes -> [H, W] uint8 class indices.

    size: the image's (width, height); a mask of another size raises MaskError.
    num_classes: indices must be < num_classes or IGNORE; others raise MaskError.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
            arr = np.asarray(im)
    except Exception as e:  # PIL raises many types for bad bytes
        raise MaskError(f"mask is not a readable PNG ({type(e).__name__})") from None
    if mode not in ("L", "P") or arr.ndim != 2:
        raise MaskError(f"mask must be single-channel 8-bit (mode L), got mode {mode}")
    if size is not None and (w, h) != tuple(size):
        raise MaskError(f"mask is {w}x{h} but its image is {size[0]}x{size[1]}")
    arr = arr.astype(np.uint8, copy=False)
    if num_classes is not None:
        bad = (arr >= num_classes) & (arr != IGNORE)
        if bad.any():
            v = int(arr[bad].max())
            raise MaskError(
                f"mask has class index {v} but {CLASSES_FILE} lists {num_classes} classes "
                f"(0..{num_classes - 1}, {IGNORE} = ignore)"
            )
    return arr


def pixel_shares(masks, num_classes: int) -> np.ndarray:
    """Share of labelled pixels per class over an iterable of [H, W] masks -> [num_classes]
    float array summing to 1 (all zeros when nothing is labelled)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for m in masks:
        m = np.asarray(m).ravel()
        counts += np.bincount(m[m != IGNORE], minlength=num_classes)[:num_classes]
    total = counts.sum()
    return counts / total if total else counts.astype(np.float64)
