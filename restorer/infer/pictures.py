"""Before/after pictures: the compare picture restore draws (`--compare`) and the trainer's validation
picture (RUN/val/step-N.png, TensorBoard, wandb, MLflow).

Compare picture (``--compare``)
-------------------------------
The picture is RGB with n columns (n = 3: JPEG input | restored |
original when ``--reference DIR`` holds a file with the same stem, otherwise n = 2):

* row 1: a label bar of :data:`LABEL_H` = 16 px (name and PSNR vs the original when known),
  then each image as a panel of ``panel_w x panel_h``: the image size, or, for images wider than
  :data:`MAX_PANEL_W` = 1024 px, downscaled (Lanczos) to width 1024 and height
  ``max(1, round(H * 1024 / W))``;
* row 2: a 4x nearest-neighbour zoom of the same ``cw x ch`` crop of each image, with
  ``cw = min(max(64, panel_w // 4), W)`` (the zoom fills the column), ``ch = min(64, H)``, i.e.
  ``zoom_w = 4 * cw``, ``zoom_h = 4 * ch``; the crop is the 8-aligned window where input and
  restored differ most (the centre for tiny images);
* each column is ``col_w = max(panel_w, zoom_w)`` wide (panels left-aligned, black background).

So: ``width = n * col_w``, ``height = LABEL_H + panel_h + zoom_h`` (see :func:`compare_size`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_H = 16
MAX_PANEL_W = 1024
ZOOM = 4
CROP = 64


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays of one shape (inf when equal), row chunks to bound memory."""
    sq = 0.0
    for r in range(0, a.shape[0], 256):
        d = a[r:r + 256].astype(np.int32) - b[r:r + 256].astype(np.int32)
        sq += float(np.square(d, dtype=np.int64).sum())
    mse = sq / a.size
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def compare_size(width: int, height: int, with_reference: bool) -> tuple[int, int]:
    """Size ``(W, H)`` of the compare picture of a ``width x height`` image (module docstring)."""
    panel_w, panel_h = _panel_size(width, height)
    cw, ch = _crop_size(width, height)
    zoom_w, zoom_h = ZOOM * cw, ZOOM * ch
    n = 3 if with_reference else 2
    return n * max(panel_w, zoom_w), LABEL_H + panel_h + zoom_h


def _crop_size(width: int, height: int) -> tuple[int, int]:
    """The zoomed crop: as wide as fills the column under the panel (4x), 64 px high."""
    return min(max(CROP, _panel_size(width, height)[0] // ZOOM), width), min(CROP, height)


def _panel_size(width: int, height: int) -> tuple[int, int]:
    if width <= MAX_PANEL_W:
        return width, height
    return MAX_PANEL_W, max(1, round(height * MAX_PANEL_W / width))


def _crop_origin(a: np.ndarray, b: np.ndarray, cw: int, ch: int) -> tuple[int, int]:
    """(y, x) of the 8-aligned ch x cw window where a and b differ most; centre if tiny."""
    h, w = a.shape[:2]
    if h < 8 or w < 8 or cw < 8 or ch < 8:
        return (h - ch) // 2, (w - cw) // 2
    bh, bw = h // 8, w // 8
    blocks = np.zeros((bh, bw), np.int64)
    for r in range(0, bh, 64):  # 512 image rows at a time
        sa = a[r * 8:min(r + 64, bh) * 8, :bw * 8].astype(np.int16)
        sb = b[r * 8:min(r + 64, bh) * 8, :bw * 8].astype(np.int16)
        d = np.abs(sa - sb).reshape(sa.shape[0] // 8, 8, bw, 8, -1)
        blocks[r:r + d.shape[0]] = d.sum(axis=(1, 3, 4))
    kh, kw = max(1, ch // 8), max(1, cw // 8)
    integ = np.zeros((bh + 1, bw + 1), np.int64)
    integ[1:, 1:] = blocks.cumsum(0).cumsum(1)
    sums = integ[kh:, kw:] - integ[:-kh, kw:] - integ[kh:, :-kw] + integ[:-kh, :-kw]
    by, bx = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return min(int(by) * 8, h - ch), min(int(bx) * 8, w - cw)


def make_compare(inp: np.ndarray, restored: np.ndarray, original: np.ndarray | None) -> Image.Image:
    """The side-by-side compare picture (RGB), sized as :func:`compare_size` says."""
    h, w = inp.shape[:2]
    panel_w, panel_h = _panel_size(w, h)
    cw, ch = _crop_size(w, h)
    cy, cx = _crop_origin(inp, restored, cw, ch)
    width, height = compare_size(w, h, original is not None)
    col_w = width // (3 if original is not None else 2)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    panels = [("JPEG input", inp), ("restored", restored)]
    if original is not None:
        panels.append(("original", original))
    for i, (name, arr) in enumerate(panels):
        label = name
        if original is not None and arr is not original:
            label += f"  PSNR {psnr_u8(arr, original):.2f} dB"
        im = Image.fromarray(arr).convert("RGB")
        panel = im if (panel_w, panel_h) == (w, h) else im.resize((panel_w, panel_h), Image.LANCZOS)
        crop = im.crop((cx, cy, cx + cw, cy + ch)).resize((ZOOM * cw, ZOOM * ch), Image.NEAREST)
        x = i * col_w
        canvas.paste(panel, (x, LABEL_H))
        canvas.paste(crop, (x, LABEL_H + panel_h))
        draw.text((x + 2, 2), label, fill=(255, 255, 255), font=font)
        if i:
            draw.line([(x, 0), (x, LABEL_H - 1)], fill=(96, 96, 96))
    return canvas
