"""The IJG's (libjpeg's) standard quantization tables and their quality scaling: what a JPEG's quality
means, to the data (reading a file's quality) and to the networks (conditioning on it) alike."""

import numpy as np

# The IJG standard tables (JPEG Annex K), natural (row-major) order, as Pillow reports them.
# (Only the luma table decides the quality: it is the one every JPEG has, grayscale ones included.)
LUMA_BASE = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
                      14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
                      18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                      49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float64)
CHROMA_BASE = np.array([17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
                        24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
                        *([99] * 32)], np.float64)


def ijg_table(quality: int, base: np.ndarray = LUMA_BASE) -> np.ndarray:
    """libjpeg's jpeg_quality_scaling + jpeg_add_quant_table (baseline: 1..255)."""
    q = min(max(int(quality), 1), 100)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    return np.clip((base * scale + 50) // 100, 1, 255)
