"""Restore JPEG images with a trained checkpoint: tiled, memory-bounded inference.

    python -m restorer.restore --ckpt runs/x/best.pt photos/ img.jpg --out restored/ \
        [--tile 256] [--overlap 32] [--batch 8] [--device auto|cpu|cuda] [--compare] [--reference DIR]

Inputs are files or folders (folders are walked recursively for jpg/jpeg/png/webp/bmp/tif/tiff,
any case). Each input is written as ``OUT/<stem>.png`` (lossless). Grayscale files stay grayscale.
Unreadable files are reported as ``skipped X: reason`` and the run goes on.

Tiling (:func:`restore_array`)
------------------------------
* Tiles are ``tile`` px square (a multiple of 8), origins step by ``tile - overlap`` rounded
  down to a multiple of 8 (at least 8), so every origin lies on the 8x8 JPEG grid; the last
  row/column of tiles is aligned to the (padded) border. Tiles go through the model ``batch`` at a time.
* Each axis is (virtually) reflect-padded to a multiple of 8: the < 8 missing pixels are padded
  per tile, never for the whole image, and cropped from the result; the last tile is aligned to
  that padded border, so every origin is a multiple of 8. An axis shorter than ``tile`` gets a
  single tile of its padded length. (So the tiled and whole-image results see the same borders.)
* Tiles are blended with separable weights. On each side that has a neighbouring tile, the
  weight over the ``overlap`` px is 1e-3 (never 0) in the outer quarter, ramps linearly up to 1
  across the middle half, and is 1 beyond. The near-zero outer quarter matters: a convolution
  sees zero padding at a tile edge, so the pixels within its receptive radius of the edge are
  wrong; with ``overlap/4`` >= that radius (8 px at the default overlap 32; the seed network's
  radius is 7) the tiled result equals the whole-image result up to rounding.
  Because the tile grid is a product grid, the sum of weights is separable too: it is kept as
  two 1-D arrays, so the result is an exact weighted average at every pixel.
* Memory is bounded by the tile size: the image is processed one row of tiles (a band) at a
  time; a float32 accumulator of ``tile`` rows x image width holds the rows still open, and rows
  no later band touches are normalised, clamped to [0, 1], rounded and written into the uint8
  output. No full-size float array is ever allocated.

Compare picture (``--compare``)
-------------------------------
``OUT/<stem>_compare.png`` is an RGB picture with n columns (n = 3: JPEG input | restored |
original when ``--reference DIR`` holds a file with the same stem, otherwise n = 2):

* row 1: a label bar of :data:`LABEL_H` = 16 px (name and PSNR vs the original when known),
  then each image as a panel of ``panel_w x panel_h``: the image size, or, for images wider than
  :data:`MAX_PANEL_W` = 1024 px, downscaled (Lanczos) to width 1024 and height
  ``max(1, round(H * 1024 / W))``;
* row 2: a 4x nearest-neighbour zoom of the same ``cw x ch`` crop of each image, with
  ``cw = min(64, W)``, ``ch = min(64, H)``, i.e. ``zoom_w = 4 * cw``, ``zoom_h = 4 * ch``; the crop
  is the 8-aligned window where input and restored differ most (the centre for tiny images);
* each column is ``col_w = max(panel_w, zoom_w)`` wide (panels left-aligned, black background).

So: ``width = n * col_w``, ``height = LABEL_H + panel_h + zoom_h`` (see :func:`compare_size`).
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from restorer.checkpoint import load_checkpoint
from restorer.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, load_image, to_rgb_array
from restorer.fileio import atomic_open
from restorer.models import build_model

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
MIN_WEIGHT = 1e-3

LABEL_H = 16
MAX_PANEL_W = 1024
ZOOM = 4
CROP = 64


# --------------------------------------------------------------------------------------------
# Tiled inference
# --------------------------------------------------------------------------------------------

def _ceil8(n: int) -> int:
    return (n + 7) // 8 * 8


def _tile_layout(length: int, tile: int, step: int) -> tuple[int, list[int]]:
    """(tile size along this axis, tile origins) over the axis padded to a multiple of 8.

    Every origin is a multiple of 8; the last one is aligned to the padded border.
    """
    padded = _ceil8(length)
    if padded <= tile:
        return padded, [0]
    origins = list(range(0, padded - tile, step))
    origins.append(padded - tile)
    return tile, origins


def _ramp(size: int, overlap: int, start: bool, end: bool) -> np.ndarray:
    """1-D blending weights of one tile, on the sides that have a neighbour: MIN_WEIGHT over the
    outer quarter of the overlap, a linear ramp up to 1 across its middle half, 1 beyond."""
    w = np.ones(size, np.float32)
    n = min(overlap, size)
    if n > 0:
        margin = n // 4
        i = np.arange(n, dtype=np.float32)
        ramp = np.clip((i - margin + 1) / (n - 2 * margin + 1), MIN_WEIGHT, 1.0)
        if start:
            w[:n] = np.minimum(w[:n], ramp)
        if end:
            w[size - n:] = np.minimum(w[size - n:], ramp[::-1])
    return w


def _axis_weights(size: int, origins: list[int], overlap: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-tile 1-D weights and their sum over the padded axis."""
    total = np.zeros(origins[-1] + size, np.float32)
    weights = []
    for i, o in enumerate(origins):
        w = _ramp(size, overlap, start=i > 0, end=i < len(origins) - 1)
        total[o:o + size] += w
        weights.append(w)
    return weights, total


