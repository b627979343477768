"""The JPEG degradation, in one place: how training, validation, evaluate and restore compress images,
and how they read a JPEG's quality back from its file.

* :class:`JpegSpec` is the degradation's record (the config's `data.jpeg` section, and the training
  facts on a network's card): the distribution of qualities, the chroma subsampling, the share of
  double JPEGs. :func:`degrade` draws one training pair from it; :func:`compress` is the deterministic
  form validation and evaluate use.
* Every JPEG carries its quantization tables in its header. :func:`table_quality` maps them to the
  equivalent IJG (libjpeg) quality, 1-100: exactly for the standard tables Pillow, libjpeg-turbo,
  OpenCV and most software write, and to the nearest one for others (cameras, Photoshop, mozjpeg),
  weighted towards the low frequencies, which carry most of a photo's energy. The networks are
  conditioned on that number; the training worker reads it back from the bytes it just encoded,
  exactly as restore reads it from a user's file.
* An image without tables (a PNG saved from a JPEG, a video frame) gets :func:`pixel_quality`: the
  "JPEG ghost" (Farid 2009): re-compressing an image at the quality it was once compressed at changes
  it far less than at any nearby quality, so the error against the re-compressed copy dips there.

Pillow's encoder is libjpeg-turbo with the standard tables (the seed's PIL save), 4:2:0 for colour
unless `chroma` says otherwise.
"""

from __future__ import annotations

import functools
import io
import zlib
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from restorer.base.colour import RGB_TO_YCC, YCC_OFFSET, YCC_TO_RGB, luma
from restorer.base.choices import Literal, check_choices
from restorer.base.ijg import CHROMA_BASE, LUMA_BASE, ijg_table  # noqa: F401 (the data's names for them too)

import numpy as np
from PIL import Image

CHROMA = {"444": 0, "422": 1, "420": 2}  # Pillow's `subsampling` values
DOUBLE_SHIFT = 8  # a double JPEG's second block grid is shifted by 0..7 px: the pair needs 8 spare pixels

# How much each frequency counts when tables are compared: natural images put most of their energy
# (and a JPEG most of its error) in the low frequencies, so a camera's table that caps its high
# frequencies at 12 is still judged by its first rows.
_U, _V = np.divmod(np.arange(64), 8)
_WEIGHTS = 1.0 / (1.0 + _U + _V) ** 2
_WEIGHTS /= _WEIGHTS.sum()
ABSURD_DISTANCE = 0.45  # weighted mean |log ratio| to the nearest IJG table: beyond it, tables say nothing
GHOST_DIP = 0.75  # pixel_quality: the error at the found quality, relative to the rise on each side, dips below this
GHOST_SIDE = 384  # pixel_quality measures a centre crop this big (constant time on any image)


# ----------------------------------------------------------------------------- the record


