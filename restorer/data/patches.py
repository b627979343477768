"""Training pairs from a decoded photo: where a patch lies, how it is rescaled, rotated and flipped
(here), then its JPEG degradation (restorer.data.jpeg).

The seed project resizes and rotates the WHOLE image, then crops one patch. The distribution here is
the same, at a fraction of the cost: pick where the patch lies in the (virtually) rescaled and
rotated image, crop only the source region behind it, resize only that region, and rotate the
patch with a lossless transpose. A 90-degree rotation with `expand` maps a uniform crop position to
a uniform crop position, so rotating the patch instead of the image changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from restorer.base.colour import luma
from restorer.data import jpeg


@dataclass
class PatchSpec:
    """Where the clean patches come from and what they look like. Defaults are the seed project's."""

    size: int = 128  # patch side, pixels
    rescale_p: float = 0.5  # probability of rescaling ...
    scales: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6)  # ... by one of these (bicubic)
    rotate_p: float = 0.5  # probability of rotating ...
    rotations: tuple[int, ...] = (90, 180, 270)  # ... by one of these (counter-clockwise, degrees)
    flip_p: float = 0.0  # probability of a horizontal flip (with the rotations: the 8 dihedral modes)
    permute_channels_p: float = 0.0  # probability of permuting the clean patch's R, G, B: more colours
    #                                  from the same photos (the JPEG is encoded after, so it stays real)
    grayscale: bool = False  # train on luma only: (H, W, 1) pairs
    photo_side: int = 0  # > 0: a photo whose longer side is more is seen at that side (patches cut from it
    #                      downscaled, before the rescale above): a 4000 px wallpaper's 64 px patch is mostly
    #                      sky; the photos people restore, and the field's sets, are nearer 500-1000 px. 0: off

    def validate(self) -> None:
        """Raise ValueError naming the field that is wrong ("field: must be ..., got ...")."""
        if self.size < 8 or self.size % 8:
            raise ValueError(f"size: must be a multiple of 8 (the JPEG block), >= 8, got {self.size}")
        for name in ("rescale_p", "rotate_p", "flip_p", "permute_channels_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if not self.scales or not all(0.1 <= s <= 4.0 for s in self.scales):
            raise ValueError(f"scales: must be a non-empty list of factors in [0.1, 4], got {list(self.scales)}")
        if self.photo_side and self.photo_side < self.size:
            raise ValueError(f"photo_side: must be 0 (off) or at least the patch size {self.size}, got {self.photo_side}")
        if not self.rotations or not all(r in (90, 180, 270) for r in self.rotations):
            raise ValueError(f"rotations: must be a non-empty list of 90, 180, 270, got {list(self.rotations)}")

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3


def random_patch(image: np.ndarray, spec: PatchSpec, rng: np.random.Generator, margin: int = 0) -> np.ndarray:
    """A clean patch of a decoded (H, W, 3) uint8 image, C-contiguous (P, P, C) uint8 with
    P = spec.size + margin (a double JPEG needs its grid shift's margin).

    An image too small for the drawn scale uses the largest source square it has, resized to the
    patch (so a small image is upscaled rather than refused).
    """
    h, w = image.shape[:2]
    p = spec.size + margin
    scale = float(rng.choice(spec.scales)) if rng.random() < spec.rescale_p else 1.0
    if spec.photo_side and max(h, w) > spec.photo_side:
        scale *= spec.photo_side / max(h, w)
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
    return luma(np.ascontiguousarray(patch))[..., None] if spec.grayscale else np.ascontiguousarray(patch)


def training_pair(image: np.ndarray, patch: PatchSpec, degradation: jpeg.JpegSpec,
                  rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """One training pair: (the input as JPEG bytes, the clean (P, P, C) target). The input is kept
    as bytes: a fiftieth of the pixels' memory in a shuffle buffer, decoded when batching."""
    h, w = image.shape[:2]
    double = degradation.draw_double(rng, room=min(h, w) >= patch.size + jpeg.DOUBLE_SHIFT)
    clean = random_patch(image, patch, rng, margin=jpeg.DOUBLE_SHIFT if double else 0)
    return jpeg.degrade(clean, degradation, rng, double)


def center_crop(image: np.ndarray, crop: int, grayscale: bool = False) -> np.ndarray:
    """Validation's clean image: the centre crop of at most `crop` per side, cut to whole 8x8 JPEG
    blocks (luma only with `grayscale`)."""
    h, w = image.shape[:2]
    ch, cw = min(crop, h) // 8 * 8, min(crop, w) // 8 * 8
    top, left = (h - ch) // 2, (w - cw) // 2
    target = np.ascontiguousarray(image[top:top + ch, left:left + cw])
    return luma(target)[..., None] if grayscale else target
