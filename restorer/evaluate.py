"""Evaluate a checkpoint on a folder of clean images: PSNR, SSIM and PSNR-B of the JPEG input and of
the model's output, per JPEG quality.

    python -m restorer.evaluate --ckpt CKPT --images DIR --quality 10 [20 30 40]
                                [--json FILE] [--y-channel] [--device auto|cpu|cuda] [--max-side N]

For every clean image under DIR (recursive; .jpg .jpeg .png .webp .bmp .tif .tiff in any case) and
every quality:

1. decode it to RGB (`restorer.data.decode_image`); if a side is longer than ``--max-side``
   (default 1024; 0 = no limit) take the centre crop of at most that many pixels per side, which
   keeps CPU runs quick; then crop from the top-left to whole 8x8 blocks, so the JPEG grid and the
   grid PSNR-B measures on coincide;
2. JPEG-encode it with the trainer's encoder (`restorer.data.degrade.jpeg_encode`: Pillow, 4:2:0
   chroma) and decode it;
3. run the model on the whole image (float32 on the device, ``torch.inference_mode()``, output
   clamped to [0, 1]);
4. measure the JPEG image and the output against the clean image.

Channels: RGB by default (all three channels, data range 1.0). ``--y-channel`` measures on the
BT.601 luma in the MATLAB ``rgb2ycbcr`` convention most papers use,
Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in [0, 1] (so Y lies in
[16/255, 235/255]), computed from the clean image, the decoded JPEG and the output alike.

A grayscale (luma-only) model is fed what it was trained on: the clean image's luma as Pillow's
``convert("L")`` gives it (`to_gray`), JPEG-encoded as a grayscale JPEG. Its metrics are always
on Y: the full-range luma L is mapped to Y = (16 + 219 L) / 255, the same convention as
``--y-channel`` (the MATLAB weights are 219/255 times the full-range ones).

The checkpoint's EMA weights are used when it has them, else its model weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from restorer.data import decode_image
from restorer.data.decode import IMAGE_EXTENSIONS
from restorer.data.degrade import jpeg_decode, jpeg_encode, to_gray
from restorer.fileio import atomic_write_json
from restorer.metrics import psnr, psnr_b, ssim
from restorer.restore import load_model as restore_load_model
from restorer.restore import find_inputs, resolve_device

METRICS = ("psnr", "ssim", "psnrb")
KEYS = tuple(f"{m}_{s}" for m in METRICS for s in ("jpeg", "model"))
DEFAULT_MAX_SIDE = 1024

#: MATLAB rgb2ycbcr luma weights, for R, G, B in [0, 1] giving Y in [16/255, 235/255].
_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
_Y_OFFSET = 16.0 / 255.0

RGB_HEADER = "metrics on RGB (all three channels, data range 1.0)"
Y_HEADER = ("metrics on Y (BT.601 luma, MATLAB rgb2ycbcr convention: "
            "Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, in [16/255, 235/255]; data range 1.0)")


class EvaluateError(Exception):
    """A fatal, user-facing error: reported as one line, exit status 2."""


def warn(msg: str) -> None:
    print(f"evaluate: warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# pieces


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W in [0, 1] -> N x 1 x H x W, MATLAB rgb2ycbcr's Y (in [16/255, 235/255])."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _Y_OFFSET + _Y_WEIGHTS[0] * r + _Y_WEIGHTS[1] * g + _Y_WEIGHTS[2] * b


def luma_to_y(x: torch.Tensor) -> torch.Tensor:
    """Full-range luma in [0, 1] -> MATLAB-convention Y in [16/255, 235/255]."""
    return _Y_OFFSET + (219.0 / 255.0) * x


def prepare_clean(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    """Centre-crop to at most `max_side` per side (None/0: no limit), then crop from the top-left
    to multiples of 8."""
    h, w = rgb.shape[:2]
    if max_side:
        ch, cw = min(h, max_side), min(w, max_side)
        top, left = (h - ch) // 2, (w - cw) // 2
        rgb = rgb[top:top + ch, left:left + cw]
        h, w = ch, cw
    return np.ascontiguousarray(rgb[: h // 8 * 8, : w // 8 * 8])


def to_tensor(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, C) uint8 -> 1 x C x H x W float32 in [0, 1] on `device`."""
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)[None].to(device, torch.float32) / 255.0


def load_model(ckpt_path: str | os.PathLike, device: str) -> tuple[torch.nn.Module, bool, torch.device]:
    """restore.load_model (one way to rebuild a network from a checkpoint), errors as EvaluateError."""
    try:
        dev = resolve_device(device)
        model, grayscale = restore_load_model(ckpt_path, dev)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluateError(str(e)) from None
    return model, grayscale, dev


