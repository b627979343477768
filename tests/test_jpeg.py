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


# ----------------------------------------------------------------------------- the file's own bounds


def _psnr(x: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((x.astype(np.float64) - ref) ** 2)))


def _blurred(pixels: np.ndarray) -> np.ndarray:
    """A restoration that over-smooths, as a network does at high qualities."""
    from PIL import ImageFilter
    return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1.0)))


@pytest.mark.parametrize("quality,chroma", [(10, "420"), (50, "444"), (90, "444"), (90, "420"), (95, "422")])
def test_the_original_and_the_decoded_jpeg_lie_inside_the_files_bounds(photo, quality, chroma):
    data = jpeg.encode(photo, quality, chroma)
    bounds = jpeg.file_bounds(data)
    # a subsampled chroma plane's blocks are of a smaller image: only full-resolution planes are bounded
    assert sorted(bounds.planes) == ([0, 1, 2] if chroma == "444" else [0]) and not bounds.gray
    decoded = jpeg.decode(data)[0]
    for inside in (photo, decoded):  # each is (to the rounding of the encoder's integer arithmetic) its own projection
        moved = np.abs(bounds.project(inside).astype(int) - inside)
        assert moved.max() <= 2 and (moved > 0).mean() < 0.01


@pytest.mark.parametrize("quality,chroma", [(10, "420"), (50, "444"), (90, "444"), (90, "420"), (95, "444")])
def test_a_projected_restoration_is_never_further_from_the_original_and_much_nearer_at_high_quality(photo, quality, chroma):
    data = jpeg.encode(photo, quality, chroma)
    decoded = jpeg.decode(data)[0]
    rng = np.random.default_rng(quality)
    noisy = np.clip(decoded + rng.normal(0, 3, decoded.shape), 0, 255).astype(np.uint8)
    bounds = jpeg.file_bounds(data)
    for restored in (_blurred(decoded), noisy):
        before, after = _psnr(restored, photo), _psnr(bounds.project(restored), photo)
        assert after >= before
        if quality >= 90 and chroma == "444" and restored is not noisy:  # narrow bins, every plane bounded:
            assert after > before + 2.0  # much of the smoothed-away detail comes back


def test_a_float_restoration_is_projected_before_it_is_rounded(photo):
    data = jpeg.encode(photo, 90, "444")
    bounds = jpeg.file_bounds(data)
    restored = _blurred(jpeg.decode(data)[0]).astype(np.float32) + 0.4  # between two grey levels
    kept = restored.copy()
    assert bounds.project(restored).dtype == np.uint8
    np.testing.assert_array_equal(restored, kept)  # the caller's array is left as it was


def test_bands_of_rows_on_the_grid_project_as_the_whole_image_does(photo):
    """restore projects each band of tiles as it finishes: bands that start on the 8x8 grid give the
    whole image's projection exactly; a band off the grid is refused."""
    data = jpeg.encode(photo, 90, "444")
    bounds = jpeg.file_bounds(data)
    restored = _blurred(jpeg.decode(data)[0]).astype(np.float32) + 0.3
    whole = bounds.project(restored)
    edges = [0, 40, 136, photo.shape[0]]  # multiples of 8, then the image's last row
    banded = np.concatenate([bounds.project_rows(restored[a:b], a) for a, b in zip(edges, edges[1:])])
    np.testing.assert_array_equal(banded, whole)
    with pytest.raises(ValueError, match="not on the grid"):
        bounds.project_rows(restored[4:40], 4)


def test_a_grayscale_jpeg_has_one_bounded_plane(photo):
    gray = photo[..., 0]
    data = jpeg.encode(gray, 90)
    bounds = jpeg.file_bounds(data)
    assert bounds.gray and sorted(bounds.planes) == [0]
    blurred = _blurred(gray)
    assert _psnr(bounds.project(blurred), gray) > _psnr(blurred, gray) + 2.0


