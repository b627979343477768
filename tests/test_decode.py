"""Tests for restorer.data.decode: every image is built here, in memory, and small."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from restorer.data.decode import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_FORMATS,
    ImageDecodeError,
    canonical_extension,
    decode_image,
    load_image,
    oriented_size,
    to_rgb_array,
)

W, H = 32, 24


# --------------------------------------------------------------------------- helpers


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(
    width: int, height: int, bit_depth: int, colour_type: int, raw: bytes, trns: bytes | None = None
) -> bytes:
    """A PNG written by hand: `raw` is the unfiltered scanlines without filter bytes."""
    stride = len(raw) // height
    rows = b"".join(b"\x00" + raw[y * stride : (y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    if trns is not None:
        out += _chunk(b"tRNS", trns)
    return out + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def png16(arr: np.ndarray, colour_type: int, trns: bytes | None = None) -> bytes:
    """16-bit PNG from a (H, W) or (H, W, C) uint16 array (Pillow cannot write 16-bit RGB)."""
    return png_bytes(arr.shape[1], arr.shape[0], 16, colour_type, arr.astype(">u2").tobytes(), trns)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge size, with almost no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def noise_rgb(seed: int = 0, size: tuple[int, int] = (W, H)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def gradient_rgb() -> np.ndarray:
    ramp = (np.arange(W, dtype=np.uint16) * 255 // (W - 1)).astype(np.uint8)
    return np.dstack([np.tile(ramp, (H, 1))] * 3)


def assert_rgb(arr: np.ndarray, shape: tuple[int, int] = (H, W)) -> None:
    assert arr.shape == (*shape, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous


def expect_16(v: int) -> int:
    return round(v * 255 / 65535)


# --------------------------------------------------------------------------- modes


def test_rgb_roundtrip_png_is_exact():
    arr = noise_rgb()
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert_rgb(out)
    np.testing.assert_array_equal(out, arr)


def test_rgb_fast_path_is_plain_asarray(monkeypatch):
    im = load_image(encode(Image.fromarray(noise_rgb()), "PNG"))

    def no_convert(*args, **kwargs):
        raise AssertionError("RGB without orientation must not be converted")

    monkeypatch.setattr(Image.Image, "convert", no_convert)
    monkeypatch.setattr(Image.Image, "transpose", no_convert)
    out = to_rgb_array(im)
    assert_rgb(out)
    # np.asarray wraps the bytes PIL hands it; any further copy would own its data.
    assert isinstance(out.base, bytes)


def test_gray_l():
    out = decode_image(encode(Image.new("L", (W, H), 100), "PNG"))
    assert_rgb(out)
    assert (out == 100).all()


def test_one_bit():
    bits = np.zeros((H, W), dtype=bool)
    bits[:, W // 2 :] = True
    im = Image.fromarray(bits)
    assert im.mode == "1"
    for data in (encode(im, "PNG"), encode(im, "BMP"), encode(im, "TIFF")):
        out = decode_image(data)
        assert_rgb(out)
        assert (out[:, : W // 2] == 0).all() and (out[:, W // 2 :] == 255).all()


def _palette_image() -> Image.Image:
    im = Image.new("P", (W, H), 0)
    im.putpalette([10, 20, 30, 200, 0, 100, 0, 255, 0])
    im.paste(1, (0, 0, W // 2, H))
    im.paste(2, (W // 2, 0, W, H // 2))
    return im


def test_palette_without_transparency():
    out = decode_image(encode(_palette_image(), "PNG"))
    assert_rgb(out)
    assert out[0, 0].tolist() == [200, 0, 100]
    assert out[0, W - 1].tolist() == [0, 255, 0]
    assert out[H - 1, W - 1].tolist() == [10, 20, 30]


def test_palette_with_single_transparent_index():
    data = encode(_palette_image(), "PNG", transparency=1)
    out = decode_image(data)
    assert_rgb(out)
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent -> white, not (200, 0, 100)
    assert out[0, W - 1].tolist() == [0, 255, 0]


def test_palette_with_per_entry_alpha():
    # tRNS with one alpha per palette entry: 255, 0, 128.
    data = encode(_palette_image(), "PNG", transparency=bytes([255, 0, 128]))
    assert load_image(data).mode == "P"
    out = decode_image(data)
    assert out[H - 1, W - 1].tolist() == [10, 20, 30]
    assert out[0, 0].tolist() == [255, 255, 255]
    blend = [round((c * 128 + 255 * 127) / 255) for c in (0, 255, 0)]
    assert out[0, W - 1].tolist() == blend


def test_rgba_composited_over_white():
    arr = np.zeros((H, W, 4), dtype=np.uint8)
    arr[..., :3] = (200, 0, 100)
    arr[:, :8, 3] = 0
    arr[:, 8:16, 3] = 255
    arr[:, 16:, 3] = 128
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert_rgb(out)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 8].tolist() == [200, 0, 100]
    assert out[0, 16].tolist() == [round((c * 128 + 255 * 127) / 255) for c in (200, 0, 100)]


def test_la_composited_over_white():
    gray = np.full((H, W), 50, dtype=np.uint8)
    alpha = np.full((H, W), 255, dtype=np.uint8)
    alpha[:, :8] = 0
    im = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
    out = decode_image(encode(im, "PNG"))
    assert_rgb(out)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 8].tolist() == [50, 50, 50]


def test_pa_composited_over_white():
    im = Image.new("PA", (W, H), (1, 255))
    im.putpalette([255, 0, 0, 0, 0, 255])
    im.paste((0, 0), (0, 0, 8, H))  # index 0 (red), fully transparent
    data = encode(im, "TIFF")  # PNG cannot hold PA; TIFF can
    assert load_image(data).mode == "PA"
    out = decode_image(data)
    assert_rgb(out)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 8].tolist() == [0, 0, 255]


def test_colour_key_transparency_rgb_and_l():
    arr = np.full((H, W, 3), (1, 2, 3), dtype=np.uint8)
    arr[:, 8:] = (40, 50, 60)
    out = decode_image(encode(Image.fromarray(arr), "PNG", transparency=(1, 2, 3)))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 8].tolist() == [40, 50, 60]

    gray = np.full((H, W), 7, dtype=np.uint8)
    gray[:, 8:] = 90
    out = decode_image(encode(Image.fromarray(gray), "PNG", transparency=7))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 8].tolist() == [90, 90, 90]


def test_cmyk_jpeg_roughly_right_colour():
    data = encode(Image.new("CMYK", (W, H), (0, 255, 255, 0)), "JPEG", quality=95)
    im = load_image(data)
    assert im.mode == "CMYK"
    out = decode_image(data)
    assert_rgb(out)
    assert np.abs(out.astype(int) - (255, 0, 0)).max() <= 8


def test_cmyk_tiff_exact():
    out = decode_image(encode(Image.new("CMYK", (W, H), (0, 0, 255, 0)), "TIFF"))
    assert out[0, 0].tolist() == [255, 255, 0]


def test_ycbcr():
    im = Image.new("RGB", (W, H), (200, 30, 60)).convert("YCbCr")
    out = to_rgb_array(im)
    assert_rgb(out)
    assert np.abs(out[0, 0].astype(int) - (200, 30, 60)).max() <= 3


VALUES_16 = [0, 257 * 7, 32767, 32768, 65280, 65535]
EXPECTED_16 = [expect_16(v) for v in VALUES_16]  # 0, 7, 127, 128, 254, 255


def _row16() -> np.ndarray:
    return np.tile(np.array(VALUES_16, dtype=np.uint16), (H, W // len(VALUES_16) + 1))[:, :W]


def test_16bit_gray_png_is_scaled_not_clipped():
    data = png16(_row16(), colour_type=0)
    assert load_image(data).mode == "I;16"
    out = decode_image(data)
    assert_rgb(out)
    assert out[0, : len(VALUES_16), 0].tolist() == EXPECTED_16
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2")])
def test_16bit_modes(mode, dtype):
    im = Image.frombytes(mode, (W, H), _row16().astype(dtype).tobytes())
    assert im.mode == mode
    out = to_rgb_array(im)
    assert_rgb(out)
    assert out[0, : len(VALUES_16), 1].tolist() == EXPECTED_16


def test_16bit_tiff():
    im = Image.frombytes("I;16B", (W, H), _row16().astype(">u2").tobytes())
    out = decode_image(encode(im, "TIFF"))
    assert out[0, : len(VALUES_16), 2].tolist() == EXPECTED_16


def test_32bit_int_mode_treated_as_16bit():
    arr = np.full((H, W), 32768, dtype=np.int32)
    arr[:, 0] = -5
    arr[:, 1] = 70000
    arr[:, 2] = 257 * 7
    data = encode(Image.fromarray(arr), "TIFF")
    assert load_image(data).mode == "I"
    out = decode_image(data)
    assert_rgb(out)
    assert out[0, :4, 0].tolist() == [0, 255, 7, 128]


def test_16bit_gray_colour_key():
    data = png16(_row16(), colour_type=0, trns=struct.pack(">H", 32768))
    out = decode_image(data)
    assert out[0, 3].tolist() == [255, 255, 255]  # the keyed value 32768
    assert out[0, 2].tolist() == [127, 127, 127]


def test_16bit_rgb_png_is_scaled():
    grey = np.full((H, W, 3), 32768, dtype=np.uint16)
    grey[:, 1] = (65535, 257 * 7, 0)
    grey[:, 2] = (65280, 32767, 1000)
    data = png16(grey, colour_type=2)
    im = load_image(data)
    assert im.mode == "RGB"  # Pillow 13 keeps the high byte of each 16-bit sample
    out = decode_image(data)
    assert_rgb(out)
    assert out[0, 0].tolist() == [128, 128, 128]  # mid grey, not 255
    assert out[0, 1].tolist() == [255, 7, 0]
    for got, v in zip(out[0, 2].tolist(), (65280, 32767, 1000)):
        assert abs(got - expect_16(v)) <= 1


def test_16bit_rgba_png_composited():
    arr = np.full((H, W, 4), 65535, dtype=np.uint16)
    arr[..., :3] = (32768, 0, 65535)
    arr[:, :8, 3] = 0
    out = decode_image(png16(arr, colour_type=6))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 8].tolist() == [128, 0, 255]


def test_16bit_rgb_colour_key_does_not_garble():
    # Pillow matches a 16-bit tRNS key against 8-bit pixels by the low byte, which
    # would make pixel (0, 255, 0) transparent here. The key's own pixel is 128-grey.
    arr = np.full((H, W, 3), 32768, dtype=np.uint16)
    arr[:, :8] = (0, 65535, 0)
    out = decode_image(png16(arr, colour_type=2, trns=struct.pack(">HHH", 32768, 32767, 32768)))
    assert out[0, 0].tolist() == [0, 255, 0]


def test_float_mode():
    unit = np.full((H, W), 0.25, dtype=np.float32)
    unit[:, 0] = 1.0
    unit[:, 1] = -0.5
    unit[:, 2] = np.nan
    out = decode_image(encode(Image.fromarray(unit), "TIFF"))
    assert_rgb(out)
    assert out[0, :4, 0].tolist() == [255, 0, 0, 64]

    big = np.full((H, W), 100.4, dtype=np.float32)
    big[:, 0] = 300.0
    big[:, 1] = -3.0
    out = to_rgb_array(Image.fromarray(big))
    assert out[0, :3, 0].tolist() == [255, 0, 100]


def test_unconvertible_mode_is_a_decode_error():
    im = Image.new("La", (W, H))
    with pytest.raises(ImageDecodeError, match="cannot convert mode La"):
        to_rgb_array(im)


# --------------------------------------------------------------------------- EXIF orientation

# Per the EXIF spec, where the stored image's first pixel (row 0, col 0) and its
# neighbour along row 0 (row 0, col 1) land in the displayed image of size (h, w).
SPEC = {
    1: lambda h, w: ((0, 0), (0, 1)),
    2: lambda h, w: ((0, w - 1), (0, w - 2)),
    3: lambda h, w: ((h - 1, w - 1), (h - 1, w - 2)),
    4: lambda h, w: ((h - 1, 0), (h - 1, 1)),
    5: lambda h, w: ((0, 0), (1, 0)),
    6: lambda h, w: ((0, w - 1), (1, w - 1)),
    7: lambda h, w: ((h - 1, w - 1), (h - 2, w - 1)),
    8: lambda h, w: ((h - 1, 0), (h - 2, 0)),
}
FIRST, SECOND = (255, 0, 0), (0, 0, 255)


def _marked(orientation: int, fmt: str = "PNG", **kw) -> bytes:
    arr = np.full((H, W, 3), 128, dtype=np.uint8)
    arr[0, 0], arr[0, 1] = FIRST, SECOND
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), fmt, exif=exif, **kw)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation):
    data = _marked(orientation)
    im = load_image(data)
    out = to_rgb_array(im)
    shape = (H, W) if orientation <= 4 else (W, H)
    assert_rgb(out, shape)
    assert oriented_size(im) == (out.shape[1], out.shape[0])
    assert oriented_size(Image.open(io.BytesIO(data))) == (out.shape[1], out.shape[0])
    first, second = SPEC[orientation](*shape)
    assert tuple(out[first]) == FIRST
    assert tuple(out[second]) == SECOND
    assert int((out != 128).any(axis=2).sum()) == 2  # nothing else moved in


def test_exif_orientation_jpeg():
    arr = np.full((H, W, 3), 128, dtype=np.uint8)
    arr[:8, :8] = FIRST
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(arr), "JPEG", exif=exif, quality=95)
    out = decode_image(data)
    assert_rgb(out, (W, H))
    assert oriented_size(load_image(data)) == (H, W)
    assert np.abs(out[2, H - 3].astype(int) - FIRST).max() < 20  # top-right block
    assert np.abs(out[2, 2].astype(int) - 128).max() < 20


def test_bad_orientation_value_is_ignored():
    data = _marked(9)
    out = decode_image(data)
    assert_rgb(out)
    assert tuple(out[0, 0]) == FIRST


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "fmt, ext, kw",
    [
        ("JPEG", "jpg", {"quality": 95}),
        ("PNG", "png", {}),
        ("WEBP", "webp", {"lossless": True}),
        ("BMP", "bmp", {}),
        ("TIFF", "tif", {}),
    ],
)
def test_formats_load(fmt, ext, kw):
    arr = gradient_rgb()
    data = encode(Image.fromarray(arr), fmt, **kw)
    im = load_image(data)
    assert im.format == fmt
    assert fmt in SUPPORTED_FORMATS
    assert canonical_extension(im.format) == ext
    out = decode_image(data)
    assert_rgb(out)
    assert np.abs(out.astype(int) - arr).max() <= (10 if fmt == "JPEG" else 0)


def test_mpo_is_treated_as_jpeg():
    first, second = Image.fromarray(gradient_rgb()), Image.new("RGB", (W, H), (0, 0, 0))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    im = load_image(data)
    assert im.format == "MPO"
    assert canonical_extension(im.format) == "jpg"
    assert np.abs(decode_image(data).astype(int) - gradient_rgb()).max() <= 10


def test_canonical_extension_rejects_others():
    assert canonical_extension("PNG") == "png"
    with pytest.raises(ImageDecodeError, match=r"^unsupported format GIF$"):
        canonical_extension("GIF")


# --------------------------------------------------------------------------- errors


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(ImageDecodeError) as info:
        load_image(data, **kw)
    reason = str(info.value)
    assert "\n" not in reason and len(reason) <= 250
    return reason


def test_error_is_a_value_error():
    assert issubclass(ImageDecodeError, ValueError)
    assert str(ImageDecodeError("two\nlines")) == "two lines"


def test_empty_file():
    assert _reason(b"") == "empty file"
    with pytest.raises(ImageDecodeError, match="^empty file$"):
        decode_image(b"")


@pytest.mark.parametrize(
    "data",
    [
        b"this is a text file renamed to photo.jpg\n" * 20,
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    ],
)
def test_not_an_image(data):
    assert _reason(data) == "not an image (unrecognised data)"


def test_gif_unsupported():
    data = encode(Image.new("P", (W, H)), "GIF")
    assert _reason(data) == "unsupported format GIF"


def test_truncated_jpeg():
    data = encode(Image.fromarray(noise_rgb(size=(128, 96))), "JPEG", quality=90)
    scan = data.index(b"\xff\xda")  # start of scan: entropy-coded data follows
    cut = data[: scan + (len(data) - scan) // 2]
    assert _reason(cut).startswith("truncated or corrupt: image file is truncated")


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_truncated_other_formats(fmt):
    data = encode(Image.fromarray(noise_rgb(size=(64, 48))), fmt)
    assert _reason(data[: len(data) * 2 // 3]).startswith("truncated or corrupt:")


def _idat_span(data: bytes) -> tuple[int, int]:
    start = data.index(b"IDAT") + 4
    return start, start + struct.unpack(">I", data[start - 8 : start - 4])[0]


def test_png_damaged_idat_middle():
    data = bytearray(encode(Image.fromarray(gradient_rgb()), "PNG"))
    start, end = _idat_span(bytes(data))
    mid = (start + end) // 2
    data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
    assert _reason(bytes(data)).startswith("truncated or corrupt:")


def test_png_any_single_bit_flip_in_idat_is_caught():
    # A smooth image deflates to a stream where most flips still inflate "fine"
    # (load() alone misses them); the chunk CRC does not.
    data = encode(Image.fromarray(gradient_rgb()), "PNG")
    start, end = _idat_span(data)
    for pos in range(start, end):
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        assert _reason(bytes(damaged)).startswith("truncated or corrupt:"), pos


def test_png_missing_iend():
    data = encode(Image.fromarray(gradient_rgb()), "PNG")
    assert _reason(data[:-12]).startswith("truncated or corrupt:")


def _spy_on_load(monkeypatch) -> list:
    calls = []
    real = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def test_decompression_bomb_refused_before_decoding(monkeypatch):
    calls = _spy_on_load(monkeypatch)
    t0 = time.perf_counter()
    reason = _reason(png_header_only(2000, 2000), max_pixels=1_000_000)
    assert reason == "decompression bomb: 4000000 pixels > limit 1000000"
    reason = _reason(png_header_only(20_000, 20_000), max_pixels=1_000_000)
    assert reason.startswith("decompression bomb:")
    assert time.perf_counter() - t0 < 1.0
    assert calls == []  # never decoded, so never allocated


def test_decompression_bomb_default_limit_no_warning(monkeypatch):
    # 144 MP: above PIL's warning threshold (~89 MP), below its hard error (~179 MP),
    # above ours (120 MP). PIL's DecompressionBombWarning must not escape.
    calls = _spy_on_load(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = _reason(png_header_only(12_000, 12_000))
    assert reason == f"decompression bomb: 144000000 pixels > limit {DEFAULT_MAX_PIXELS}"
    assert caught == []
    assert calls == []


def test_small_images_pass_small_limits():
    data = encode(Image.fromarray(noise_rgb()), "PNG")
    assert load_image(data, max_pixels=W * H).size == (W, H)
    assert _reason(data, max_pixels=W * H - 1).startswith("decompression bomb:")


def _corrupt_exif_jpeg() -> bytes:
    # One ImageDescription tag claiming 100 bytes at an offset past the block's end,
    # plus an orientation: Pillow warns ("Tag data larger than file") while parsing.
    entries = [
        struct.pack("<HHII", 0x010E, 2, 100, 5000),
        struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0),
    ]
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)) + b"".join(entries)
    exif = b"Exif\x00\x00" + tiff + struct.pack("<I", 0)
    return encode(Image.fromarray(gradient_rgb()), "JPEG", exif=exif)


def test_no_warning_escapes_and_globals_unchanged():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    good = [
        _corrupt_exif_jpeg(),
        encode(_palette_image(), "PNG", transparency=bytes([255, 0, 128])),
        encode(Image.new("PA", (W, H)), "TIFF"),
    ]
    bad = [
        b"",
        b"not an image",
        png_header_only(12_000, 12_000),
        png_header_only(20_000, 20_000),
        encode(Image.fromarray(noise_rgb()), "JPEG")[:300],
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would raise here
        for data in good:
            assert_rgb(decode_image(data), oriented_size(load_image(data))[::-1])
        for data in bad:
            with pytest.raises(ImageDecodeError):
                decode_image(data)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)) == before


def test_corrupt_exif_still_oriented():
    data = _corrupt_exif_jpeg()
    out = decode_image(data)
    assert_rgb(out, (W, H))  # orientation 6 survived the broken neighbouring tag
