import io

import numpy as np
import pytest
import torch
from PIL import Image, features

from maskclip.transforms import (
    OPENAI_CLIP_MEAN,
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    encode_jpeg,
    eval_transform,
    normalise_images,
    train_transform,
)

HAS_WEBP = features.check("webp")


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w: int = 20, h: int = 12) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    a[..., 1] = 128
    return Image.fromarray(a)


def _mode(mode: str) -> Image.Image:
    if mode == "I;16":
        a = np.full((12, 20), 65535, np.uint16)
        a[:, :10] = 0
        return Image.frombytes("I;16", (20, 12), a.astype("<u2").tobytes())
    if mode == "I":
        return _mode("I;16").convert("I")
    if mode == "P":
        return _rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _rgb().convert(mode)


CASES = [("PNG", m) for m in ("RGB", "L", "LA", "P", "RGBA", "I;16", "1")]
CASES += [("TIFF", "I")]  # Pillow writes 32-bit grey as TIFF, not PNG
CASES += [("JPEG", m) for m in ("RGB", "L", "CMYK")]
CASES += [("WEBP", m) for m in ("RGB", "RGBA")] if HAS_WEBP else []


@pytest.mark.parametrize("fmt,mode", CASES)
def test_modes_decode_to_rgb(fmt, mode):
    src = _mode(mode)
    assert src.mode == mode
    img = decode_image(_bytes(src, fmt))
    assert img.mode == "RGB" and img.size == (20, 12)
    a = np.asarray(img)
    assert a.dtype == np.uint8


@pytest.mark.parametrize("fmt,mode", [("PNG", "I;16"), ("TIFF", "I")])
def test_sixteen_bit_scaled_to_eight_bit(fmt, mode):
    a = np.asarray(decode_image(_bytes(_mode(mode), fmt)))
    assert (a[:, :10] == 0).all() and (a[:, 10:] == 255).all()


def test_rgba_composited_on_white():
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :4] = (255, 0, 0, 255)  # opaque red left, fully transparent black right
    out = np.asarray(decode_image(_bytes(Image.fromarray(a), "PNG")))
    assert (out[:, :4] == (255, 0, 0)).all()
    assert (out[:, 4:] == 255).all()


def test_palette_transparency_composited_on_white():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 4, 8))
    data = _bytes(p, "PNG", transparency=0)
    out = np.asarray(decode_image(data))
    assert (out[:, :4] == (0, 0, 255)).all()
    assert (out[:, 4:] == 255).all()


def test_la_composited_on_white():
    a = np.zeros((4, 4, 2), np.uint8)  # black, fully transparent
    out = np.asarray(decode_image(_bytes(Image.fromarray(a), "PNG")))
    assert (out == 255).all()


def test_bomb_guard():
    data = _bytes(_rgb(100, 50), "PNG")
    assert decode_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageTooLargeError, match="image too large: 100x50 pixels"):
        decode_image(data, max_pixels=4999)


