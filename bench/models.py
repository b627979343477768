"""Benchmark the networks: what each costs, how each best takes the JPEG quality, and what each recipe
learns in the same wall-clock minutes, at every quality.

    python bench/models.py [--sections speed,conditioning,budget] [--minutes 8] [--steps N] [--nproc 2]
                           [--recipes a,b,...] [--network-alone] [--work DIR] [--device auto|cpu|cuda]

1. speed: per network and preset (cpu and gpu): parameters, MACs per pixel (convolutions), and
   training-step patches/s at batch 8 of 64 x 64 on this machine, measured with the trainer's own
   step (restorer.train.loop.train_step): fp32, and bf16 autocast beside it (on a CPU without bf16
   instructions bf16 is slower: the faster of the two is marked). On CUDA: batch 64 of 128 x 128,
   fp32 eager and bf16 + channels_last + compile. The variants are timed in turn, in rounds, and
   each figure is the fastest step (noise only ever slows a step down).
2. conditioning: how a network takes the JPEG quality (restorer.models.common.CONDITIONING: none,
   input, decoder, scales), for dncnn, unet and nafnet, each trained blind (configs/cpu.yaml's
   recipe) for the same number of steps (--steps, default 1800: what 8 minutes on 2 ranks of the
   slower, AVX2-only CPU kind train), so a busy machine changes the time, not the figures.
3. budget: the blind recipe (configs/cpu.yaml as it is) against the q10-only one (quality 10, 4:2:0,
   no double JPEG, no conditioning) for the same wall-clock --minutes (or --steps).

Every recipe trains through the project's own loop (`torchrun launch/train.py --config
configs/cpu.yaml` on the demo's photos) and is scored by restorer.tools.evaluate on real photos no
training saw (the demo's held-out astronaut.png and those the installed packages ship; a photo that
is a JPEG itself is used at half size, which takes its own JPEG artifacts away: clean_references):
columns q10 ... q95 (4:2:0), 4:4:4 at q50 and q90, double JPEG 20->50 and 60->90 (the grid shifted
1-7 px), each the mean PSNR gain over the JPEG input, and the worst photo's gain at any column of
quality >= 50. The outputs are scored as restore writes them, moved inside their JPEG files' bins
(restorer.data.jpeg.FileBounds); --network-alone adds a row per recipe with the network's outputs as
they are. The last line printed is one JSON object of the figures.
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
from restorer.tools import demo  # noqa: E402
from restorer.formats.config import load_config  # noqa: E402
from restorer.formats.checkpoint import read_checkpoint  # noqa: E402
from restorer.formats.run_folder import LAST, METRICS  # noqa: E402
from restorer.models import CONDITIONING, MODELS, build_model, count_parameters, macs_per_pixel  # noqa: E402
from restorer.train.loop import Training, train_step  # noqa: E402

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
                batches = [(*(torch.randint(0, 256, (batch, 3, patch, patch), dtype=torch.uint8, generator=gen)
                               for _ in range(2)), torch.randint(10, 96, (batch,), generator=gen).float())
                           for _ in range(2)]
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


# ----------------------------------------------------------------------------- 2, 3. quality of recipes

CONDITIONED = ("dncnn", "unet", "nafnet")
Q10_ONLY = ["data.jpeg.quality=[10,10]", "data.jpeg.quality_weights=[]", "data.jpeg.chroma=420",
            "data.jpeg.double_p=0", "data.val_qualities=[10]", "model.unet.conditioning=none"]
RECIPES = {
    "blind": [],  # configs/cpu.yaml as it is
    "q10": Q10_ONLY,
    **{f"{net}-{cond}": [f"model.name={net}", "model.preset=cpu", f"model.{net}.conditioning={cond}"]
       for net in CONDITIONED for cond in CONDITIONING},
    **{f"{net}-{cond}-plain": [f"model.name={net}", "model.preset=cpu", f"model.{net}.conditioning={cond}",
                               f"model.{net}.correction=plain"]
       for net in CONDITIONED for cond in CONDITIONING if cond != "none"},
    "unet-decoder-psnr": ["model.unet.conditioning=decoder", "optim.loss=psnr"],
    "unet-scales-psnr": ["model.unet.conditioning=scales", "optim.loss=psnr"],
    "unet-decoder-plain-psnr": ["model.unet.conditioning=decoder", "model.unet.correction=plain", "optim.loss=psnr"],
}
SECTIONS = {"conditioning": [f"{net}-{cond}" for net in CONDITIONED for cond in CONDITIONING], "budget": ["blind", "q10"]}
# (column, evaluate's arguments): 4:2:0 qualities, 4:4:4, double JPEG (first quality -> last)
COLUMNS = [*((f"q{q}", dict(qualities=[q])) for q in (10, 30, 50, 70, 90, 95)),
           ("444 q50", dict(qualities=[50], chroma="444")), ("444 q90", dict(qualities=[90], chroma="444")),
           ("2x 20>50", dict(qualities=[50], double=20)), ("2x 60>90", dict(qualities=[90], double=60))]
HIGH = [c for c, kw in COLUMNS if kw["qualities"][0] >= 50]


def run(cmd: list[str], log: Path) -> None:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if p.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"bench/models.py: {' '.join(cmd[:6])} ... failed ({p.returncode}):\n" + "\n".join(tail))


def clean_references(held_out: Path, names: list[str]) -> list[str]:
    """The held-out photos that are JPEGs themselves (skimage's china and flower are q96, grace_hopper
    q80) hold their own artifacts on the very 8x8 grid the scored JPEG uses; at q90 those are a large
    share of the scored JPEG's error, and a network that removes them is scored as if it had added
    them (china at 4:4:4 q90, 1,800 steps: -0.18 dB on the grid, -0.06 with it shifted 4 px, +0.26 at
    half size). Each becomes its half-size (Lanczos) PNG, which averages them away and off the grid.
    Returns the held-out names after the change."""
    from PIL import Image

    from restorer.data.jpeg import file_quality

    out = []
    for name in names:
        path = held_out / name
        if file_quality(path.read_bytes()) is None:
            out.append(name)
            continue
        with Image.open(path) as im:
            half = im.convert("RGB").resize((im.width // 2, im.height // 2), Image.LANCZOS)
        half.save(held_out / f"{path.stem}-half.png")
        path.unlink()
        out.append(f"{path.stem}-half.png")
    return out


def reference_qualities(held_out: Path) -> dict[str, int]:
    """The held-out photos that are JPEGs themselves, and their quality (stem -> q). Such a reference
    holds its own artifacts: at a quality at or above its own, a score would measure how well the
    network keeps them, so it is scored only below (skimage's grace_hopper.jpg is a q80 JPEG)."""
    from restorer.data.jpeg import file_quality

    found = {p.stem: file_quality(p.read_bytes()) for p in sorted(held_out.iterdir())}
    return {stem: q for stem, q in found.items() if q is not None}


def score(ckpt: Path, held_out: Path, file_bounds: bool = True) -> dict:
    """Every column's mean PSNR gain, and per photo, over the columns (evaluate, in this process); with
    `file_bounds` (restore's way) the outputs are moved inside their JPEG files' bins, without it the
    network is scored alone."""
    from restorer.tools.evaluate import Protocol, Runtime, evaluate

    own = reference_qualities(held_out)

    by_args: dict[str, dict] = {}
    for column, kw in COLUMNS:  # one evaluate call per (chroma, double): all its qualities at once
        key = json.dumps({k: v for k, v in kw.items() if k != "qualities"}, sort_keys=True)
        by_args.setdefault(key, {"kw": kw, "columns": []})["columns"].append(column)
    columns, photos = {}, {}
    for group in by_args.values():
        kw = {k: v for k, v in group["kw"].items() if k != "qualities"}
        wanted = {c: dict(COLUMNS)[c]["qualities"][0] for c in group["columns"]}
        protocol = Protocol(tuple(sorted(set(wanted.values()))), file_bounds=file_bounds, **kw)
        result = evaluate(ckpt, held_out, protocol, Runtime("cpu"))["qualities"]
        for column, q in wanted.items():
            images = result[str(q)]["images"]
            gains = {Path(k).stem: v["psnr_model"] - v["psnr_jpeg"] for k, v in images.items()
                     if q < own.get(Path(k).stem, 101)}
            columns[column] = statistics.mean(gains.values())
            for photo, g in gains.items():
                photos.setdefault(photo, {})[column] = g
    worst = min((g, photo, c) for photo, gs in photos.items() for c, g in gs.items() if c in HIGH)
    return {"columns": columns, "photos": photos, "worst_high": worst[0], "worst_high_at": f"{worst[1]} {worst[2]}",
            "reference_qualities": own}


def quality_rows(work: Path, names: list[str], minutes: float, steps: int, nproc: int,
                 network_alone: bool = False) -> tuple[list[dict], list[str]]:
    photos, held_out = work / "photos", work / "held_out"
    held = clean_references(held_out, demo.copy_photos(photos, held_out, more_held_out=True))
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        run([sys.executable, "shard_tools/make_shards.py", str(photos), "--out", str(shards), "--val-count", "1"],
            work / "shards.log")
    budget = [f"train.max_steps={steps}"] if steps else \
        [f"train.max_minutes={minutes}", "train.max_steps=0", "train.epochs=1000000"]
    rows = []
    for name in names:
        out = work / "runs" / name
        print(f"  ... training {name} for {f'{steps} steps' if steps else f'{minutes:g} min'}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
             "launch/train.py", "--config", "configs/cpu.yaml", f"data.shards={shards}", f"train.out_dir={out}",
             "train.resume=false", "train.overwrite=true", "log.progress=false", "log.val_every=0", *budget,
             *RECIPES[name]], work / f"{name}.train.log")
        train_s = time.perf_counter() - t0
        events = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
        network = read_checkpoint(out / LAST).network
        model = network.build()
        done = events[-1]["step"]
        row = {"recipe": name, "network": network.name, "conditioning": network.conditioning,
               "params": count_parameters(model), "steps": done, "steps_per_s": done / train_s}
        rows.append(row | score(out / LAST, held_out))
        if network_alone:
            rows.append(row | {"recipe": f"{name} (alone)"} | score(out / LAST, held_out, file_bounds=False))
    return rows, held


