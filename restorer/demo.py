"""The offline demo: real photographs (scikit-image ships them) -> shards -> 2-rank CPU training ->
evaluation and a before/after picture on a photo the network never saw.

    python -m restorer.demo [--out demo] [--steps 300] [--nproc 2]      (make demo runs this)

Every step is the real command a user runs: make_shards.py, torchrun launch/train.py,
python -m restorer.evaluate, python -m restorer.restore.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from restorer.data.degrade import jpeg_encode
from restorer.data import decode_image

REPO = Path(__file__).resolve().parent.parent
# colour photographs and natural textures from skimage.data_dir (no download needed)
TRAIN_PHOTOS = ["coffee.png", "chelsea.png", "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg",
                "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "grass.png", "gravel.png", "brick.png",
                "camera.png", "moon.png", "coins.png"]
HELD_OUT = "astronaut.png"  # never trained on: evaluated and restored at the end


def _run(cmd: list[str], what: str) -> None:
    print(f"\n== {what}\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo", help="folder for everything the demo makes (default: demo)")
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300: a few minutes on 2 cores)")
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    ap.add_argument("--quality", type=int, default=10)
    args = ap.parse_args(argv)
    try:
        import skimage
    except ImportError:
        print("demo: error: scikit-image is needed for the demo photos: pip install -e '.[demo]'", file=sys.stderr)
        return 2

    out = Path(args.out).resolve()
    data_dir = Path(skimage.data_dir)
    photos, held_out = out / "photos", out / "held_out"
    for folder in (photos, held_out):
        folder.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_PHOTOS:
        if (data_dir / name).exists():
            shutil.copy2(data_dir / name, photos / name)
    shutil.copy2(data_dir / HELD_OUT, held_out / HELD_OUT)
    # the JPEG a user would have: the held-out photo at the demo's quality
    jpeg_dir = out / "jpeg"
    jpeg_dir.mkdir(exist_ok=True)
    stem = Path(HELD_OUT).stem
    (jpeg_dir / f"{stem}.jpg").write_bytes(jpeg_encode(decode_image((held_out / HELD_OUT).read_bytes()), args.quality))

    py = sys.executable
    _run([py, "shard_tools/make_shards.py", str(photos), "--out", str(out / "shards"), "--val-count", "1"],
         "1/4 pack the photos into shards")
    _run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "launch/train.py",
          "--config", "configs/cpu.yaml", f"data.shards={out / 'shards'}", f"train.out_dir={out / 'run'}",
          f"train.max_steps={args.steps}", f"log.val_every={max(args.steps // 3, 1)}",
          f"data.patch.quality=[{args.quality},{args.quality}]", f"data.val_quality={args.quality}"],
         f"2/4 train {args.steps} steps on {args.nproc} CPU processes (gloo)")
    ckpt = out / "run" / "best.pt" if (out / "run" / "best.pt").exists() else out / "run" / "last.pt"
    _run([py, "-m", "restorer.evaluate", "--ckpt", str(ckpt), "--images", str(held_out),
          "--quality", str(args.quality), "--json", str(out / "evaluation.json")],
         "3/4 evaluate on the held-out photo")
    _run([py, "-m", "restorer.restore", "--ckpt", str(ckpt), str(jpeg_dir / f"{stem}.jpg"), "--out",
          str(out / "restored"), "--compare", "--reference", str(held_out)],
         "4/4 restore its JPEG and draw the before/after picture")

    mean = json.loads((out / "evaluation.json").read_text())["qualities"][str(args.quality)]["mean"]
    gain = mean["psnr_model"] - mean["psnr_jpeg"]
    print(f"""
demo finished: on {HELD_OUT} (never trained on) at JPEG quality {args.quality}
  PSNR  JPEG {mean['psnr_jpeg']:.2f} dB -> restored {mean['psnr_model']:.2f} dB ({gain:+.2f} dB)
  SSIM  JPEG {mean['ssim_jpeg']:.4f}    -> restored {mean['ssim_model']:.4f}
  shards      {out / 'shards'}
  run         {out / 'run'} (metrics.jsonl, last.pt, best.pt)
  evaluation  {out / 'evaluation.json'}
  picture     {out / 'restored' / f'{stem}_compare.png'}  (JPEG | restored | original, with a zoomed crop)
  restored    {out / 'restored' / f'{stem}.png'}""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
