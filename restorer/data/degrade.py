"""Training pairs from a decoded photo: a random patch (the target) and its JPEG-compressed copy (the input).

The seed project resizes and rotates the WHOLE image, then crops one patch. The distribution here is
the same, at a fraction of the cost: pick where the patch lies in the (virtually) rescaled and
rotated image, crop only the source region behind it, resize only that region, and rotate the
patch with a lossless transpose. A 90-degree rotation with `expand` maps a uniform crop position to
a uniform crop position, so rotating the patch instead of the image changes nothing.

Beyond the seed, degradations of photos as they are found (off by default): the chroma subsampling
of the JPEG (4:4:4, 4:2:2, 4:2:0, or a random one of them), and double compression with a shifted
block grid (FBCNN's recipe, Jiang et al. 2021: JPEG at q1, shift by 0-7 pixels, JPEG at q2): a photo
cropped or re-saved by an app after a first compression.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class PatchSpec:
    """The degradation distribution. Defaults are the seed project's."""

    size: int = 128  # patch side, pixels
    rescale_p: float = 0.5  # probability of rescaling ...
    scales: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6)  # ... by one of these (bicubic)
    rotate_p: float = 0.5  # probability of rotating ...
    rotations: tuple[int, ...] = (90, 180, 270)  # ... by one of these (counter-clockwise, degrees)
    flip_p: float = 0.0  # probability of a horizontal flip (with the rotations: the 8 dihedral modes)
    permute_channels_p: float = 0.0  # probability of permuting the clean patch's R, G, B: more colours
    #                                  from the same photos (the JPEG is encoded after, so it stays real)
    quality: tuple[int, int] = (10, 10)  # JPEG quality drawn uniformly from [low, high]; (10, 60) trains blind
    grayscale: bool = False  # train on luma only: (H, W, 1) pairs
    chroma: str = "420"  # JPEG chroma subsampling: 444 | 422 | 420 (Pillow's default, the seed's) | random
    double_p: float = 0.0  # probability of a first JPEG (at double_quality) before a 0-7 px shift and the last
    double_quality: tuple[int, int] = (10, 95)  # the first JPEG's quality, drawn uniformly from [low, high]

    def validate(self) -> None:
        """Raise ValueError naming the field that is wrong."""
        if self.size < 8 or self.size % 8:
            raise ValueError(f"size must be a multiple of 8 (the JPEG block), >= 8; got {self.size}")
        for name in ("rescale_p", "rotate_p", "flip_p", "permute_channels_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        if not self.scales or not all(0.1 <= s <= 4.0 for s in self.scales):
            raise ValueError(f"scales must be a non-empty list of factors in [0.1, 4]; got {list(self.scales)}")
        if not self.rotations or not all(r in (90, 180, 270) for r in self.rotations):
            raise ValueError(f"rotations must be a non-empty list of 90, 180, 270; got {list(self.rotations)}")
        for name in ("quality", "double_quality"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi <= 100:
                raise ValueError(f"{name} must be [low, high] with 1 <= low <= high <= 100; got {[lo, hi]}")
        if self.chroma not in CHROMA and self.chroma != "random":
            raise ValueError(f"chroma must be one of {', '.join(CHROMA)}, random; got {self.chroma!r}")
        if not 0.0 <= self.double_p <= 1.0:
            raise ValueError(f"double_p must be in [0, 1]; got {self.double_p}")

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3


CHROMA = {"444": 0, "422": 1, "420": 2}  # Pillow's `subsampling` values


def jpeg_encode(patch: np.ndarray, quality: int, chroma: str = "420") -> bytes:
    """Pillow's encoder (libjpeg-turbo, the standard tables): the seed's PIL save, which is 4:2:0
    for colour; `chroma` sets the subsampling (ignored for one channel)."""
    buf = io.BytesIO()
    if patch.shape[-1] == 1:
        Image.fromarray(patch.squeeze(-1)).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(patch).save(buf, format="JPEG", quality=quality, subsampling=CHROMA[chroma])
    return buf.getvalue()


def jpeg_decode(data: bytes) -> np.ndarray:
    """(H, W, C) uint8, C = 1 for a grayscale JPEG."""
    out = np.asarray(Image.open(io.BytesIO(data)))
    return out[..., None] if out.ndim == 2 else out


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as Pillow's convert("L"): (H, W, 1)."""
    return np.asarray(Image.fromarray(rgb).convert("L"))[..., None]


def random_patch(image: np.ndarray, spec: PatchSpec, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """One training pair from a decoded (H, W, 3) uint8 image: the input as JPEG bytes (a fiftieth
    of the pixels' memory in a shuffle buffer; `jpeg_decode` when batching) and the target, a
    C-contiguous (P, P, C) uint8 array.

    An image too small for the drawn scale uses the largest source square it has, resized to the
    patch (so a small image is upscaled rather than refused).
    """
    h, w = image.shape[:2]
    # a double JPEG's shift needs 8 more pixels (an image with fewer to spare gets the single JPEG)
    double = spec.double_p and rng.random() < spec.double_p and min(h, w) >= spec.size + 8
    p = spec.size + 8 if double else spec.size
    scale = float(rng.choice(spec.scales)) if rng.random() < spec.rescale_p else 1.0
    side = min(p / scale, h, w)  # source pixels behind the patch
    if side == p:  # no resampling: a plain crop at a uniform integer position
        y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        patch = image[y:y + p, x:x + p]
    else:
        # uniform position of the patch in the rescaled image, mapped back to source pixels
        y0, x0 = rng.random() * (h - side), rng.random() * (w - side)
        # crop a few pixels more than the box: the bicubic kernel reads beyond it, as it would
        # inside the whole image
        m = math.ceil(2 * max(side / p, 1.0)) + 1
        top, left = max(0, int(y0) - m), max(0, int(x0) - m)
        bottom, right = min(h, math.ceil(y0 + side) + m), min(w, math.ceil(x0 + side) + m)
        region = Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right]))
        box = (x0 - left, y0 - top, x0 - left + side, y0 - top + side)
        patch = np.asarray(region.resize((p, p), Image.BICUBIC, box=box))
    if rng.random() < spec.rotate_p:
        patch = np.rot90(patch, k=int(rng.choice(spec.rotations)) // 90)
    if spec.flip_p and rng.random() < spec.flip_p:
        patch = patch[:, ::-1]
    if spec.permute_channels_p and not spec.grayscale and rng.random() < spec.permute_channels_p:
        patch = patch[..., rng.permutation(3)]
    target = to_gray(np.ascontiguousarray(patch)) if spec.grayscale else np.ascontiguousarray(patch)
    chroma = spec.chroma if spec.chroma != "random" else ("444", "422", "420")[int(rng.integers(3))]
    if double:  # FBCNN: JPEG at q1, shift the block grid by (dy, dx) in 0..7, then the last JPEG
        first = jpeg_decode(jpeg_encode(target, _draw(spec.double_quality, rng), chroma))
        dy, dx = (int(v) for v in rng.integers(0, 8, 2))
        s = spec.size
        target = np.ascontiguousarray(target[dy:dy + s, dx:dx + s])
        return jpeg_encode(np.ascontiguousarray(first[dy:dy + s, dx:dx + s]), _draw(spec.quality, rng), chroma), target
    return jpeg_encode(target, _draw(spec.quality, rng), chroma), target


def _draw(bounds: tuple[int, int], rng: np.random.Generator) -> int:
    lo, hi = bounds
    return lo if lo == hi else int(rng.integers(lo, hi + 1))


def center_pair(image: np.ndarray, crop: int, quality: int, grayscale: bool = False) -> tuple[bytes, np.ndarray]:
    """The deterministic validation pair, as `random_patch` gives it: the JPEG bytes at `quality` of
    the centre crop (at most `crop` per side, cut to whole 8x8 JPEG blocks), and that crop."""
    h, w = image.shape[:2]
    ch, cw = min(crop, h) // 8 * 8, min(crop, w) // 8 * 8
    top, left = (h - ch) // 2, (w - cw) // 2
    target = np.ascontiguousarray(image[top:top + ch, left:left + cw])
    if grayscale:
        target = to_gray(target)
    return jpeg_encode(target, quality), target