def print_quality(title: str, rows: list[dict], held: list[str]) -> None:
    print(f"\n{title}; {len(held)} held-out photos: {', '.join(held)}")
    if rows and (own := rows[0].get("reference_qualities")):
        print("JPEG references, scored only below their own quality: "
              + ", ".join(f"{stem} (q{q})" for stem, q in own.items()))
    print("mean PSNR gain over the JPEG input (dB); worst: the worst photo at any column of quality >= 50")
    head = f"{'recipe':<24}{'steps':>7}{'steps/s':>8}" + "".join(f"{c:>9}" for c, _ in COLUMNS) + f"{'worst':>8}  where"
    print(head)
    for r in rows:
        print(f"{r['recipe']:<24}{r['steps']:>7}{r['steps_per_s']:>8.1f}" + "".join(f"{r['columns'][c]:>+9.2f}" for c, _ in COLUMNS)
              + f"{r['worst_high']:>+8.2f}  {r['worst_high_at']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="speed,conditioning,budget", help="comma-separated: speed, conditioning, budget")
    ap.add_argument("--minutes", type=float, default=8.0, help="budget: training minutes per recipe (default 8)")
    ap.add_argument("--steps", type=int, default=0, help="budget: train this many steps instead of --minutes; "
                    "conditioning: steps per recipe (default 1800)")
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes per training (default 2, as the demo)")
    ap.add_argument("--recipes", help=f"instead of the sections' recipes: comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--network-alone", action="store_true", help="also score each network alone, its outputs not "
                    "moved inside their JPEG files' bins as restore does (a second row, '(alone)')")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--work", help="folder for shards, runs and logs (default: a temporary one)")
    args = ap.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := [s for s in sections if s not in ("speed", *SECTIONS)]:
        ap.error(f"--sections: unknown {', '.join(unknown)}")
    custom = [n.strip() for n in args.recipes.split(",")] if args.recipes else None
    if custom and (unknown := [n for n in custom if n not in RECIPES]):
        ap.error(f"--recipes: unknown {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    summary: dict = {"device": str(device), "torch": torch.__version__}
    if "speed" in sections and not custom:
        rows = speed_rows(device)
        print_speed(rows, device)
        summary["speed"] = {f"{r['network']}_{r['preset']}": {k: round(v, 2) if isinstance(v, float) else v
                                                              for k, v in r.items() if k not in ("network", "preset")}
                            for r in rows}
    plans = [("custom", custom)] if custom else [(s, SECTIONS[s]) for s in sections if s in SECTIONS]
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for section, names in plans:
            steps = args.steps or (1800 if section == "conditioning" else 0)
            rows, held = quality_rows(work, names, args.minutes, steps, args.nproc, args.network_alone)
            what = f"{steps} steps" if steps else f"{args.minutes:g} min"
            print_quality(f"{section}: {what} of training each ({args.nproc} processes, configs/cpu.yaml)", rows, held)
            summary[section] = {"steps": steps, "minutes": None if steps else args.minutes, "photos": held,
                                **{r["recipe"]: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                                                 if k not in ("recipe", "photos")}
                                   | {"photos": {ph: {c: round(g, 3) for c, g in gs.items()} for ph, gs in r["photos"].items()}}
                                   for r in rows}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