@dataclass
class JpegSpec:
    """The JPEG degradation of training pairs. Defaults are the seed's (one JPEG at quality 10, 4:2:0).

    `quality` lists knots q0 <= q1 <= ... : a quality is drawn uniformly from one interval [q_i, q_i+1],
    chosen with probability `quality_weights[i]` (default: proportional to the interval's width, i.e.
    uniform over [q0, qn]). [10, 10] is the seed's q10; [10, 60, 95] with weights [0.75, 0.25] is FBCNN's
    blind recipe (most of the mass on 10-60, the rest up to 95).
    """

    quality: tuple[int, ...] = (10, 10)
    quality_weights: tuple[float, ...] = ()
    chroma: Literal["444", "422", "420", "random"] = "420"  # 420: Pillow's, the seed's; random: one of the three a pair
    double_p: float = 0.0  # share of double JPEGs: a first JPEG at double_quality, a 0-7 px shift, the last
    double_quality: tuple[int, int] = (10, 95)  # the first JPEG's quality, drawn uniformly from [low, high]
    gray_p: float = 0.0  # share of gray pairs: the patch's luma JPEG'd as a grayscale file, three equal planes

    def validate(self) -> None:
        """Raise ValueError naming the field that is wrong ("field: must be ..., got ...")."""
        check_choices(self)
        q = list(self.quality)
        if len(q) < 2 or any(not 1 <= v <= 100 for v in q) or q != sorted(q):
            raise ValueError(f"quality: must be 2 or more qualities in 1..100, ascending ([10, 10], [10, 60, 95]), got {q}")
        w = list(self.quality_weights)
        if w and (len(w) != len(q) - 1 or any(v < 0 for v in w) or not sum(w) > 0):
            raise ValueError(f"quality_weights: must be one weight >= 0 per interval of quality ({len(q) - 1}), "
                             f"not all 0, got {w} (set it with quality; [] is uniform)")
        if not 0.0 <= self.double_p <= 1.0:
            raise ValueError(f"double_p: must be in [0, 1], got {self.double_p}")
        if not 0.0 <= self.gray_p <= 1.0:
            raise ValueError(f"gray_p: must be in [0, 1], got {self.gray_p}")
        lo, hi = self.double_quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"double_quality: must be [low, high] with 1 <= low <= high <= 100, got {[lo, hi]}")

    @property
    def qualities(self) -> tuple[int, int]:
        """The range of last-JPEG qualities training draws from: what a network trained on it knows."""
        return int(min(self.quality)), int(max(self.quality))

    def draw_quality(self, rng: np.random.Generator) -> int:
        knots = self.quality
        if len(knots) == 2:  # one interval: no draw for a fixed quality (the seed's random numbers)
            return _draw((knots[0], knots[1]), rng)
        widths = [b - a for a, b in zip(knots, knots[1:])]
        weights = np.asarray(self.quality_weights or [max(w, 1e-9) for w in widths], np.float64)
        i = int(np.searchsorted(np.cumsum(weights / weights.sum()), rng.random(), side="right"))
        i = min(i, len(widths) - 1)
        return _draw((knots[i], knots[i + 1]), rng)

    def draw_double(self, rng: np.random.Generator, room: bool) -> bool:
        """Whether the next pair is a double JPEG (it needs DOUBLE_SHIFT spare pixels: `room`)."""
        return bool(self.double_p) and rng.random() < self.double_p and room

    def draw_chroma(self, rng: np.random.Generator) -> str:
        return self.chroma if self.chroma != "random" else ("444", "422", "420")[int(rng.integers(3))]

    def card(self) -> dict:
        """What a network's card says of its training's JPEGs."""
        return {"qualities": list(self.qualities), "quality_knots": list(self.quality),
                "quality_weights": list(self.quality_weights), "chroma": self.chroma,
                "double_p": self.double_p, "double_quality": list(self.double_quality), "gray_p": self.gray_p}


def _draw(bounds: tuple[int, int], rng: np.random.Generator) -> int:
    lo, hi = bounds
    return int(lo) if lo == hi else int(rng.integers(lo, hi + 1))


# ----------------------------------------------------------------------------- encode, decode


def encode(pixels: np.ndarray, quality: int, chroma: str = "420") -> bytes:
    """(H, W, C) uint8 -> JPEG bytes at `quality` (Pillow: libjpeg-turbo, the standard tables);
    `chroma` sets the subsampling of a colour image (a one-channel image has no chroma)."""
    buf = io.BytesIO()
    if pixels.ndim == 2 or pixels.shape[-1] == 1:
        Image.fromarray(pixels.reshape(pixels.shape[:2])).save(buf, format="JPEG", quality=int(quality))
    else:
        Image.fromarray(pixels).save(buf, format="JPEG", quality=int(quality), subsampling=CHROMA[chroma])
    return buf.getvalue()


def decode(data: bytes) -> tuple[np.ndarray, Optional[int]]:
    """JPEG bytes -> ((H, W, C) uint8 pixels, C = 1 for a grayscale JPEG; the quality its tables say)."""
    with Image.open(io.BytesIO(data)) as im:
        quality = table_quality(getattr(im, "quantization", None))
        out = np.asarray(im)
    return (out[..., None] if out.ndim == 2 else out), quality


