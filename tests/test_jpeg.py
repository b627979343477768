"""restorer.data.jpeg: a JPEG's quality read from its quantization tables (standard, non-standard,
absurd, none) and, without tables, from its pixels. Real JPEG bytes from Pillow's libjpeg-turbo."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, JpegPresets

from helpers import encode, photo_like
from restorer.data import jpeg

# mozjpeg's default luma table (its quant-table 3, N. Robidoux's, as ImageMagick's), at scale 100
MOZJPEG_LUMA = np.array([16, 16, 16, 18, 25, 37, 56, 85, 16, 17, 20, 27, 34, 40, 53, 75, 16, 20, 24, 31, 43, 62, 91, 135,
                         18, 27, 31, 40, 53, 74, 106, 156, 25, 34, 43, 53, 69, 94, 131, 189, 37, 40, 62, 74, 94, 124, 169,
                         238, 56, 53, 91, 106, 131, 169, 226, 311, 85, 75, 135, 156, 189, 238, 311, 418], np.float64)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return photo_like(256, 192, seed=11)


def _tables(data: bytes) -> dict:
    return Image.open(io.BytesIO(data)).quantization


def test_every_standard_quality_reads_back_exactly(photo):
    for q in range(1, 101):
        data = encode(photo, "JPEG", quality=q)
        assert jpeg.file_quality(data) == q
        # the IJG scaling, ours, writes Pillow's tables to the entry, luma and chroma
        assert list(_tables(data)[0]) == jpeg.ijg_table(q).astype(int).tolist()
        assert list(_tables(data)[1]) == jpeg.ijg_table(q, jpeg.CHROMA_BASE).astype(int).tolist()


def test_a_grayscale_jpeg_has_one_table_and_reads_the_same(photo):
    data = encode(photo[..., :1], "JPEG", quality=37)
    assert list(_tables(data)) == [0]
    assert jpeg.file_quality(data) == 37
    pixels, quality = jpeg.decode(data)
    assert pixels.shape == (192, 256, 1) and quality == 37


def test_non_standard_tables_map_to_the_nearest_quality(photo):
    # Photoshop-like presets (Pillow's): their first rows decide, not the capped high frequencies
    read = {name: jpeg.file_quality(encode(photo, "JPEG", quality=name)) for name in JpegPresets.presets}
    assert all(q is not None for q in read.values()), read
    assert read["web_low"] < read["web_medium"] < read["web_high"] < read["web_very_high"] < read["web_maximum"]
    assert read["low"] < read["medium"] < read["high"] < read["maximum"]
    assert 35 <= read["low"] <= 55 and 35 <= read["web_low"] <= 50, read
    # mozjpeg's tables at its quality q land near q; the exact IJG neighbours do not change the order
    moz = [jpeg.table_quality({0: jpeg.ijg_table(q, MOZJPEG_LUMA)}) for q in (10, 30, 50, 75, 90)]
    assert moz == sorted(moz) and all(abs(m - q) <= 10 for m, q in zip(moz, (10, 30, 50, 75, 90))), moz
    # a camera's file written with custom tables through Pillow's qtables
    camera = np.clip(jpeg.ijg_table(85) * np.linspace(0.8, 1.3, 64), 1, 255).astype(int).tolist()
    data = encode(photo, "JPEG", qtables=[camera, camera])
    assert 80 <= jpeg.file_quality(data) <= 90


def test_no_tables_or_absurd_ones_read_as_none(photo):
    assert jpeg.table_quality(None) is None and jpeg.table_quality({}) is None
    assert jpeg.table_quality({0: [0] * 64}) is None  # a zero step is no JPEG table
    assert jpeg.table_quality({0: [16] * 63}) is None
    spread = np.full(64, 255)
    spread[:8] = 1  # fine at the top row, the coarsest possible everywhere else: no IJG quality looks like it
    assert jpeg.table_quality({0: spread.tolist()}) is None
    assert jpeg.table_quality({0: jpeg.ijg_table(50)[::-1].tolist()}) is None  # a table upside down
    assert jpeg.file_quality(encode(photo, "PNG")) is None
    assert jpeg.file_quality(b"not an image") is None


@pytest.mark.parametrize("quality, chroma", [(10, "420"), (25, "444"), (50, "422"), (75, "420"), (90, "444")])
def test_pixels_of_a_once_jpeg_image_show_its_quality(quality, chroma):
    image = photo_like(320, 256, seed=quality)
    pixels = jpeg.decode(jpeg.encode(image, quality, chroma))[0]
    assert jpeg.pixel_quality(pixels) == quality
    gray = jpeg.decode(jpeg.encode(image[..., :1], quality))[0]
    assert jpeg.pixel_quality(gray) == quality


def test_pixels_with_no_jpeg_trace_read_as_none():
    image = photo_like(320, 256, seed=5)
    assert jpeg.pixel_quality(image) is None  # never compressed
    shifted = jpeg.decode(jpeg.encode(image, 30))[0][3:, 5:]  # cropped off the block grid since
    assert jpeg.pixel_quality(np.ascontiguousarray(shifted)) is None
    assert jpeg.pixel_quality(image[:8, :8]) is None  # too small to tell


def test_the_spec_checks_its_fields_in_one_style():
    for bad, message in [(dict(quality=(10,)), "quality: must be 2 or more"),
                         (dict(quality=(10, 101)), "quality: must be 2 or more"),
                         (dict(quality=(10, 60, 95), quality_weights=(0.0, 0.0)), "quality_weights: must be"),
                         (dict(chroma="411"), "chroma: must be one of"),
                         (dict(double_p=1.5), "double_p: must be in"),
                         (dict(double_quality=(50, 10)), "double_quality: must be")]:
        with pytest.raises(ValueError, match=message):
            jpeg.JpegSpec(**bad).validate()
    jpeg.JpegSpec(quality=(10, 60, 95), quality_weights=(0.75, 0.25), chroma="random", double_p=0.25).validate()
