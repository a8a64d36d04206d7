"""Image bytes -> RGB PIL image -> normalised float tensor [3, H, W].

img = decode_image(row["jpg"], min_side=draft_min_side(224, train=True))  # ImageDecodeError
x = train_transform(224)(img)           # float32 [3, 224, 224], CLIP-normalised
u = train_transform(224, normalise=False)(img)  # uint8 [3, 224, 224]: the same crop, 4x smaller
x = normalise_images(torch.stack([u]))  # float32 [1, 3, 224, 224], bit-identical to the above

The Ray Data pipeline (service.data) ships uint8 crops and the training loop normalises them
with normalise_images after the copy to the device: a float32 224 px row is 600 KB, a uint8 one
150 KB (object store, host-to-device copy).

JPEG draft mode: with `min_side`, a JPEG at least twice that size on its shorter side is decoded
at 1/2, 1/4 or 1/8 scale by libjpeg's scaled IDCT (DCT-domain downscaling), never below
`min_side`; draft_min_side gives the side below which a transform's crop would need upsampling.
Measured on the 2-core dev machine (CPU time, 1 thread, under a load of ~12, two runs): decode +
random-resized-crop to 224 px of a q90 photo-like JPEG takes 4.4-5.1 ms with draft (decoded at
512x384) against 5.3-7.5 ms without for 1024x768, 13-14 ms against 23-25 ms for 2000x1500
(entropy decoding is not scaled); a 500x375 source is never drafted for 224 px (375 < 2 x 366).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, v2

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TRAIN_SCALE = (0.5, 1.0)
"""RandomResizedCrop area fraction of the training crop."""
TRAIN_RATIO = (3 / 4, 4 / 3)
"""RandomResizedCrop aspect ratio range (torchvision's default)."""

_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image we accept (empty, corrupt, truncated, too large).

    Raised as one of the subclasses below, so callers can tell the cases apart by type.
    """


class EmptyImageError(ImageDecodeError):
    """No bytes at all."""


class ImageTooLargeError(ImageDecodeError):
    """More pixels than allowed (a decompression bomb or just a huge image)."""


class CorruptImageError(ImageDecodeError):
    """Bytes that no decoder accepts (corrupt, truncated, not an image)."""


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_DEPTH_MODES:  # 16/32-bit grey: scale the 16-bit range down to 8 bits
        a = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            a = a / 257.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def draft_min_side(image_size: int, train: bool) -> int:
    """The shorter side a source image needs so that the transform never upsamples.

    Eval resizes the shorter side to `image_size`. A training crop has area >= TRAIN_SCALE[0] of
    the image and aspect ratio within TRAIN_RATIO, so its shorter side is at least
    sqrt(TRAIN_SCALE[0] x TRAIN_RATIO[0] x W x H) >= shorter side x 0.61; the image needs a
    shorter side of image_size / 0.61 (366 for 224 px) for every crop to be >= image_size."""
    if not train:
        return image_size
    return math.ceil(image_size / math.sqrt(TRAIN_SCALE[0] * TRAIN_RATIO[0]))


def decode_image(
    data: bytes, max_pixels: int = 64_000_000, min_side: int | None = None
) -> Image.Image:
    """Decode JPEG/PNG/WebP bytes to an RGB image; raise ImageDecodeError on anything bad.

    `min_side`: a JPEG whose shorter side is at least 2 x min_side is decoded at the smallest
    1/2, 1/4 or 1/8 scale that keeps its shorter side >= min_side (PIL's Image.draft: libjpeg
    scales in the DCT domain, a fraction of the work of a full decode). Other formats, and JPEGs
    below that size, decode at full size. max_pixels applies to the full size."""
    if data is None or len(data) == 0:
        raise EmptyImageError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageTooLargeError(f"image too large: {w}x{h} pixels")
            if min_side and img.format == "JPEG" and min(w, h) >= 2 * min_side:
                img.draft(img.mode, (min_side, min_side))
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block should not lose the image
                pass
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"image too large: {_one_line(e)}") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, struct.error, ...
        raise CorruptImageError(f"cannot decode image: {_one_line(e)}") from None


def _normalise(normalise: bool = True) -> list:
    if not normalise:
        return []
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, H, W] (a transform's output with normalise=False, or a batch of
    them, on any device) -> float32, CLIP-normalised: the transforms' own last two steps, the
    same kernels elementwise, so the result equals the normalise=True transform's bit for bit.
    A float tensor is returned as it is (already normalised)."""
    if images.is_floating_point():
        return images
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 or already normalised float, got {images.dtype}")
    x = v2.functional.to_dtype(images, torch.float32, scale=True)
    return v2.functional.normalize(x, list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD), inplace=True)


def train_transform(
    image_size: int, normalise: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop (scale 0.5-1) + normalise. No flips: captions may say left/right.
    normalise=False: the uint8 crop (normalise_images finishes it)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                image_size,
                scale=TRAIN_SCALE,
                ratio=TRAIN_RATIO,
                interpolation=InterpolationMode.BICUBIC,
                antialias=True,
            ),
            *_normalise(normalise),
        ]
    )


def eval_transform(
    image_size: int, normalise: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side to `image_size`, centre crop, normalise (normalise=False: the
    uint8 crop)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *_normalise(normalise),
        ]
    )


def encode_jpeg(img: Image.Image, quality: int = 90, max_size: int | None = None) -> bytes:
    """Encode as JPEG, first shrinking so the longer side is at most `max_size`."""
    if img.mode not in ("RGB", "L"):
        img = _to_rgb(img)
    if max_size is not None and max(img.size) > max_size:
        w, h = img.size
        s = max_size / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