def compress(target: np.ndarray, quality: int, chroma: str = "420", first: Optional[int] = None,
             shift: tuple[int, int] = (0, 0), size: Optional[int] = None) -> tuple[bytes, np.ndarray]:
    """The deterministic degradation (validation, evaluate): (JPEG bytes, the target they restore to).

    With `first`, a double JPEG: `target` JPEG'd at quality `first`, its block grid shifted by `shift`
    (dy, dx in 0..7: the first dy rows and dx columns cut off; then `size` px square, or the rest of
    the image), then JPEG'd at `quality`; the target is cut the same way. A one-channel target is
    encoded as a grayscale JPEG."""
    if first is None:
        return encode(target, quality, chroma), target
    dy, dx = shift
    h, w = target.shape[:2]
    sh, sw = (size, size) if size else (h - dy, w - dx)
    once = decode(encode(target, first, chroma))[0]
    cut = np.ascontiguousarray(once[dy:dy + sh, dx:dx + sw])
    return encode(cut, quality, chroma), np.ascontiguousarray(target[dy:dy + sh, dx:dx + sw])


def degrade(patch: np.ndarray, spec: JpegSpec, rng: np.random.Generator, double: bool) -> tuple[bytes, np.ndarray]:
    """One training pair from a clean (P, P, C) patch, or (P+8, P+8, C) for a double JPEG (`double`,
    from JpegSpec.draw_double): (the input as JPEG bytes, the (P, P, C) target). FBCNN's double JPEG
    (Jiang et al. 2021): JPEG at q1, the block grid shifted by (dy, dx) in 0..7, then the last JPEG.
    A gray pair (spec.gray_p of a colour network's): the patch's luma as a grayscale JPEG, the target
    its luma in every plane, as a gray file reaches a colour network (its one plane in each)."""
    if spec.gray_p and patch.shape[-1] == 3 and rng.random() < spec.gray_p:
        data, target = _degrade(luma(patch)[..., None], spec, rng, double)
        return data, np.repeat(target, 3, axis=-1)
    return _degrade(patch, spec, rng, double)


def _degrade(patch: np.ndarray, spec: JpegSpec, rng: np.random.Generator, double: bool) -> tuple[bytes, np.ndarray]:
    chroma = spec.draw_chroma(rng)
    if not double:
        return encode(patch, spec.draw_quality(rng), chroma), patch
    first = _draw(spec.double_quality, rng)
    dy, dx = (int(v) for v in rng.integers(0, DOUBLE_SHIFT, 2))
    return compress(patch, spec.draw_quality(rng), chroma, first=first, shift=(dy, dx),
                    size=patch.shape[0] - DOUBLE_SHIFT)


def val_chroma(spec: JpegSpec, key: str) -> str:
    """Validation's chroma for an image: the spec's, or with `random` one fixed by the image's key."""
    return spec.chroma if spec.chroma != "random" else ("444", "422", "420")[zlib.crc32(key.encode()) % 3]


# ----------------------------------------------------------------------------- the quality of a file


@functools.lru_cache(maxsize=1)
def _log_tables() -> np.ndarray:
    """log of the IJG luma tables of qualities 1..100: (100, 64)."""
    return np.log(np.stack([ijg_table(q) for q in range(1, 101)]))


