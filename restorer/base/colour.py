"""Colour conversions: the three conventions the project uses, in one home, each named for what it is
for (they differ: the same photo's MATLAB Y and JFIF luma differ by up to 35 grey levels).

    luma           JFIF's luma (ITU-R BT.601, full range 0-255), as Pillow's convert("L") and a JPEG file's
                   own Y: what grayscale networks train on, and what restore gives them of a colour photo
    ycbcr, rgb     the same JFIF conversion for all three planes (Pillow's, uint8): restore keeps a colour
                   photo's Cb and Cr while a grayscale network restores its luma
    RGB_TO_YCC     libjpeg's matrix in float (YCC_OFFSET, YCC_TO_RGB): a JPEG file's planes, unrounded, for
                   the file bounds (restorer.data.jpeg.FileBounds)
    matlab_y       MATLAB rgb2ycbcr's Y, 16-235: the papers' grayscale benchmarks (evaluate --gray, --y)
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 JFIF luma (Pillow's L)."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


def ycbcr(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 JFIF YCbCr (its Y is `luma`'s)."""
    return np.array(Image.fromarray(rgb, "RGB").convert("YCbCr"))


def rgb(ycc: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 JFIF YCbCr -> (H, W, 3) uint8 RGB."""
    return np.asarray(Image.fromarray(ycc, "YCbCr").convert("RGB"))


# libjpeg's full-range BT.601 conversion, in float: a JPEG's planes before rounding
RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)
YCC_OFFSET = np.array([0.0, 128.0, 128.0], np.float32)
YCC_TO_RGB = np.linalg.inv(RGB_TO_YCC.astype(np.float64)).astype(np.float32)


def matlab_y(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) float64 MATLAB rgb2ycbcr Y in [16, 235] (not rounded)."""
    x = rgb.astype(np.float64)
    return 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0


def matlab_y_u8(rgb: np.ndarray) -> np.ndarray:
    """The grayscale benchmarks' reference: MATLAB Y rounded to 8 bits, (H, W) uint8."""
    return np.round(matlab_y(rgb)).astype(np.uint8)
