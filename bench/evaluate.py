"""Benchmark `python -m restorer evaluate` at the size of LIVE1: 29 images of 768 x 512, 4 qualities,
the CPU network (configs/cpu.yaml's U-Net, conditioned on the quality).

    python bench/evaluate.py [--images 29] [--qualities 10 20 30 40] [--threads N]

Prints where the time goes (decode/encode, network, the file's bounds, metrics) and, side by side on the same images in
the same process, the metrics as they were (SSIM with an 11x11 window in float64) against today's
(separable window, one filtering of the five maps, float32). The last line is one JSON object.
Goal (issue 15): the whole evaluation in under 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from restorer.tools import demo, evaluate  # noqa: E402
from restorer.infer import metrics  # noqa: E402
from restorer.formats.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from restorer.formats.config import load_config  # noqa: E402
from restorer.data import jpeg  # noqa: E402


def ssim_before(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The metric as it was: a full 11x11 depthwise window, five separate filterings, float64."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = torch.outer(g, g).expand(c, 1, 11, 11).contiguous()
    filt = lambda t: F.conv2d(t, window, groups=c)  # noqa: E731
    mx, my = filt(x), filt(y)
    vx, vy, cov = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))).flatten(1).mean(1)


def make_images(folder: Path, n: int) -> None:
    """n photos of 768 x 512: crops (and mirrored crops) of the real photos the installed packages ship."""
    sources = []
    for name in [*demo.TRAIN_PHOTOS, demo.HELD_OUT]:
        import skimage

        path = Path(skimage.data_dir) / name
        if path.exists():
            im = Image.open(path).convert("RGB")
            if min(im.size) >= 256:
                sources.append(np.asarray(im.resize((max(768, im.width), max(512, im.height)), Image.BICUBIC)))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        src = sources[i % len(sources)]
        y, x = int(rng.integers(0, src.shape[0] - 512 + 1)), int(rng.integers(0, src.shape[1] - 768 + 1))
        crop = src[y:y + 512, x:x + 768]
        Image.fromarray(np.ascontiguousarray(crop[:, ::-1] if i >= len(sources) else crop)).save(folder / f"{i:02d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=29)
    ap.add_argument("--qualities", type=int, nargs="+", default=[10, 20, 30, 40])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, the machine's cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        work = Path(tmp)
        make_images(work / "images", args.images)
        cfg = load_config(str(REPO / "configs" / "cpu.yaml"), ["data.shards=unused"])
        model = cfg.network().build()
        ckpt = work / "cpu.pt"
        save_checkpoint(ckpt, Checkpoint(cfg.network(), model.state_dict(), config=cfg.to_dict()))

        t0 = time.perf_counter()
        result = evaluate.evaluate(ckpt, work / "images", evaluate.Protocol(tuple(args.qualities)), evaluate.Runtime("cpu"))
        total = time.perf_counter() - t0

        # where the time goes, on the first image at the first quality (then x images x qualities)
        image = np.asarray(Image.open(work / "images" / "00.png"))
        net = evaluate._load(ckpt, "cpu", "fp32")
        timings = {}
        t = time.perf_counter()
        data, _ = jpeg.compress(image, args.qualities[0])
        pixels, q = jpeg.decode(data)
        timings["jpeg"] = time.perf_counter() - t
        t = time.perf_counter()
        out = evaluate.restore_image(net, pixels, quality=q, **evaluate._tiling(None))
        timings["network"] = time.perf_counter() - t
        t = time.perf_counter()
        jpeg.file_bounds(data).project(out)
        timings["file bounds"] = time.perf_counter() - t
        t = time.perf_counter()
        evaluate.scored("rgb", image, pixels, out)
        evaluate.scored("rgb", image, pixels, out)
        timings["metrics"] = (time.perf_counter() - t) / 2
        a, b = evaluate._tensor(out), evaluate._tensor(image)
        t = time.perf_counter()
        before = ssim_before(a, b)
        timings["ssim_before"] = time.perf_counter() - t
        t = time.perf_counter()
        now = metrics.ssim(a, b)
        timings["ssim_now"] = time.perf_counter() - t
        agree = abs(float(before[0]) - float(now[0]))

    n = args.images * len(args.qualities)
    print(f"evaluate: {args.images} images of 768x512 x {len(args.qualities)} qualities ({n} restorations), "
          f"configs/cpu.yaml's network, {torch.get_num_threads()} threads")
    print(f"{'part':<22}{'s per image':>12}{'share':>8}")
    per = sum(timings[k] for k in ("jpeg", "network", "file bounds", "metrics"))
    for k in ("jpeg", "network", "file bounds", "metrics"):
        print(f"{k:<22}{timings[k]:>12.3f}{timings[k] / per:>8.0%}")
    print(f"{'SSIM as it was':<22}{timings['ssim_before']:>12.3f}   (float64, 11x11 window)")
    print(f"{'SSIM now':<22}{timings['ssim_now']:>12.3f}   ({timings['ssim_before'] / timings['ssim_now']:.1f}x faster; "
          f"|difference| {agree:.1e})")
    goal = "ok" if total < 120 else "MISSED"
    print(f"whole evaluation: {total:.1f} s (goal < 120 s: {goal}); mean JPEG q{args.qualities[0]} PSNR "
          f"{result['qualities'][str(args.qualities[0])]['mean']['psnr_jpeg']:.2f} dB")
    print(json.dumps({"images": args.images, "qualities": args.qualities, "threads": torch.get_num_threads(),
                      "total_s": round(total, 2), **{f"{k.replace(' ', '_')}_s": round(v, 4) for k, v in timings.items()},
                      "ssim_speedup": round(timings["ssim_before"] / timings["ssim_now"], 1),
                      "ssim_difference": agree}))


if __name__ == "__main__":
    main()