def test_pil_bomb_error_converted(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = _bytes(_rgb(20, 12), "PNG")  # 240 px: over PIL's limit, under 2x -> warning
    with pytest.raises(ImageTooLargeError, match="too large"):
        decode_image(data)
    data = _bytes(_rgb(40, 30), "PNG")  # over 2x -> DecompressionBombError
    with pytest.raises(ImageTooLargeError, match="too large"):
        decode_image(data)


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", EmptyImageError),
        (None, EmptyImageError),
        (bytearray(), EmptyImageError),
        (b"hello, I am not an image", CorruptImageError),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, CorruptImageError),
    ],
)
def test_bad_bytes_raise(data, kind):
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data)
    assert type(e.value) is kind
    assert "\n" not in str(e.value) and str(e.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_raises(fmt):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _bytes(img, fmt)
    with pytest.raises(CorruptImageError):
        decode_image(data[: len(data) // 2])


def test_transforms_shapes_and_normalisation():
    img = _rgb(50, 30)
    for tf in (train_transform(16), eval_transform(16)):
        x = tf(img)
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (3, 16, 16)
    grey = Image.new("RGB", (40, 40), tuple(round(255 * m) for m in OPENAI_CLIP_MEAN))
    assert eval_transform(8)(grey).abs().max() < 0.02  # the mean colour maps to ~0


@pytest.mark.parametrize("make", [train_transform, eval_transform])
def test_uint8_crop_then_normalise_images_equals_the_normalising_transform(make):
    """normalise=False gives the same crop as uint8; normalise_images on one image or on a
    stacked batch then gives the normalising transform's float32 output bit for bit."""
    rng = np.random.default_rng(1)
    imgs = [
        Image.fromarray(rng.integers(0, 255, (30 + i, 50, 3), dtype=np.uint8)) for i in range(4)
    ]
    torch.manual_seed(3)
    floats = [make(16)(img) for img in imgs]
    torch.manual_seed(3)
    crops = [make(16, normalise=False)(img) for img in imgs]
    assert all(c.dtype == torch.uint8 and c.shape == (3, 16, 16) for c in crops)
    assert torch.equal(normalise_images(crops[0]), floats[0])
    batch = normalise_images(torch.stack(crops))
    assert batch.dtype == torch.float32 and torch.equal(batch, torch.stack(floats))


def test_normalise_images_refuses_other_integer_types():
    with pytest.raises(TypeError, match="uint8"):
        normalise_images(torch.zeros(3, 4, 4, dtype=torch.int64))


def test_eval_deterministic_train_random():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    ev = eval_transform(24)
    assert torch.equal(ev(img), ev(img))
    tr = train_transform(24)
    outs = [tr(img) for _ in range(5)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_eval_centre_crop():
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, 20:40] = 255  # white centre third, black sides
    x = eval_transform(20)(Image.fromarray(a))
    assert (x > 1.5).float().mean() > 0.9  # the crop sees only the white centre


def test_encode_jpeg():
    img = _rgb(200, 100)
    data = encode_jpeg(img, max_size=50)
    out = Image.open(io.BytesIO(data))
    assert out.format == "JPEG" and out.size == (50, 25)
    assert Image.open(io.BytesIO(encode_jpeg(img))).size == (200, 100)
    assert decode_image(encode_jpeg(_rgb().convert("RGBA"))).mode == "RGB"
    assert len(encode_jpeg(img, quality=95)) > len(encode_jpeg(img, quality=20))


# ---------------------------------------------------------------- JPEG draft mode


def _photo(w: int, h: int) -> Image.Image:
    """Smooth colour field plus fine texture: a JPEG that is not trivially compressible."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    a = base + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_draft_min_side_is_what_the_crop_needs():
    from maskclip.transforms import draft_min_side

    assert draft_min_side(224, train=False) == 224
    assert draft_min_side(224, train=True) == 366  # ceil(224 / sqrt(0.5 * 3/4))


@pytest.mark.parametrize(
    ("size", "min_side", "expect"),
    [
        ((1024, 768), 366, (512, 384)),  # half scale keeps 384 >= 366
        ((2000, 1500), 366, (500, 375)),  # quarter scale
        ((2000, 1500), 180, (250, 188)),  # eighth scale (ceil)
        ((500, 375), 366, (500, 375)),  # under 2 x min_side: full size
        ((700, 700), 366, (700, 700)),  # 700 < 732: full size
        ((1024, 768), None, (1024, 768)),  # no min_side: full size
    ],
)
def test_draft_decodes_large_jpegs_smaller_never_below_min_side(size, min_side, expect):
    data = _bytes(_photo(*size), "JPEG", quality=90)
    img = decode_image(data, min_side=min_side)
    assert img.size == expect and img.mode == "RGB"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_draft_leaves_other_formats_at_full_size(fmt):
    if fmt == "WEBP" and not HAS_WEBP:
        pytest.skip("no WebP support in this Pillow")
    img = decode_image(_bytes(_photo(1024, 768), fmt), min_side=224)
    assert img.size == (1024, 768)


def test_draft_keeps_max_pixels_on_the_full_size():
    data = _bytes(_photo(1024, 768), "JPEG", quality=90)
    with pytest.raises(ImageTooLargeError, match="1024x768"):
        decode_image(data, max_pixels=500_000, min_side=224)


def test_draft_output_matches_the_full_decode_after_the_eval_transform():
    """The 224 px eval view of a drafted 1024x768 JPEG (decoded at 512x384) is within a
    fraction of a grey level of the full decode's: the DCT-domain downscale is a proper one."""
    data = _bytes(_photo(1024, 768), "JPEG", quality=90)
    t = eval_transform(224)
    full, drafted = t(decode_image(data)), t(decode_image(data, min_side=224))
    assert full.shape == drafted.shape == (3, 224, 224)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    diff = (full - drafted) * std * 255  # back to grey levels
    psnr = 10 * torch.log10(255**2 / diff.pow(2).mean())
    assert psnr > 35, f"PSNR {psnr:.1f} dB"
