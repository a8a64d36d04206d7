"""service.rows: what a bad row is and why (one set of rules for pipeline, tools and eval)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from maskclip.transforms import eval_transform
from service import rows as R


def _png(size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "value, want",
    [
        ("  a red circle \n", ("a red circle", None)),
        (b"bytes ok", ("bytes ok", None)),
        (np.str_("numpy str"), ("numpy str", None)),
        (7, ("7", None)),
        (None, (None, R.R_MISSING_CAPTION)),
        (float("nan"), (None, R.R_MISSING_CAPTION)),
        (np.float32("nan"), (None, R.R_MISSING_CAPTION)),
        ("   ", (None, R.R_EMPTY_CAPTION)),
        ("", (None, R.R_EMPTY_CAPTION)),
        (b"\xff\xfe bad", (None, R.R_BAD_CAPTION)),
    ],
)
def test_clean_caption(value, want):
    assert R.clean_caption(value, 50) == want


def test_clean_caption_truncates():
    assert R.clean_caption("abcdefgh", 3) == ("abc", None)
    assert R.clean_caption("abcdefgh") == ("abcdefgh", None)


@pytest.mark.parametrize(
    "value, want",
    [
        ("circle", ("circle", None)),
        (b"square", ("square", None)),
        (3, ("3", None)),
        (None, (None, R.R_MISSING_LABEL)),
        (float("nan"), (None, R.R_MISSING_LABEL)),
        ("", (None, R.R_MISSING_LABEL)),
        ("  ", (None, R.R_MISSING_LABEL)),
    ],
)
def test_clean_label_null_is_bad_never_an_empty_class(value, want):
    assert R.clean_label(value) == want


def test_decode_image_reasons():
    img, why = R.decode_image(_png())
    assert why is None and img.mode == "RGB" and img.size == (16, 12)
    data = _png()
    assert R.decode_image(None) == (None, R.R_MISSING_IMAGE)
    assert R.decode_image(b"") == (None, R.R_EMPTY_IMAGE)
    assert R.decode_image(bytearray()) == (None, R.R_EMPTY_IMAGE)
    assert R.decode_image("a str, not bytes") == (None, R.R_CORRUPT_IMAGE)
    assert R.decode_image(b"not an image") == (None, R.R_CORRUPT_IMAGE)
    assert R.decode_image(data[: len(data) // 2]) == (None, R.R_CORRUPT_IMAGE)
    assert R.decode_image(data, max_pixels=16 * 12 - 1) == (None, R.R_LARGE_IMAGE)
    assert R.decode_image(data, max_pixels=16 * 12)[1] is None


def test_clean_row_order_and_transform():
    kw = {"max_pixels": 10_000, "max_caption_chars": 5}
    row, why = R.clean_row(_png(), "a long caption", "circle", need_label=True, **kw)
    assert why is None and row.caption == "a lon" and row.label == "circle"
    assert isinstance(row.image, Image.Image)
    # the first bad value decides: caption, then label, then image
    assert R.clean_row(b"", None, None, need_label=True, **kw) == (None, R.R_MISSING_CAPTION)
    assert R.clean_row(b"", "ok", None, need_label=True, **kw) == (None, R.R_MISSING_LABEL)
    assert R.clean_row(b"", "ok", None, **kw) == (None, R.R_EMPTY_IMAGE)  # label not needed
    row, why = R.clean_row(_png(), None, None, need_caption=False, **kw)
    assert why is None and row.caption is None and row.label is None
    row, _ = R.clean_row(_png(), "ok", transform=eval_transform(8), **kw)
    assert isinstance(row.image, torch.Tensor) and row.image.shape == (3, 8, 8)

    def broken(img):
        raise RuntimeError("boom")

    assert R.clean_row(_png(), "ok", transform=broken, **kw) == (None, R.R_TRANSFORM)


@pytest.mark.parametrize(
    "status, image, want",
    [
        ("success", b"jpg", False),
        ("success", None, False),  # a damaged shard: a bad row (missing image), not a failure
        ("failed_to_download", None, True),
        ("failed_to_resize", b"jpg", True),
        (b"failed_to_download", None, True),
        (" success ", b"jpg", False),
        (None, None, True),  # no status, no image: the download failed
        (None, b"jpg", False),  # no status, an image: decode it
        (float("nan"), None, True),
        ("", b"jpg", False),
    ],
)
def test_not_downloaded_follows_img2dataset_status(status, image, want):
    assert R.not_downloaded(status, image) is want
