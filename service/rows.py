"""What a bad row is, and why: one set of rules for the training pipeline (service.data), the
dataset tools (service.datasets) and evaluation.

    row, why = clean_row(jpg, caption, label, max_pixels=..., max_caption_chars=..., need_label=True)
    if why is not None: reasons[why] += 1          # one of the R_* reasons below

Each check returns (value, None) for a usable value or (None, reason). A row is dropped for its
first bad value, checked caption -> label -> image bytes -> decode -> transform (cheap first).

Rows that were never downloaded are not bad rows: img2dataset keeps a failed download as a row
with a null image and a `status` column saying why (often 10-30% of a crawl). Where a source has
that column, `not_downloaded(status, image)` picks them out first; they are counted on their
own and never toward data.max_bad_fraction.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

R_MISSING_IMAGE = "missing image"
R_EMPTY_IMAGE = "empty image"
R_CORRUPT_IMAGE = "corrupt image"
R_LARGE_IMAGE = "image too large"
R_MISSING_CAPTION = "missing caption"
R_EMPTY_CAPTION = "empty caption"
R_BAD_CAPTION = "caption not UTF-8"
R_MISSING_LABEL = "missing label"
R_TRANSFORM = "transform failed"

_BYTES = (bytes, bytearray, memoryview)

STATUS_COLUMN = "status"
"""img2dataset's per-row download status: "success", "failed_to_download", "failed_to_resize"."""
STATUS_OK = "success"


def _text(value: Any, missing: str, bad_utf8: str) -> tuple[str | None, str | None]:
    if value is None:
        return None, missing
    if isinstance(value, _BYTES):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, bad_utf8
    elif not isinstance(value, str):
        if isinstance(value, numbers.Real) and math.isnan(value):  # NaN: pandas-ish writers
            return None, missing
        value = str(value)
    return value.strip(), None


def not_downloaded(status: Any, image: Any) -> bool:
    """For a source with a STATUS_COLUMN: True when the row is a failed download, not data: its
    status is set and is not "success", or its status is null and so is its image. A "success"
    row whose image is null or unreadable stays a bad row (the shard is damaged)."""
    text, _ = _text(status, "", "")
    if text:
        return text != STATUS_OK
    return image is None


def clean_caption(value: Any, max_chars: int | None = None) -> tuple[str | None, str | None]:
    """-> (caption stripped and cut to `max_chars`, None) or (None, reason)."""
    text, why = _text(value, R_MISSING_CAPTION, R_BAD_CAPTION)
    if why is not None:
        return None, why
    if not text:
        return None, R_EMPTY_CAPTION
    return (text[:max_chars] if max_chars else text), None


def clean_label(value: Any) -> tuple[str | None, str | None]:
    """-> (class name, None) or (None, R_MISSING_LABEL): a null, NaN or blank label is a bad row,
    never a class named ""."""
    text, _ = _text(value, R_MISSING_LABEL, R_MISSING_LABEL)
    if not text:
        return None, R_MISSING_LABEL
    return text, None


def image_bytes_reason(data: Any) -> str | None:
    """Why `data` cannot be image bytes without decoding it (None, empty, not bytes), else None."""
    if data is None:
        return R_MISSING_IMAGE
    if not isinstance(data, _BYTES):
        return R_CORRUPT_IMAGE
    if len(data) == 0:
        return R_EMPTY_IMAGE
    return None


def decode_image(
    data: Any, max_pixels: int = 64_000_000, min_side: int | None = None
) -> tuple[Any, str | None]:
    """-> (RGB PIL image, None) or (None, reason); maskclip.transforms.decode_image's error
    types map to the reasons. `min_side`: JPEG draft mode (see maskclip.transforms)."""
    from maskclip.transforms import EmptyImageError, ImageDecodeError, ImageTooLargeError
    from maskclip.transforms import decode_image as decode

    why = image_bytes_reason(data)
    if why is not None:
        return None, why
    try:
        return decode(data, max_pixels=max_pixels, min_side=min_side), None
    except EmptyImageError:
        return None, R_EMPTY_IMAGE
    except ImageTooLargeError:
        return None, R_LARGE_IMAGE
    except ImageDecodeError:
        return None, R_CORRUPT_IMAGE


@dataclasses.dataclass
class Row:
    image: Any  # the transformed image (a tensor) or, without a transform, the PIL image
    caption: str | None
    label: str | None


def clean_row(
    image: Any,
    caption: Any = None,
    label: Any = None,
    *,
    max_pixels: int,
    max_caption_chars: int | None,
    transform: Callable[[Any], Any] | None = None,
    need_caption: bool = True,
    need_label: bool = False,
    min_side: int | None = None,
) -> tuple[Row | None, str | None]:
    """One row through every rule -> (Row, None) or (None, the first reason it is bad).
    `min_side`: the decode may shrink a large JPEG down to this shorter side (draft mode)."""
    text = None
    if need_caption:
        text, why = clean_caption(caption, max_caption_chars)
        if why is not None:
            return None, why
    name = None
    if need_label:
        name, why = clean_label(label)
        if why is not None:
            return None, why
    img, why = decode_image(image, max_pixels, min_side)
    if why is not None:
        return None, why
    if transform is not None:
        try:
            img = transform(img)
        except Exception:  # any failure in a user-visible transform drops the row, counted
            return None, R_TRANSFORM
    return Row(img, text, name), None