def measure(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {
        "psnr": float(psnr(x, ref)[0]),
        "ssim": float(ssim(x, ref)[0]),
        "psnrb": float(psnr_b(x, ref)[0]),
    }


# ---------------------------------------------------------------------------------------------
# library entry point


def evaluate(
    ckpt_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    qualities,
    y_channel: bool = False,
    device: str = "auto",
    max_side: int | None = DEFAULT_MAX_SIDE,
) -> dict:
    """Evaluate; return the JSON object described in the module docstring. Raises EvaluateError."""
    return _evaluate(ckpt_path, images_dir, qualities, y_channel, device, max_side)[0]


def _evaluate(ckpt_path, images_dir, qualities, y_channel, device, max_side) -> tuple[dict, dict]:
    """`evaluate`, plus what the printed header says about the model (not part of the JSON)."""
    qualities = [int(q) for q in qualities]
    if not qualities:
        raise EvaluateError("no quality given")
    for q in qualities:
        if not 1 <= q <= 100:
            raise EvaluateError(f"quality must be in 1..100, got {q}")
    qualities = list(dict.fromkeys(qualities))
    if max_side is not None and max_side != 0 and max_side < 8:
        raise EvaluateError(f"--max-side must be >= 8 (or 0 for no limit), got {max_side}")
    root = Path(images_dir)
    if not root.is_dir():
        raise EvaluateError(f"image directory not found: {root}")
    paths = find_inputs([str(root)])[0]
    if not paths:
        raise EvaluateError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")

    model, grayscale, dev = load_model(ckpt_path, device)
    channel = "y" if (y_channel or grayscale) else "rgb"

    per_q: dict[str, dict[str, dict[str, float]]] = {str(q): {} for q in qualities}
    for path in paths:
        name = path.relative_to(root).as_posix()
        try:
            rgb = decode_image(path.read_bytes())
        except Exception as e:  # noqa: BLE001 - skip any unreadable image
            warn(f"skipping {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        clean = prepare_clean(rgb, max_side)
        if clean.shape[0] < 8 or clean.shape[1] < 8:
            warn(f"skipping {name}: smaller than 8x8 pixels")
            continue
        if grayscale:
            clean = to_gray(clean)  # (H, W, 1): what the grayscale model was trained on
        clean_t = to_tensor(clean, dev)
        for q in qualities:
            jpeg = jpeg_decode(jpeg_encode(clean, q))
            jpeg_t = to_tensor(jpeg, dev)
            with torch.inference_mode():
                out_t = model(jpeg_t).float().clamp_(0.0, 1.0)
            if grayscale:
                ref, a, b = luma_to_y(clean_t), luma_to_y(jpeg_t), luma_to_y(out_t)
            elif y_channel:
                ref, a, b = rgb_to_y(clean_t), rgb_to_y(jpeg_t), rgb_to_y(out_t)
            else:
                ref, a, b = clean_t, jpeg_t, out_t
            mj, mm = measure(a, ref), measure(b, ref)
            per_q[str(q)][name] = {f"{m}_{s}": v[m] for m in METRICS for s, v in (("jpeg", mj), ("model", mm))}

    if not any(per_q.values()):
        raise EvaluateError(f"none of the {len(paths)} image(s) under {root} could be read")

    result = {
        "checkpoint": str(ckpt_path),
        "channel": channel,
        "qualities": {},
    }
    for q, images in per_q.items():
        mean = {k: float(np.mean([img[k] for img in images.values()])) for k in KEYS}
        result["qualities"][q] = {"images": images, "mean": mean}
    return result, {"grayscale": grayscale}


# ---------------------------------------------------------------------------------------------
# report


def format_report(result: dict, info: dict | None = None) -> str:
    """The fixed-width tables printed by `main`: one per quality."""
    lines = []
    head = f"checkpoint: {result['checkpoint']}"
    if info and info.get("grayscale"):
        head += " (grayscale model)"
    lines.append(head)
    lines.append(Y_HEADER if result["channel"] == "y" else RGB_HEADER)
    for q, block in result["qualities"].items():
        mean = block["mean"]
        n = len(block["images"])
        lines.append("")
        lines.append(f"JPEG quality {q}: {n} image{'s' if n != 1 else ''}")
        lines.append(f"{'':<8}{'PSNR (dB)':>11}{'SSIM':>9}{'PSNR-B (dB)':>13}")
        for row in ("jpeg", "model"):
            lines.append(f"{'JPEG' if row == 'jpeg' else 'model':<8}{mean['psnr_' + row]:>11.3f}"
                         f"{mean['ssim_' + row]:>9.4f}{mean['psnrb_' + row]:>13.3f}")
        g = {m: mean[f"{m}_model"] - mean[f"{m}_jpeg"] for m in METRICS}
        lines.append(f"{'gain':<8}{g['psnr']:>+11.3f}{g['ssim']:>+9.4f}{g['psnrb']:>+13.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate",
        description="PSNR / SSIM / PSNR-B of JPEG inputs and model outputs on a folder of clean images.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint file (EMA weights used when present)")
    p.add_argument("--images", required=True, help="folder of clean images (searched recursively)")
    p.add_argument("--quality", required=True, type=int, nargs="+", help="JPEG quality/qualities, 1..100")
    p.add_argument("--json", help="also write the per-image and mean results to this JSON file (atomically)")
    p.add_argument("--y-channel", action="store_true",
                   help="measure on BT.601 luma Y (MATLAB rgb2ycbcr convention) instead of RGB")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help=f"centre-crop images to at most this many pixels per side (default {DEFAULT_MAX_SIDE}; "
                        "0 = no limit) to keep CPU runs quick")
    return p


def main(argv=None) -> int:
    parser = build_parser()

    def _error(message: str):  # one line, exit 2, no usage block
        print(f"evaluate: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    parser.error = _error  # type: ignore[method-assign]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        result, info = _evaluate(args.ckpt, args.images, args.quality, args.y_channel,
                                 args.device, args.max_side)
        print(format_report(result, info))
        if args.json:
            atomic_write_json(args.json, result)
    except EvaluateError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