def _extract(image: np.ndarray, y0: int, x0: int, th: int, tw: int) -> np.ndarray:
    """image[y0:y0+th, x0:x0+tw], reflect-padded past the border (only ever < 8 px)."""
    h, w = image.shape[:2]
    part = image[y0:min(y0 + th, h), x0:min(x0 + tw, w)]
    py, px = th - part.shape[0], tw - part.shape[1]
    if py or px:
        mode_y = "reflect" if part.shape[0] > 1 else "edge"
        mode_x = "reflect" if part.shape[1] > 1 else "edge"
        part = np.pad(part, ((0, py), (0, 0), (0, 0)), mode=mode_y)
        part = np.pad(part, ((0, 0), (0, px), (0, 0)), mode=mode_x)
    return part


def _autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def restore_array(model: nn.Module, image: np.ndarray, tile: int = 256, overlap: int = 32,
                  batch: int = 8, device: str | torch.device | None = None) -> np.ndarray:
    """Restore an ``(H, W, C)`` uint8 image (``(H, W)`` is taken as one channel) with `model`.

    Returns an array of the same shape, uint8. See the module docstring for the tiling.
    `device` defaults to the device of the model's parameters.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError("image must be an (H, W, C) or (H, W) uint8 numpy array")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 8 or tile % 8:
        raise ValueError(f"tile must be a positive multiple of 8, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= tile // 2:
        raise ValueError(f"overlap must be an integer in [0, tile/2 = {tile // 2}], got {overlap!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    squeeze = image.ndim == 2
    if squeeze:
        image = image[..., None]
    h, w, c = image.shape
    if h == 0 or w == 0:
        raise ValueError(f"empty image {w}x{h}")
    expected = getattr(model, "in_channels", c)
    if expected != c:
        raise ValueError(f"the model takes {expected} channel(s), the image has {c}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    model.eval()

    step = max(8, (tile - overlap) // 8 * 8)
    th, ys = _tile_layout(h, tile, step)
    tw, xs = _tile_layout(w, tile, step)
    wys, sum_y = _axis_weights(th, ys, overlap)
    wxs, sum_x = _axis_weights(tw, xs, overlap)
    wp = xs[-1] + tw  # padded width
    inv_x = (1.0 / sum_x)[None, :, None]

    out = np.empty((h, w, c), np.uint8)
    acc = np.zeros((th, wp, c), np.float32)  # rows [ys[r], ys[r] + th) of the weighted sum
    done = 0  # rows of `out` written so far

    with torch.inference_mode(), _autocast(device):
        for r, y0 in enumerate(ys):
            wy = wys[r][:, None, None]
            for b in range(0, len(xs), batch):
                chunk = xs[b:b + batch]
                tiles = np.stack([_extract(image, y0, x0, th, tw) for x0 in chunk])
                inp = torch.from_numpy(tiles).to(device).permute(0, 3, 1, 2).float().div_(255.0)
                res = model(inp).float().permute(0, 2, 3, 1).cpu().numpy()
                for k, x0 in enumerate(chunk):
                    wx = wxs[b + k][None, :, None]
                    acc[:, x0:x0 + tw] += res[k] * wy * wx
                del inp, res, tiles
            # Rows before the next band's origin are final: normalise, clamp, round, write.
            last = r == len(ys) - 1
            d = th if last else ys[r + 1] - y0
            stop = min(y0 + d, h)
            if stop > done:  # in place: these accumulator rows are discarded just below
                vals = acc[done - y0:stop - y0, :w]
                vals *= (1.0 / sum_y[done:stop])[:, None, None]
                vals *= inv_x[:, :w]
                np.clip(vals, 0.0, 1.0, out=vals)
                vals *= 255.0
                np.rint(vals, out=vals)
                np.copyto(out[done:stop], vals, casting="unsafe")
                done = stop
                del vals
            if not last:  # slide the window: keep the open rows, zero the new ones
                acc[:th - d] = acc[d:]
                acc[th - d:] = 0.0
    return out[..., 0] if squeeze else out


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------

def _clean_state(state: dict) -> dict:
    """Drop `module.` / `_orig_mod.` prefixes (DDP / torch.compile) and AveragedModel's counter."""
    out = {}
    for k, v in state.items():
        if k == "n_averaged":
            continue
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    return device


