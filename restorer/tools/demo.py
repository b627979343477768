"""The offline demo: real photographs (scikit-image ships them) -> shards -> 2-rank CPU training of one
network for every JPEG quality -> evaluation at qualities 10 to 95 and a before/after picture on a
photo the network never saw.

    python -m restorer demo [--out demo] [--minutes 4.5 | --steps N] [--nproc 2] [--benchmarks DIR]
                                                                               (make demo runs this)

With the field's benchmarks beside the repository (../shared/benchmarks, or --benchmarks DIR), it
also says where its network stands among the papers' at q10: one line a set.

Every step is the real command a user runs: make_shards.py, torchrun launch/train.py,
python -m restorer evaluate, python -m restorer restore.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

from restorer.formats.run_folder import BEST, LAST
from restorer.base.cli import Parser, UsageError, run
from restorer.base.errors import RunError
from restorer.data import decode_image, jpeg
from restorer.infer.field_table import DEFAULT_BENCHMARKS, PUBLISHED, SETS
from restorer.infer.shipped import DEFAULT_MODEL, shipped_card

PROG = "restorer demo"

REPO = Path(__file__).resolve().parents[2]
# colour photographs and natural textures from skimage.data_dir (no download needed)
TRAIN_PHOTOS = ["coffee.png", "chelsea.png", "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg",
                "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "grass.png", "gravel.png", "brick.png",
                "camera.png", "moon.png", "coins.png"]
HELD_OUT = "astronaut.png"  # never trained on: evaluated and restored at the end
# more real photos no demo training sees, where the installed packages ship them (bench/models.py)
MORE_HELD_OUT = [("skimage", "data/cell.png"), ("skimage", "data/clock_motion.png"),
                 ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                 ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg")]


def package_file(package: str, relative: str) -> Path | None:
    """A data file shipped inside an installed package, found without importing it; None if absent."""
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / relative).is_file():
            return Path(root) / relative
    return None


def copy_photos(train_dir: Path, held_out_dir: Path, more_held_out: bool = False) -> list[str]:
    """Copy the demo's training photos and its held-out one (and with `more_held_out` the others
    that are installed); returns the names of the held-out photos."""
    import skimage

    data_dir = Path(skimage.data_dir)
    for folder in (train_dir, held_out_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_PHOTOS:
        if (data_dir / name).exists():
            shutil.copy2(data_dir / name, train_dir / name)
    shutil.copy2(data_dir / HELD_OUT, held_out_dir / HELD_OUT)
    held = [HELD_OUT]
    for package, relative in MORE_HELD_OUT if more_held_out else []:
        path = package_file(package, relative)
        if path is not None:
            shutil.copy2(path, held_out_dir / path.name)
            held.append(path.name)
    return held


def _run(cmd: list[str], what: str) -> None:
    print(f"\n== {what}\n$ {' '.join(cmd)}", flush=True)
    code = subprocess.run(cmd, cwd=REPO).returncode
    if code:
        raise RunError(f"step {what.split(' ', 1)[0]} failed with exit code {code}: its message is above")


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo", help="folder for everything the demo makes (default: demo)")
    ap.add_argument("--minutes", type=float, default=4.5, help="training time (default 4.5: the learning rate "
                    "decays over it, so a slower machine trains fewer steps in the same time)")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes")
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    ap.add_argument("--quality", type=int, default=10, help="the JPEG quality of the before/after picture (default 10)")
    ap.add_argument("--benchmarks", default=str(DEFAULT_BENCHMARKS), help="the field's benchmarks (LIVE1, Classic5) "
                    f"to place the network among the papers' at q10 (default {DEFAULT_BENCHMARKS}, when there)")
    return run(PROG, lambda: demo(ap.parse_args(argv)))


def demo(args) -> int:
    if importlib.util.find_spec("skimage") is None:
        raise UsageError("scikit-image is needed for the demo photos: pip install -e '.[demo]'")
    out = Path(args.out).resolve()
    photos, held_out = out / "photos", out / "held_out"
    copy_photos(photos, held_out)
    # the JPEG a user would have: the held-out photo at the demo's quality
    jpeg_dir = out / "jpeg"
    jpeg_dir.mkdir(exist_ok=True)
    stem = Path(HELD_OUT).stem
    (jpeg_dir / f"{stem}.jpg").write_bytes(jpeg.encode(decode_image((held_out / HELD_OUT).read_bytes()), args.quality))

    py = sys.executable
    _run([py, "shard_tools/make_shards.py", str(photos), "--out", str(out / "shards"), "--val-count", "1"],
         "1/4 pack the photos into shards")
    budget = [f"train.max_steps={args.steps}"] if args.steps else \
        ["train.max_steps=0", "train.epochs=1000000", f"train.max_minutes={args.minutes}", "log.val_every=1000"]
    _run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "launch/train.py",
          "--config", "configs/cpu.yaml", f"data.shards={out / 'shards'}", f"train.out_dir={out / 'run'}",
          "train.resume=false", "train.overwrite=true", *budget],
         f"2/4 train for {f'{args.steps} steps' if args.steps else f'{args.minutes:g} minutes'} on {args.nproc} "
         "CPU processes (gloo)")
    ckpt = out / "run" / BEST if (out / "run" / BEST).exists() else out / "run" / LAST
    _run([py, "-m", "restorer", "evaluate", "--ckpt", str(ckpt), "--images", str(held_out), "--sweep",
          "--json", str(out / "evaluation.json")],
         "3/4 evaluate on the held-out photo at every quality (the papers' protocol: whole image, RGB, 4:2:0)")
    _run([py, "-m", "restorer", "restore", "--ckpt", str(ckpt), str(jpeg_dir / f"{stem}.jpg"), "--out",
          str(out / "restored"), "--compare", "--reference", str(held_out)],
         "4/4 restore its JPEG and draw the before/after picture")

    field = field_lines(py, ckpt, Path(args.benchmarks), out)
    sweep = {int(q): b["mean"] for q, b in json.loads((out / "evaluation.json").read_text())["qualities"].items()}
    gains = {q: m["psnr_model"] - m["psnr_jpeg"] for q, m in sweep.items()}
    first = sweep[min(sweep)]
    print(f"""
