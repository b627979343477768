"""Benchmark the networks: what each costs, and what each learns in the same wall-clock minutes.

    python bench/models.py [--minutes 8] [--nproc 2] [--networks seed,seed_residual,dncnn,unet,nafnet]
                           [--skip-speed] [--skip-quality] [--work DIR] [--device auto|cpu|cuda]

1. Cost, per network and preset (cpu and gpu): parameters, MACs per pixel (convolutions), and
   training-step patches/s at batch 8 of 64 x 64 on this machine, measured with the trainer's own
   step (restorer.train.train_step): fp32, and bf16 autocast beside it (on a CPU without bf16
   instructions bf16 is slower: the faster of the two is marked). On CUDA: batch 64 of 128 x 128,
   fp32 eager and bf16 + channels_last + compile. The variants are timed in turn, in rounds, and
   each figure is the fastest step (noise only ever slows a step down).
2. Quality per budget: every CPU preset (and the seed network, plain and with a global residual)
   is trained through the project's own loop (`torchrun launch/train.py --config configs/cpu.yaml`,
   the demo's recipe, with `model.name=...`) for the same wall-clock minutes on the demo's photos,
   then `python -m restorer.evaluate` at JPEG quality 10 on real photos no training saw: the demo's
   held-out astronaut.png and the others the installed packages ship (restorer.demo.MORE_HELD_OUT).
   Printed: mean and worst PSNR gain over the JPEG input, mean SSIM, steps done.

The last line printed is one JSON object of the figures. The quality part takes
(networks x minutes) plus a minute of evaluation each: 45 minutes at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from restorer import demo  # noqa: E402
from restorer.config import load_config  # noqa: E402
from restorer.models import MODELS, build_model, count_parameters, macs_per_pixel  # noqa: E402
from restorer.train import Training, train_step  # noqa: E402

# the networks of the quality table: (name, config overrides)
BUDGET_NETWORKS = {
    "seed": ["model.name=seed", "model.seed.residual=false"],
    "seed_residual": ["model.name=seed", "model.seed.residual=true"],
    "dncnn": ["model.name=dncnn", "model.preset=cpu"],
    "unet": ["model.name=unet", "model.preset=cpu"],
    "nafnet": ["model.name=nafnet", "model.preset=cpu"],
}


# ----------------------------------------------------------------------------- 1. cost


def speed_rows(device: torch.device, rounds: int = 3) -> list[dict]:
    cuda = device.type == "cuda"
    batch, patch = (64, 128) if cuda else (8, 64)
    variants = {"fp32": ["train.precision=fp32"],
                "bf16": ["train.precision=bf16", *(["train.channels_last=true", "train.compile=true"] if cuda else [])]}
    rows, runs = [], []
    for name, cls in MODELS.items():
        presets = {}  # preset names by their options: the seed's two presets are one network
        for preset, options in cls.PRESETS.items():
            presets.setdefault(json.dumps(options, sort_keys=True), preset)
        for preset in presets.values():
            overrides = [f"model.name={name}", f"model.preset={preset}", "train.device=" + device.type,
                         f"train.batch_size={batch}", f"data.patch.size={patch}", "data.shards=unused"]
            cfg = load_config(None, overrides)
            model = build_model(name, in_channels=3, **cfg.model.options())
            row = {"network": name, "preset": preset or "-", "params": count_parameters(model),
                   "macs_per_pixel": macs_per_pixel(model, 3)}
            rows.append(row)
            for variant, extra in variants.items():
                training = Training.build(load_config(None, overrides + extra), device)
                gen = torch.Generator().manual_seed(0)
                batches = [tuple(torch.randint(0, 256, (batch, 3, patch, patch), dtype=torch.uint8, generator=gen)
                                 for _ in range(2)) for _ in range(2)]
                try:
                    for i in range(2 if cuda else 1):  # warm-up (compiling on CUDA)
                        train_step(training, [batches[i % 2]])
                    runs.append((row, variant, training, batches))
                    row[variant] = []
                except Exception as exc:  # noqa: BLE001 - a variant that cannot run is a note in its row
                    row[variant + "_failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    steps = 5 if cuda else 2
    for _ in range(rounds):  # in turn, so a drift in the machine's speed touches all alike
        for row, variant, training, batches in runs:
            for i in range(steps):
                if cuda:
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                train_step(training, [batches[i % 2]])
                if cuda:
                    torch.cuda.synchronize(device)
                row[variant].append(time.perf_counter() - t)
    for row in rows:
        for variant in variants:
            if isinstance(row.get(variant), list):
                row[variant] = batch / min(row[variant])
    return rows


def print_speed(rows: list[dict], device: torch.device) -> None:
    cuda = device.type == "cuda"
    what = "batch 64 of 128x128; bf16 = bf16 + channels_last + compile" if cuda else \
        f"batch 8 of 64x64, {torch.get_num_threads()} threads"
    print(f"training step, patches/s on {device} ({what}); MACs: convolutions, per pixel")
    print(f"{'network':<14}{'preset':<7}{'params':>12}{'MACs/px':>11}{'fp32':>10}{'bf16':>10}  faster")
    for r in rows:
        cells = [f"{r[v]:>10.1f}" if isinstance(r.get(v), float) else f"{'failed':>10}" for v in ("fp32", "bf16")]
        faster = max(("fp32", "bf16"), key=lambda v: r.get(v) if isinstance(r.get(v), float) else -1)
        print(f"{r['network']:<14}{r['preset']:<7}{r['params']:>12,}{r['macs_per_pixel'] / 1e3:>10.1f}k{''.join(cells)}  {faster}")
        for v in ("fp32", "bf16"):
            if r.get(v + "_failed"):
                print(f"    {v}: {r[v + '_failed']}")


# ----------------------------------------------------------------------------- 2. quality per budget


def run(cmd: list[str], log: Path) -> None:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if p.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"bench/models.py: {' '.join(cmd[:6])} ... failed ({p.returncode}):\n" + "\n".join(tail))


def quality_rows(work: Path, names: list[str], minutes: float, nproc: int) -> tuple[list[dict], list[str]]:
    photos, held_out = work / "photos", work / "held_out"
    held = demo.copy_photos(photos, held_out, more_held_out=True)
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        run([sys.executable, "shard_tools/make_shards.py", str(photos), "--out", str(shards), "--val-count", "1"],
            work / "shards.log")
    rows = []
    for name in names:
        out = work / "runs" / name
        print(f"  ... training {name} for {minutes:g} min", file=sys.stderr, flush=True)
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
             "launch/train.py", "--config", "configs/cpu.yaml", f"data.shards={shards}", f"train.out_dir={out}",
             "train.resume=false", "train.overwrite=true", f"train.max_minutes={minutes}", "train.max_steps=0",
             "train.epochs=1000000", "log.progress=false", *BUDGET_NETWORKS[name]], work / f"{name}.train.log")
        run([sys.executable, "-m", "restorer.evaluate", "--ckpt", str(out / "last.pt"), "--images", str(held_out),
             "--quality", "10", "--json", str(work / f"{name}.json")], work / f"{name}.eval.log")
        result = json.loads((work / f"{name}.json").read_text())["qualities"]["10"]
        gains = {k: v["psnr_model"] - v["psnr_jpeg"] for k, v in result["images"].items()}
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        model = build_model(state["model_name"], **state["model_args"])
        rows.append({"network": name, "params": count_parameters(model), "macs_per_pixel": macs_per_pixel(model, 3),
                     "steps": events[-1]["step"], "mean_gain_db": statistics.mean(gains.values()),
                     "worst_gain_db": min(gains.values()), "worst_photo": min(gains, key=gains.get),
                     "ssim_jpeg": result["mean"]["ssim_jpeg"], "ssim_model": result["mean"]["ssim_model"],
                     "gains": gains})
    return rows, held


def print_quality(rows: list[dict], held: list[str], minutes: float, nproc: int) -> None:
    print(f"\nquality per budget: {minutes:g} min of training each ({nproc} processes, configs/cpu.yaml's recipe), "
          f"JPEG q10, {len(held)} held-out photos: {', '.join(held)}")
    print(f"{'network':<15}{'params':>10}{'MACs/px':>10}{'steps':>8}{'mean dB':>9}{'worst dB':>10}"
          f"{'SSIM JPEG':>11}{'SSIM net':>10}  worst photo")
    for r in rows:
        print(f"{r['network']:<15}{r['params']:>10,}{r['macs_per_pixel'] / 1e3:>9.1f}k{r['steps']:>8}"
              f"{r['mean_gain_db']:>+9.2f}{r['worst_gain_db']:>+10.2f}{r['ssim_jpeg']:>11.4f}{r['ssim_model']:>10.4f}"
              f"  {r['worst_photo']}")
    if rows:
        print("per photo (dB over the JPEG input): " + "; ".join(
            f"{r['network']}: " + ", ".join(f"{Path(k).stem} {v:+.2f}" for k, v in r["gains"].items()) for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=8.0, help="training minutes per network (default 8)")
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes per training (default 2, as the demo)")
    ap.add_argument("--networks", default=",".join(BUDGET_NETWORKS),
                    help=f"comma-separated subset of {', '.join(BUDGET_NETWORKS)}")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--work", help="folder for shards, runs and logs (default: a temporary one)")
    args = ap.parse_args()
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    if unknown := [n for n in names if n not in BUDGET_NETWORKS]:
        ap.error(f"--networks: unknown {', '.join(unknown)}; choose from {', '.join(BUDGET_NETWORKS)}")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    summary: dict = {"device": str(device), "torch": torch.__version__}
    if not args.skip_speed:
        rows = speed_rows(device)
        print_speed(rows, device)
        summary["speed"] = {f"{r['network']}_{r['preset']}": {k: round(v, 2) if isinstance(v, float) else v
                                                              for k, v in r.items() if k not in ("network", "preset")}
                            for r in rows}
    if not args.skip_quality:
        with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
            work = Path(args.work or tmp)
            work.mkdir(parents=True, exist_ok=True)
            rows, held = quality_rows(work, names, args.minutes, args.nproc)
        print_quality(rows, held, args.minutes, args.nproc)
        summary["quality"] = {"minutes": args.minutes, "nproc": args.nproc, "photos": held,
                              **{r["network"]: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()
                                                if k not in ("network", "gains", "worst_photo")} for r in rows}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