@functools.lru_cache(maxsize=4096)
def _table_quality(luma: tuple) -> Optional[int]:
    t = np.asarray(luma, np.float64)
    if t.shape != (64,) or not (t > 0).all():
        return None  # a zero step is not a JPEG table
    dist = np.abs(_log_tables() - np.log(t)) @ _WEIGHTS
    best = int(np.argmin(dist))
    if dist[best] > ABSURD_DISTANCE:
        return None
    # several qualities can share one table (q 98..100 are nearly all ones): the middle of the tie
    ties = np.flatnonzero(dist <= dist[best] + 1e-12)
    return int(ties[len(ties) // 2]) + 1


def table_quality(tables: Optional[Mapping[int, Sequence[int]]]) -> Optional[int]:
    """The IJG quality (1-100) whose standard luma table is nearest to a JPEG's (Pillow's
    `Image.quantization`: table 0 is the luma's, and a grayscale JPEG has only that one). None when
    there are no tables, or they are unusable (a zero step, not 64 entries) or absurd (no IJG
    quality near them: real tables, Photoshop's and mozjpeg's included, stay within 0.35 of one)."""
    if not tables or 0 not in tables:
        return None
    try:
        luma = tuple(int(v) for v in tables[0])
    except (TypeError, ValueError):
        return None
    return _table_quality(luma)


def pixel_quality(pixels: np.ndarray) -> Optional[int]:
    """The quality an image was once JPEG-compressed at, seen in its pixels (the JPEG ghost), or None
    when no JPEG trace is seen (never compressed, or resized or cropped off the 8x8 grid since).

    A centre crop (aligned to the 16 px grid of 4:2:0, so the block grid stays in place) is
    re-compressed at every quality and each chroma subsampling; the quality whose error dips
    furthest below the highest error within 5 qualities on each side is the answer. Re-compressing
    a clean image gives an error that only falls as the quality rises: no dip."""
    h, w = pixels.shape[:2]
    side = GHOST_SIDE
    top, left = max(0, (h - side) // 2) // 16 * 16, max(0, (w - side) // 2) // 16 * 16
    crop = np.ascontiguousarray(pixels[top:top + side, left:left + side])
    if min(crop.shape[:2]) < 16:
        return None
    gray = crop.ndim == 2 or crop.shape[-1] == 1
    clean = crop.astype(np.float32)
    best: tuple[float, Optional[int]] = (GHOST_DIP, None)
    for chroma in ("420",) if gray else ("420", "444", "422"):
        err = np.empty(101)
        for q in range(1, 101):
            again = decode(encode(crop, q, chroma))[0].astype(np.float32).reshape(clean.shape)
            err[q] = float(np.square(again - clean).mean())
        for q in range(2, 100):  # a dip: the error rises on both sides (towards 100 it only falls)
            rise = min(err[max(1, q - 5):q].max(), err[q + 1:min(100, q + 5) + 1].max())
            dip = err[q] / max(float(rise), 1e-12)
            if dip < best[0]:
                best = (dip, q)
    return best[1]


def file_quality(data: bytes) -> Optional[int]:
    """The quality a file's header says: its tables' IJG quality; None for a file without usable tables."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return table_quality(getattr(im, "quantization", None)) if im.format in ("JPEG", "MPO") else None
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


# ----------------------------------------------------------------------------- the file's own bounds

# JPEG's 8x8 DCT-II is orthonormal: a distance between coefficients is the same distance between pixels.
_DCT = np.array([[np.sqrt((1 if u == 0 else 2) / 8) * np.cos((2 * x + 1) * u * np.pi / 16) for x in range(8)]
                 for u in range(8)], np.float32)
# How far past its bin a true coefficient can lie, in coefficient (= pixel) units: the encoder's
# integer colour conversion and DCT, and the decoder's rounded pixels, each move it by a fraction of one.
BOUND_MARGIN = 1.0
_EXIF_ORIENTATION = 0x0112


def _blocks(plane: np.ndarray) -> np.ndarray:
    """(H, W) -> (H//8, W//8, 8, 8): the whole 8x8 blocks of the JPEG grid (a partial edge block was
    padded by the encoder with pixels the file does not keep, so it is left out)."""
    nby, nbx = plane.shape[0] // 8, plane.shape[1] // 8
    return plane[:nby * 8, :nbx * 8].reshape(nby, 8, nbx, 8).transpose(0, 2, 1, 3)


@dataclass
class FileBounds:
    """What a JPEG file says of the image it was made from: every whole 8x8 block's DCT coefficient
    lay in its quantization bin, [(k - 1/2) Q, (k + 1/2) Q], k the stored value and Q the table's step.

    :meth:`project` moves a restored image to the nearest image inside those bins (the quantization
    constraint set of the JPEG restoration literature). The original image lies inside them, and the
    projection onto a convex set that holds a point never moves anything further from that point: a
    restoration projected is never further from the original than before, and at high qualities, where
    the bins are narrow, it undoes a network's over-smoothing. A double JPEG's last bins hold the image
    its last encoder saw, not the original: that is why restore skips them when told another quality.

    Planes: the luma, and each chroma plane stored at full resolution (4:4:4); a subsampled chroma
    plane's blocks are of a smaller image and are left alone. Blocks with a pixel at 0 or 255 are left
    alone too: the clipping may have moved their coefficients out of their bins."""

    planes: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]  # plane -> (k: (nby, nbx, 8, 8) int16, Q: (8, 8), usable: (nby, nbx))
    gray: bool

    def project(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) RGB (or (H, W) for a grayscale file) in 0..255, float or uint8, of the file's size
        -> the nearest image (in the file's YCbCr) inside the file's bins, rounded to uint8."""
        nby, nbx = self.blocks
        if image.ndim != (2 if self.gray else 3) or (image.shape[0] // 8, image.shape[1] // 8) != (nby, nbx):
            raise ValueError(f"an image of {image.shape[1]}x{image.shape[0]} is not the size of the file whose "
                             "bounds these are")
        return self.project_rows(image, 0)

    def project_rows(self, rows: np.ndarray, top: int) -> np.ndarray:
        """:meth:`project` for the file's rows top, top + 1, ... (`top` a multiple of 8): blocks do not
        straddle such bands, so restore projects each band of tiles as it finishes (memory stays bounded)."""
        nby, nbx = self.blocks
        if top % 8 or rows.shape[1] // 8 != nbx or (top + rows.shape[0]) // 8 > nby:
            raise ValueError(f"rows {top}-{top + rows.shape[0]} of width {rows.shape[1]} are not on the grid of the "
                             "file whose bounds these are")
        x = np.array(rows, np.float32)  # a copy: the caller's array stays as it was
        ycc = x[..., None] if self.gray else x @ RGB_TO_YCC.T + YCC_OFFSET
        b0, b1 = top // 8, (top + x.shape[0]) // 8  # the block rows whole in this band
        for i, (k, step, usable) in self.planes.items():
            coef = _DCT @ (_blocks(ycc[..., i]) - 128.0) @ _DCT.T
            lo, hi = (k[b0:b1] - 0.5) * step - BOUND_MARGIN, (k[b0:b1] + 0.5) * step + BOUND_MARGIN
            delta = np.clip(coef, lo, hi) - coef
            delta[~usable[b0:b1]] = 0.0
            ycc[:(b1 - b0) * 8, :nbx * 8, i] += (_DCT.T @ delta @ _DCT).transpose(0, 2, 1, 3).reshape((b1 - b0) * 8, nbx * 8)
        out = ycc[..., 0] if self.gray else (ycc - YCC_OFFSET) @ YCC_TO_RGB.T
        return np.clip(np.round(out), 0, 255).astype(np.uint8)

    @property
    def blocks(self) -> tuple[int, int]:
        """(block rows, block columns): the file's whole 8x8 blocks."""
        return next(iter(self.planes.values()))[0].shape[:2]


def file_bounds(data: bytes) -> Optional[FileBounds]:
    """The bins a JPEG file's blocks lay in (:class:`FileBounds`), from its tables and its decoded
    planes; None for anything else: not a JPEG, no usable tables, CMYK or RGB-coded (Adobe) colour,
    or an EXIF rotation (the pixels restore sees are not on the file's grid)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("JPEG", "MPO") or im.mode not in ("L", "RGB") or table_quality(im.quantization) is None:
                return None
            # (libjpeg-turbo also refuses to draft an RGB-coded file as YCbCr, below: said here, not left to it)
            if im.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None) or im.info.get("adobe_transform") == 0:
                return None
            tables, layers = dict(im.quantization), list(im.layer)
            if im.mode == "RGB":
                im.draft("YCbCr", None)  # the decoder's own planes, before its colour conversion
            planes = np.asarray(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    planes = planes[..., None] if planes.ndim == 2 else planes
    if len(layers) != planes.shape[-1]:
        return None
    full = (max(h for _, h, _, _ in layers), max(v for _, _, v, _ in layers))
    bounds = {}
    for i, (_, h, v, table) in enumerate(layers):
        if (h, v) != full or table not in tables or len(tables[table]) != 64:
            continue
        step = np.asarray(tables[table], np.float32).reshape(8, 8)
        pixels = _blocks(planes[..., i])
        coef = _DCT @ (pixels.astype(np.float32) - 128.0) @ _DCT.T
        k = np.round(coef / step).astype(np.int16)
        usable = ~((pixels == 0) | (pixels == 255)).any(axis=(2, 3))
        bounds[i] = (k, step, usable)
    return FileBounds(bounds, gray=planes.shape[-1] == 1) if bounds else None


__all__ = ["CHROMA", "DOUBLE_SHIFT", "JpegSpec", "compress", "decode", "degrade",
           "encode", "file_bounds", "file_quality", "FileBounds", "ijg_table", "pixel_quality", "table_quality", "val_chroma"]