def load_model(ckpt_path: str | Path, device: str | torch.device | None = "cpu") -> tuple[nn.Module, bool]:
    """Rebuild the model from a checkpoint alone: ``(model in eval mode on device, grayscale)``.

    Uses the ``ema`` weights when present. Raises FileNotFoundError for a missing file and
    ValueError (one line) for a checkpoint that cannot be used.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = load_checkpoint(path)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(state, dict) or "model" not in state or "model_name" not in state:
        raise ValueError(f"{path} is not a restorer checkpoint (no model / model_name)")
    args = dict(state.get("model_args") or {})
    model = build_model(state["model_name"], **args)
    weights = state.get("ema") or state["model"]
    try:
        model.load_state_dict(_clean_state(weights))
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the model: {' '.join(str(e).split())[:200]}") from None
    channels = getattr(model, "in_channels", args.get("in_channels", 3))
    try:
        grayscale = bool(state["config"]["data"]["patch"]["grayscale"])
    except (KeyError, TypeError):
        grayscale = channels == 1
    if grayscale != (channels == 1):
        raise ValueError(f"{path}: config says grayscale={grayscale} but the model has {channels} channel(s)")
    model.to(resolve_device(device)).eval()
    return model, grayscale


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def is_grayscale(im: Image.Image) -> bool:
    return im.mode in GRAY_MODES or im.mode.startswith("I;16")


def read_image(path: Path) -> tuple[np.ndarray, bool]:
    """``(array, grayscale)``: (H, W) uint8 for grayscale files, (H, W, 3) uint8 otherwise.

    Orientation, alpha (over white) and 16-bit scaling as in :func:`restorer.data.decode_image`.
    Raises ImageDecodeError or OSError.
    """
    im = load_image(path.read_bytes())
    gray = is_grayscale(im)
    rgb = to_rgb_array(im)
    return (np.ascontiguousarray(rgb[..., 0]) if gray else rgb), gray


def restore_image(model: nn.Module, model_gray: bool, image: np.ndarray, **kw) -> np.ndarray:
    """Restore a (H, W) grayscale or (H, W, 3) RGB uint8 image; the output has the same shape.

    A grayscale image through an RGB model is replicated to 3 channels and converted back to L;
    an RGB image through a grayscale model has its luma (Y of YCbCr) restored.
    """
    if image.ndim == 2:
        if model_gray:
            return restore_array(model, image, **kw)
        rgb = restore_array(model, np.repeat(image[..., None], 3, axis=2), **kw)
        return np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
    if not model_gray:
        return restore_array(model, image, **kw)
    ycc = np.array(Image.fromarray(image, "RGB").convert("YCbCr"))
    ycc[..., 0] = restore_array(model, np.ascontiguousarray(ycc[..., 0]), **kw)
    return np.asarray(Image.fromarray(ycc, "YCbCr").convert("RGB"))


def save_png(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def find_inputs(paths: Iterable[str], exclude: Path | None = None) -> tuple[list[Path], list[str]]:
    """(files, missing): explicit files as given, folders walked for image extensions."""
    files, missing, seen = [], [], set()
    exclude = exclude.resolve() if exclude is not None else None
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                and not (exclude is not None and exclude in f.resolve().parents)
            )
        elif p.is_file():
            found = [p]
        else:
            missing.append(str(p))
            continue
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, missing


def find_reference(ref_dir: Path, stem: str) -> Path | None:
    for f in sorted(ref_dir.iterdir()):
        if f.is_file() and f.stem == stem and f.suffix.lower() in IMAGE_EXTENSIONS:
            return f
    return None


# --------------------------------------------------------------------------------------------
# Compare picture
# --------------------------------------------------------------------------------------------

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
    zoom_w, zoom_h = ZOOM * min(CROP, width), ZOOM * min(CROP, height)
    n = 3 if with_reference else 2
    return n * max(panel_w, zoom_w), LABEL_H + panel_h + zoom_h


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
    cw, ch = min(CROP, w), min(CROP, h)
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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m restorer.restore", description="Remove JPEG artifacts with a trained checkpoint.")
    p.add_argument("--ckpt", required=True, help="checkpoint file (best.pt / last.pt)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (walked recursively)")
    p.add_argument("--out", required=True, help="output folder: OUT/<stem>.png")
    p.add_argument("--tile", type=int, default=256, help="tile size in px, a multiple of 8 (default 256)")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in px, at most tile/2 (default 32)")
    p.add_argument("--batch", type=int, default=8, help="tiles per forward pass (default 8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compare", action="store_true", help="also write OUT/<stem>_compare.png")
    p.add_argument("--reference", help="folder of originals (same stem) for --compare and PSNR")
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.tile < 8 or args.tile % 8:
            raise _UsageError(f"--tile must be a positive multiple of 8, got {args.tile}")
        if not 0 <= args.overlap <= args.tile // 2:
            raise _UsageError(f"--overlap must be in [0, {args.tile // 2}], got {args.overlap}")
        if args.batch < 1:
            raise _UsageError(f"--batch must be >= 1, got {args.batch}")
        ref_dir = Path(args.reference) if args.reference else None
        if ref_dir is not None and not ref_dir.is_dir():
            raise _UsageError(f"--reference folder not found: {ref_dir}")
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise _UsageError(f"--out is not a folder: {out_dir}")
        if not Path(args.ckpt).is_file():
            raise _UsageError(f"checkpoint not found: {args.ckpt}")
        files, missing = find_inputs(args.inputs, exclude=out_dir)
        if not files:
            raise _UsageError(f"no input images found in: {' '.join(args.inputs)}")
        device = resolve_device(args.device)
        model, model_gray = load_model(args.ckpt, device)
        out_dir.mkdir(parents=True, exist_ok=True)
    except (_UsageError, ValueError, OSError) as e:
        print(f"restore: error: {_one_line(e)}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    kw = dict(tile=args.tile, overlap=args.overlap, batch=args.batch, device=device)
    restored, skipped = 0, len(missing)
    for m in missing:
        print(f"skipped {m}: no such file or folder", file=sys.stderr)
    used: dict[str, Path] = {}
    for path in tqdm(files, desc="restore", unit="img", file=sys.stderr, disable=None):
        def skip(reason: str) -> None:
            tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)

        if path.stem in used:
            skip(f"{path.stem}.png already written for {used[path.stem]}")
            skipped += 1
            continue
        try:
            image, _ = read_image(path)
        except (ImageDecodeError, OSError) as e:
            skip(_one_line(e))
            skipped += 1
            continue
        try:
            result = restore_image(model, model_gray, image, **kw)
            save_png(out_dir / f"{path.stem}.png", result)
            used[path.stem] = path
        except (ValueError, OSError, RuntimeError) as e:  # e.g. out of memory, unwritable output
            skip(_one_line(e))
            skipped += 1
            continue
        restored += 1
        if args.compare:
            try:
                original = None
                ref = find_reference(ref_dir, path.stem) if ref_dir is not None else None
                if ref is not None:
                    try:
                        original, _ = read_image(ref)
                        if original.ndim != image.ndim:  # match the input's colour type
                            conv = "L" if image.ndim == 2 else "RGB"
                            original = np.asarray(Image.fromarray(original).convert(conv))
                        if original.shape != image.shape:
                            tqdm.write(f"note {path}: reference {ref} is {original.shape[1]}x{original.shape[0]},"
                                       f" not {image.shape[1]}x{image.shape[0]}: compared without it", file=sys.stderr)
                            original = None
                    except (ImageDecodeError, OSError) as e:
                        tqdm.write(f"note {path}: reference {ref} unreadable ({_one_line(e)})", file=sys.stderr)
                        original = None
                pic = make_compare(image, result, original)
                with atomic_open(out_dir / f"{path.stem}_compare.png", "wb") as f:
                    pic.save(f, format="PNG")
            except (ValueError, OSError, RuntimeError) as e:
                tqdm.write(f"note {path}: no compare picture ({_one_line(e)})", file=sys.stderr)
    print(f"restored {restored}, skipped {skipped}, output dir {out_dir}")
    return 1 if restored == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