demo finished: one network for every JPEG quality, on {HELD_OUT} (never trained on)
  quality     {' '.join(f'{q:>6}' for q in gains)}
  PSNR gain   {' '.join(f'{g:>+6.2f}' for g in gains.values())}  dB{'' if min(gains.values()) >= 0 else '  (negative somewhere)'}
  at q{min(sweep)}: PSNR JPEG {first['psnr_jpeg']:.2f} dB -> restored {first['psnr_model']:.2f} dB, SSIM {first['ssim_jpeg']:.4f} -> {first['ssim_model']:.4f}
  shards      {out / 'shards'}
  run         {out / 'run'} (metrics.jsonl, last.pt, best.pt)
  evaluation  {out / 'evaluation.json'}
  picture     {out / 'restored' / f'{stem}_compare.png'}  (JPEG | restored | original, with a zoomed crop)
  restored    {out / 'restored' / f'{stem}.png'}""")
    print("\n".join(field))
    return 0


FIELD_METHODS = ("ARCNN", "DnCNN", "FBCNN", "SwinIR")  # the published rows a demo line quotes (field_table.PUBLISHED)


def field_lines(py: str, ckpt: Path, benchmarks: Path, out: Path) -> list[str]:
    """Where the network stands on the field's table at q10: evaluate on each set of `benchmarks` there
    is (the papers' protocol), one line a set with the published figures beside it."""
    sets = [name for name in SETS if (benchmarks / name).is_dir()]
    if not sets:
        return [f"  field table: no benchmarks in {benchmarks} (--benchmarks DIR: LIVE1_color, LIVE1_gray, Classic5)"]
    lines = [f"  on the field's table at q10 (PSNR dB; the papers' networks trained for days on GPUs; {DEFAULT_MODEL}, "
             "the network that ships, 5.5 minutes on one and 85 on 2 CPU cores):"]
    shipped = shipped_card(DEFAULT_MODEL)["field"]["sets"]
    for name in sets:
        result = out / f"field_{name}.json"
        _run([py, "-m", "restorer", "evaluate", "--ckpt", str(ckpt), "--images", str(benchmarks / name), "--quality", "10",
              *(["--gray"] if SETS[name] else []), "--json", str(result)], f"the field's table: {name} at q10")
        m = json.loads(result.read_text())["qualities"]["10"]["mean"]
        published = PUBLISHED[name].get(10, {})
        papers = ", ".join(f"{k} {published[k][0]:.2f}" for k in FIELD_METHODS if k in published)
        lines.append(f"  {name:<12} JPEG {m['psnr_jpeg']:.2f} -> ours {m['psnr_model']:.2f} "
                     f"({m['psnr_model'] - m['psnr_jpeg']:+.2f}); {papers}; {DEFAULT_MODEL} {shipped[name]['10']['psnr']:.2f}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
