"""Image decoding shared by the shard tool (validation) and the trainer (decoding).

The contract: :func:`decode_image` turns the bytes of any file the shard tool
accepts into an ``(H, W, 3)`` uint8 C-contiguous RGB array *as a viewer shows
it*. Every failure is an :class:`ImageDecodeError` whose message is a one-line
reason fit for a skip log.

Choices worth knowing:

* **Alpha is composited over white.** That is what the picture looks like in a
  viewer. Dropping alpha instead would expose whatever colours happen to be
  stored under transparent pixels (often black or garbage), and the network
  would learn to restore them.
* **EXIF orientation is applied** (all 8 values), so pixels match what a person
  sees, and :func:`oriented_size` agrees with the decoded shape.
* **16-bit samples are scaled**, ``round(v * 255 / 65535)``, not clipped: a
  plain ``convert("L")`` of an ``I;16`` image turns everything above 255 white.
  Pillow already reduces 16-bit RGB(A) PNG/TIFF to 8-bit on open (mode
  ``"RGB"``/``"RGBA"``, keeping the high byte, i.e. ``v >> 8``; at most one level
  from rounding); 16-bit greyscale PNG opens as ``"I;16"`` and is scaled here.
* **Damaged PNGs are caught by CRC.** ``load()`` misses many damaged IDAT
  bytes (zlib happily inflates them into wrong pixels and Pillow stops before
  the Adler-32 check), so PNGs are also ``verify()``-ed, which checks every
  chunk's CRC without decompressing. JPEG/WebP have no checksums: a truncated
  file is detected, flipped bytes inside the entropy-coded data are not.
* **CMYK is converted naively** (no ICC colour management): roughly right.

Global state: nothing in PIL is modified. Truncation detection relies on
``ImageFile.LOAD_TRUNCATED_IMAGES`` being left at its default ``False``. PIL's
own hard limit (``2 * Image.MAX_IMAGE_PIXELS``, about 179 MP by default) still
applies on top of ``max_pixels``. PIL's warnings are silenced with
``warnings.catch_warnings``, which swaps the process-wide filters while a call
runs: safe across worker processes, not between threads of one process.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from restorer.base.errors import RestorerError, one_line

DEFAULT_MAX_PIXELS = 120_000_000
# File name extensions taken as images everywhere (shard tool, restore, evaluate), any case.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

_EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",  # cameras write JPEGs with an MPF block; Pillow calls them MPO
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
}
SUPPORTED_FORMATS = frozenset(_EXTENSIONS)

_ORIENTATION_TAG = 0x0112
_MAX_DETAIL = 200


class ImageDecodeError(RestorerError, ValueError):
    """An image that cannot be used. ``str()`` is a short one-line reason (a ValueError too: the
    decoder's callers outside the tools may catch it as one)."""


def _detail(exc: BaseException) -> str:
    """A library exception as a short one-line string."""
    return one_line(exc, _MAX_DETAIL)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence PIL's warnings (corrupt EXIF, palette transparency, bomb warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def canonical_extension(fmt: str) -> str:
    """File extension to store an image of PIL format ``fmt`` under."""
    try:
        return _EXTENSIONS[fmt]
    except KeyError:
        raise ImageDecodeError(f"unsupported format {fmt}") from None


def load_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode ``data``, or raise :class:`ImageDecodeError`.

    The size is checked from the header before any pixel is decoded, so a
    decompression bomb costs almost nothing to refuse.
    """
    if not data:
        raise ImageDecodeError("empty file")
    with _quiet():
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # PIL's own, larger hard limit
            raise ImageDecodeError(f"decompression bomb: {_detail(e)}") from e
        except UnidentifiedImageError as e:
            raise ImageDecodeError("not an image (unrecognised data)") from e
        except MemoryError:
            raise
        except Exception as e:  # a plugin that accepted the header, then choked on it
            raise ImageDecodeError(f"truncated or corrupt: {_detail(e)}") from e

        if im.format not in SUPPORTED_FORMATS:
            raise ImageDecodeError(f"unsupported format {im.format}")
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"invalid size {width}x{height}")
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"decompression bomb: {width * height} pixels > limit {max_pixels}"
            )

        try:
            im.load()
            if im.format == "PNG":
                # load() misses many damaged IDAT bytes; verify() checks the CRCs.
                Image.open(io.BytesIO(data)).verify()
        except MemoryError:
            raise
        except Exception as e:  # OSError mostly, but decoders raise all sorts
            raise ImageDecodeError(f"truncated or corrupt: {_detail(e)}") from e
    return im


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8; 1 when absent or unreadable."""
    try:
        with _quiet():
            value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block: show the image as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as displayed, i.e. after EXIF orientation."""
    width, height = im.size
    return (height, width) if _orientation(im) >= 5 else (width, height)


def _has_alpha(im: Image.Image) -> bool:
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    if im.mode == "P" and im.palette is not None and im.palette.mode.endswith("A"):
        return True
    key = im.info.get("transparency")
    if key is None:
        return False
    # A 16-bit PNG colour key cannot be matched against the 8-bit pixels Pillow
    # keeps (it would mark the wrong pixels transparent): treat as opaque.
    return not (im.mode == "RGB" and isinstance(key, tuple) and max(key) > 255)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA over white, rounding to nearest."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:].astype(np.uint16)
    # At most 255*255 + 127: fits in uint16.
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _int_to_rgb(im: Image.Image) -> np.ndarray:
    """16-bit (and 32-bit "I", read as 0..65535) greyscale, scaled to 0..255."""
    raw = np.asarray(im)
    values = np.clip(raw, 0, 65535).astype(np.uint32)
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # exact round(v*255/65535)
    key = im.info.get("transparency")
    if isinstance(key, int):
        gray[raw == key] = 255  # colour-keyed transparency, over white
    return _gray_to_rgb(gray)


def _float_to_rgb(im: Image.Image) -> np.ndarray:
    """Float greyscale: 0..1 if nothing exceeds 1.0, else 0..255 (clipped)."""
    values = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
    if values.size and float(values.max()) <= 1.0:
        values = values * 255.0
    return _gray_to_rgb(np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8))


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 C-contiguous RGB, oriented and composited as displayed.

    An RGB image without orientation costs one ``np.asarray`` (whose result is
    read-only; copy it if you need to write).
    """
    mode = im.mode
    try:
        if _orientation(im) != 1:
            with _quiet():
                im = ImageOps.exif_transpose(im)
        if mode == "RGB" and not _has_alpha(im):
            arr = np.asarray(im)
        elif mode == "I" or mode.startswith("I;16"):
            arr = _int_to_rgb(im)
        elif mode == "F":
            arr = _float_to_rgb(im)
        elif _has_alpha(im):
            with _quiet():
                arr = _over_white(np.asarray(im.convert("RGBA")))
        else:  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX, ...
            arr = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # unloaded broken file, odd mode
        raise ImageDecodeError(f"cannot convert mode {mode} to RGB: {_detail(e)}") from e
    return np.ascontiguousarray(arr)


def decode_image(data: bytes) -> np.ndarray:
    """Bytes -> ``(H, W, 3)`` uint8 RGB for any input the shard tool accepts."""
    return to_rgb_array(load_image(data))
