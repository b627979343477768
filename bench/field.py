"""Score checkpoints on the field's JPEG-restoration benchmarks, next to the papers' published figures
(issue 27, item 1).

    python bench/field.py --ckpt CKPT [CKPT ...] [--benchmarks DIR] [--max-images N] [--device auto|cpu|cuda]
    python bench/field.py --jpeg-only [--benchmarks DIR] [--max-images N]

DIR is laid out like ../shared/benchmarks (the default, beside the repository; its README.md):
LIVE1_color/ is scored in RGB, LIVE1_gray/ and Classic5/ with evaluate's --gray protocol, Real/ (no
originals) is skipped; qualities 10 20 30 40. The scoring is restorer.tools.evaluate.evaluate itself (the
same code path as `python -m restorer evaluate --images DIR --quality 10 20 30 40 [--gray]`). Each
checkpoint (or .onnx / .safetensors network, or a shipped network's name: blind-unet5) is one row; "JPEG
(measured here)" is evaluate's JPEG-input row, measured with a network that returns its input, so it does
not depend on any checkpoint and checks that the published JPEG baseline reproduces. --jpeg-only prints only that check. --max-images N scores
the first N images of each set (evaluate's order) for quick runs. The last line is one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from restorer.tools import evaluate as ev  # noqa: E402
from restorer.base.cli import Parser, UsageError, run  # noqa: E402
from restorer.infer.inference import Network, find_inputs  # noqa: E402
from restorer.infer.shipped import weights_source  # noqa: E402
from restorer.infer.field_table import DEFAULT_BENCHMARKS, METHODS, PUBLISHED, QUALITIES, SETS, SKIPPED  # noqa: E402
JPEG_ROW = "JPEG (measured here)"


def identity_network() -> Network:
    """A network that returns its input: evaluate's JPEG-input figures without any checkpoint."""
    return Network(lambda x: x, 3, False, torch.device("cpu"), name="identity")


@contextlib.contextmanager
def first_images(folder: Path, n: Optional[int]):
    """`folder`, or (with n) a temporary copy of its first n images in evaluate's order, same names."""
    if not n:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="field-") as tmp:
        for path in find_inputs([str(folder)])[0][:n]:
            dest = Path(tmp) / path.relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        yield Path(tmp)


def score(ckpt, images: Path, gray: bool, device: str) -> dict:
    """evaluate.evaluate's means per quality: {q: {"psnr_jpeg", "psnr_model", ...}}; ckpt None: JPEG only."""
    result = ev.evaluate(identity_network() if ckpt is None else ckpt, images, ev.Protocol(tuple(QUALITIES), gray=gray),
                         ev.Runtime("cpu" if ckpt is None else device))
    return {int(q): {**block["mean"], "images": len(block["images"])} for q, block in result["qualities"].items()}


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _row(name: str, psnr: Optional[float], ssim: Optional[float], psnrb: Optional[float], width: int) -> str:
    return f"  {name:<{width}} {_fmt(psnr, '.2f'):>8} {_fmt(ssim, '.4f'):>8} {_fmt(psnrb, '.2f'):>8}"


def build_parser() -> Parser:
    p = Parser(prog="python bench/field.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="+", help="checkpoints, networks exported as .onnx / .safetensors, or the names "
                   "of networks that ship (restorer.infer.shipped)")
    p.add_argument("--jpeg-only", action="store_true", help="no checkpoint: the measured JPEG rows against the published")
    p.add_argument("--benchmarks", default=str(DEFAULT_BENCHMARKS), help=f"benchmarks folder (default {DEFAULT_BENCHMARKS})")
    p.add_argument("--max-images", type=int, help="score only the first N images of each set")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def main(argv=None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        if bool(args.ckpt) == args.jpeg_only:
            raise UsageError("give --ckpt CKPT [CKPT ...], or --jpeg-only")
        if args.max_images is not None and args.max_images < 1:
            raise UsageError(f"--max-images must be >= 1, got {args.max_images}")
        ckpts = [weights_source(c) for c in args.ckpt or []]
        missing = [c for c in ckpts if not Path(c).is_file()]
        if missing:
            raise UsageError(f"--ckpt file not found: {', '.join(missing)}")
        root = Path(args.benchmarks)
        if not root.is_dir():
            raise UsageError(f"--benchmarks folder not found: {root}")
        sets = [s for s in SETS if (root / s).is_dir()]
        if not sets:
            raise UsageError(f"none of the sets {', '.join(SETS)} under {root}")
        width = max([len(JPEG_ROW), *map(len, METHODS), *(len(Path(c).name) for c in ckpts)])
        figures: dict = {}
        for name in sets:
            gray = SETS[name]
            with first_images(root / name, args.max_images) as images:
                measured = score(None, images, gray, args.device)
                ours = {c: score(c, images, gray, args.device) for c in ckpts}
            print(f"{name}: {'gray protocol (evaluate --gray)' if gray else 'RGB'}, "
                  f"{measured[QUALITIES[0]]['images']} image(s); published: {PUBLISHED[name]['source']}")
            figures[name] = {}
            for q in QUALITIES:
                published = PUBLISHED[name].get(q, {})
                print(f"  q{q}{'':<{width - 2}} {'PSNR':>8} {'SSIM':>8} {'PSNR-B':>8}")
                for method in METHODS if ckpts else ("JPEG",):
                    if method in published:
                        print(_row(method, *published[method], width))
                m = measured[q]
                print(_row(JPEG_ROW, m["psnr_jpeg"], m["ssim_jpeg"], m["psnrb_jpeg"], width))
                entry = {"images": m["images"], "jpeg_measured": {k: m[f"{k}_jpeg"] for k in ev.METRICS},
                         "jpeg_published_psnr": published.get("JPEG", (None,))[0]}
                if entry["jpeg_published_psnr"] is not None:
                    entry["jpeg_psnr_difference"] = round(m["psnr_jpeg"] - entry["jpeg_published_psnr"], 4)
                entry["ours"] = {}
                for c in ckpts:
                    o = ours[c][q]
                    print(_row(Path(c).name, o["psnr_model"], o["ssim_model"], o["psnrb_model"], width))
                    entry["ours"][c] = {k: o[f"{k}_model"] for k in ev.METRICS}
                figures[name][str(q)] = entry
            print()
        skipped = [s for s in SKIPPED if (root / s).is_dir()]
        if skipped:
            print(f"skipped (no originals): {', '.join(skipped)}")
        print(json.dumps({"benchmarks": str(root), "qualities": list(QUALITIES), "max_images": args.max_images,
                          "checkpoints": ckpts, "sets": figures}))
        return 0

    return run("field", body)


if __name__ == "__main__":
    sys.exit(main())