def test_partial_edge_blocks_are_left_as_they_are():
    from helpers import photo_like
    image = photo_like(100, 70, seed=5)  # 12 x 8 whole blocks; 4 columns and 6 rows in partial ones
    data = jpeg.encode(image, 90, "444")
    blurred = _blurred(jpeg.decode(data)[0])
    projected = jpeg.file_bounds(data).project(blurred)
    np.testing.assert_array_equal(projected[64:], blurred[64:])
    np.testing.assert_array_equal(projected[:, 96:], blurred[:, 96:])
    assert not np.array_equal(projected[:64, :96], blurred[:64, :96])


def test_files_without_usable_bounds_have_none_and_a_wrong_size_is_one_line(photo):
    assert jpeg.file_bounds(encode(photo, "PNG")) is None
    assert jpeg.file_bounds(b"not an image") is None
    assert jpeg.file_bounds(encode(photo, "JPEG", quality=90)[:200]) is None  # truncated before the image data
    cmyk = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    assert jpeg.file_bounds(cmyk.getvalue()) is None
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the pixels restore sees are not on the file's block grid
    rotated = io.BytesIO()
    Image.fromarray(photo).save(rotated, format="JPEG", quality=90, exif=exif.tobytes())
    assert jpeg.file_bounds(rotated.getvalue()) is None
    bounds = jpeg.file_bounds(jpeg.encode(photo, 90, "444"))
    with pytest.raises(ValueError, match="not the size of the file"):
        bounds.project(photo[:128])


def test_blocks_with_a_clipped_pixel_are_left_as_they_are():
    """A block with a pixel at 0 or 255 had its coefficients moved by the clipping, out of their bins:
    the projection leaves it alone (and would change it, were it bounded)."""
    from PIL import ImageFilter
    image = photo_like(128, 96, seed=7, channels=1)[..., 0].astype(np.int16)
    image[8:40, 16:56] += 140  # a highlight burnt out to 255
    image[56:88, 72:120] -= 140  # a shadow crushed to 0
    image = np.clip(image, 0, 255).astype(np.uint8)
    data = jpeg.encode(image, 90)
    decoded = jpeg.decode(data)[0]
    decoded = decoded[..., 0] if decoded.ndim == 3 else decoded
    restored = np.asarray(Image.fromarray(decoded).filter(ImageFilter.GaussianBlur(1.5)))
    bounds = jpeg.file_bounds(data)
    k, step, usable = bounds.planes[0]
    saturated = ((decoded == 0) | (decoded == 255)).reshape(12, 8, 16, 8).any(axis=(1, 3))
    np.testing.assert_array_equal(usable, ~saturated)
    assert 10 < saturated.sum() < saturated.size - 10
    pixels = np.repeat(np.repeat(saturated, 8, axis=0), 8, axis=1)
    projected = bounds.project(restored)
    np.testing.assert_array_equal(projected[pixels], restored[pixels])
    assert (projected[~pixels] != restored[~pixels]).mean() > 0.05  # the other blocks are projected
    every_block = jpeg.FileBounds({0: (k, step, np.ones_like(usable))}, gray=True)
    assert (every_block.project(restored)[pixels] != restored[pixels]).mean() > 0.05  # what the rule prevents


def test_an_rgb_coded_jpeg_has_no_bounds(photo):
    """An Adobe file whose components are R, G, B (transform 0), not Y, Cb, Cr: its bins are not of the
    planes project works in, so it has none (its quality tables still read)."""
    rgb_coded = io.BytesIO()
    Image.fromarray(photo).save(rgb_coded, format="JPEG", quality=90, subsampling=0, keep_rgb=True)
    with Image.open(io.BytesIO(rgb_coded.getvalue())) as im:
        assert im.info.get("adobe_transform") == 0 and im.mode == "RGB"
    assert jpeg.file_quality(rgb_coded.getvalue()) == 90
    assert jpeg.file_bounds(rgb_coded.getvalue()) is None
    assert jpeg.file_bounds(jpeg.encode(photo, 90, "444")) is not None  # the same photo, YCbCr-coded, has them
