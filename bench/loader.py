"""Benchmark the training data path: patches/s per core of the seed project's per-sample pipeline,
of ours (shards -> DataLoader at its default settings), of the bare patch work (the floor), and of
ours with the source decode amortized away, all side by side in one run.

    python bench/loader.py [--steps 320] [--workers 2] [--photos 14] [--rounds 2]

Patch 128, JPEG quality 10 (PatchSpec's and JpegSpec's defaults, the seed's distribution). The photos are real
ones (scikit-image's sample photographs) upscaled to 2K class with sensor-like noise (sigma 3), so
they decode like camera pictures: half 2040x1360 PNG, half 2560x1600 JPEG q95. A few base photos
are encoded once; the rest are byte-unique copies of them (a JPEG COM segment / PNG tEXt chunk),
so nothing is dropped as a duplicate while every decode costs what a fresh photo costs. They are
packed with the real shard tool.

  seed       the original per-sample pipeline, one process, files read from disk: open+convert,
             p=0.5 resize the WHOLE image, p=0.5 rotate it (expand), crop, JPEG q10 round trip
  ours       train_loader(DataConfig(shards=...)) at its defaults but `workers`; the batches of the
             start-up (until every worker's shuffle buffer is full) are not timed; per core =
             patches/s / workers (the main process only collects batches)
  floor      training_pair + jpeg.decode on an image already decoded in memory, one process
  amortized  ours with patches_per_image = 100000: one decode per worker, then only patch work
  chroma     ours with data.jpeg.chroma = random (4:4:4, 4:2:2 or 4:2:0 per patch)
  double     ours with data.jpeg.double_p = 1: every patch JPEG-compressed twice (FBCNN's recipe:
             q1 in [10, 95], a 0-7 px shift, then q10), the worst case of that setting
  blind      ours with configs/cpu.yaml's JPEG: qualities 10-95 (3/4 at 10-60), random chroma, a
             quarter double JPEGs: the default recipe's cost against q10 alone

  against    with --against DIR (another checkout, e.g. `git worktree add /tmp/main main`): ours and
             DIR's train_loader at the same settings, each in a process of its own, in turn
             --rounds times: the ratio of the best rounds (the goal: ours >= 0.95 of it)

The alternatives run in turn, `--rounds` times; each figure is the best round (this machine's speed
drifts, and noise only ever slows a run down). The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import multiprocessing
import os
import pstats
import random
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# --against runs this file again with another checkout's restorer (BENCH_RESTORER_TREE) for the same measurement
sys.path.insert(0, os.environ.get("BENCH_RESTORER_TREE") or str(REPO))
from restorer.data import decode_image, jpeg  # noqa: E402
from restorer.data.patches import training_pair  # noqa: E402
try:
    from restorer.formats.config import DataConfig, load_config  # noqa: E402
    from restorer.train.loader import train_loader  # noqa: E402
except ModuleNotFoundError:  # --against a checkout from before the layer folders (37b8cea, the main)
    from restorer.config import DataConfig, load_config  # noqa: E402
    from restorer.data.pipeline import train_loader  # noqa: E402
from restorer.data.sharding import PackOptions, run  # noqa: E402
from shards import unique_variant  # noqa: E402  (bench/shards.py: this folder is on sys.path)

SIZES = {"PNG": (2040, 1360), "JPEG": (2560, 1600)}  # 2.8 MP and 4.1 MP
SOURCES = ["astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg",
           "hubble_deep_field.jpg", "retina.jpg", "ihc.png"]
BASES_PER_FORMAT = 4  # distinct pictures per format; the other photos are byte-unique copies
BATCH = 16
AMORTIZED_PATCHES_PER_IMAGE = 100_000
SEED_SCALES, SEED_ROTATIONS, SEED_QUALITY = (0.9, 0.8, 0.7, 0.6), (90, 180, 270), 10

GOAL_OURS_PER_CORE, GOAL_OURS_VS_SEED, GOAL_AMORTIZED_VS_FLOOR = 1000.0, 70.0, 0.8


# ----------------------------------------------------------------------------- the photos


def base_photo(task: tuple[str, str, int]) -> tuple[str, bytes]:
    """One 2K-class photo, encoded: a real photograph cropped to the aspect, upscaled (bicubic),
    with gaussian noise of sigma 3. Runs in a worker process."""
    name, fmt, seed = task
    import skimage

    im = Image.open(Path(skimage.data_dir) / name).convert("RGB")
    w, h = SIZES[fmt]
    sw, sh = im.size
    if sw * h > sh * w:  # too wide: crop the sides
        cw = sh * w // h
        im = im.crop(((sw - cw) // 2, 0, (sw - cw) // 2 + cw, sh))
    else:
        ch = sw * h // w
        im = im.crop((0, (sh - ch) // 2, sw, (sh - ch) // 2 + ch))
    arr = np.asarray(im.resize((w, h), Image.BICUBIC), np.float32)
    arr += np.random.default_rng(seed).standard_normal(arr.shape, dtype=np.float32) * 3.0
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).save(
        buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return fmt, buf.getvalue()


def make_photos(folder: Path, count: int, workers: int) -> list[Path]:
    """`count` photos, alternately PNG and JPEG, from at most BASES_PER_FORMAT bases per format."""
    import skimage

    names = [n for n in SOURCES if (Path(skimage.data_dir) / n).exists()]
    if not names:
        raise SystemExit("bench/loader.py: scikit-image's sample photos are missing (skimage.data_dir)")
    fmts = ["PNG" if i % 2 else "JPEG" for i in range(count)]
    tasks = []
    for fmt in ("JPEG", "PNG"):
        n = min(BASES_PER_FORMAT, fmts.count(fmt))
        tasks += [(names[(2 * j + (fmt == "PNG")) % len(names)], fmt, len(tasks)) for j in range(n)]
    with multiprocessing.Pool(max(1, min(workers, len(tasks)))) as pool:
        encoded = pool.map(base_photo, tasks, chunksize=1)
    bases = {fmt: [data for f, data in encoded if f == fmt] for fmt in ("JPEG", "PNG")}
    paths = []
    for i, fmt in enumerate(fmts):
        k = fmts[:i].count(fmt)
        data = bases[fmt][k % len(bases[fmt])]
        if k >= len(bases[fmt]):
            data = unique_variant(data, fmt, i)
        path = folder / f"photo_{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def shard_images(out: Path) -> list[bytes]:
    """The image members of every shard (train and val)."""
    blobs = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.isfile() and not m.name.endswith(".json"):
                    blobs.append(tar.extractfile(m).read())
    return blobs


# ----------------------------------------------------------------------------- the alternatives


def seed_sample(path: Path, rnd: random.Random, p: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The seed project's __getitem__, ported as it was: everything on the whole image."""
    img = Image.open(path).convert("RGB")
    if rnd.random() < 0.5:
        s = rnd.choice(SEED_SCALES)
        img = img.resize((int(img.width * s), int(img.height * s)), Image.BICUBIC)
    if rnd.random() < 0.5:
        img = img.rotate(rnd.choice(SEED_ROTATIONS), expand=True)
    x, y = rnd.randint(0, img.width - p), rnd.randint(0, img.height - p)
    target = img.crop((x, y, x + p, y + p))
    buf = io.BytesIO()
    target.save(buf, format="JPEG", quality=SEED_QUALITY)
    buf.seek(0)
    inp = Image.open(buf).convert("RGB")
    return np.asarray(inp), np.asarray(target)


def bench_seed(paths: list[Path], samples: int, round_: int) -> float:
    """Patches/s of one process; the files in a fresh random order each pass, as a shuffled epoch."""
    rnd = random.Random(round_)
    order: list[Path] = []
    while len(order) < samples:
        order += rnd.sample(paths, len(paths))
    t = time.perf_counter()
    for path in order[:samples]:
        inp, target = seed_sample(path, rnd)
        assert inp.shape == target.shape == (128, 128, 3)
    return samples / (time.perf_counter() - t)


def bench_floor(images: list[np.ndarray], patches: int, cfg: DataConfig, round_: int,
                per_image: int) -> tuple[float, float, float, float]:
    """(patches/s, ms in training_pair, ms in jpeg.decode, mean JPEG bytes) per patch, one process."""
    rng = np.random.default_rng([1, round_])
    t_cut = t_dec = 0.0
    nbytes = 0
    clock = time.perf_counter
    t = clock()
    for i in range(patches):
        image = images[(i // per_image) % len(images)]
        a = clock()
        data, target = training_pair(image, cfg.patch, cfg.jpeg, rng)
        b = clock()
        inp = jpeg.decode(data)[0]
        t_cut += b - a
        t_dec += clock() - b
        nbytes += len(data)
    seconds = clock() - t
    assert inp.shape == target.shape == (cfg.patch.size, cfg.patch.size, 3)
    return patches / seconds, t_cut / patches * 1e3, t_dec / patches * 1e3, nbytes / patches


def _children_cpu_seconds() -> float:
    """user+system CPU seconds of this process's live child processes (the DataLoader workers),
    found by their parent pid in /proc (Linux); 0.0 where /proc is absent."""
    tick, me, total = os.sysconf("SC_CLK_TCK"), os.getpid(), 0.0
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return 0.0
    for pid in entries:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def bench_loader(cfg: DataConfig, warmup: int, steps: int, round_: int) -> tuple[float, float, float]:
    """(patches/s, patches per worker CPU second, main process CPU share) of the batches after `warmup`."""
    loader = train_loader(cfg, batch_size=BATCH, seed=round_, steps=warmup + steps)
    patches, last = 0, warmup + steps - 1
    for i, (inputs, targets, _) in enumerate(loader):
        if i == warmup:
            t0, cpu0, main0 = time.perf_counter(), _children_cpu_seconds(), time.process_time()
        elif i > warmup:
            patches += inputs.shape[0]
        if i == last:  # read the clocks here: the workers shut down when the iteration ends
            seconds, cpu = time.perf_counter() - t0, _children_cpu_seconds() - cpu0
            main = time.process_time() - main0
    assert i == last and inputs.shape == targets.shape == (BATCH, 3, cfg.patch.size, cfg.patch.size)
    return patches / seconds, patches / cpu if cpu > 0 else 0.0, main / seconds


def profile_single_process(cfg: DataConfig, batches: int) -> list[str]:
    """Where a patch's time goes: cProfile of the training stream in this process (workers=0), and
    the cost of handing a batch to the main process (what a DataLoader worker adds: the batch is
    pickled into shared memory). Returns the lines to print."""
    import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions)
    from multiprocessing.reduction import ForkingPickler

    loader = train_loader(replace(cfg, workers=0), batch_size=BATCH, seed=0, steps=batches)
    prof = cProfile.Profile()
    prof.enable()
    for inputs, targets, _ in loader:
        pass
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    lines = [f"profile, one process, {batches} batches ({batches * BATCH} patches), {total:.2f} s "
          f"({batches * BATCH / total:.0f} patches/s under the profiler); cumulative time:"]
    wanted = [("decode.py", "decode_image", "source decode"),
              ("patches.py", "training_pair", "training_pair (crop, resize, rotate, JPEG)"),
              ("jpeg.py", "encode", "  of which jpeg.encode"),
              ("loader.py", "_batch", "_batch (jpeg.decode, tables, stack)"),
              ("jpeg.py", "decode", "  of which jpeg.decode"),
              ("tariterators.py", "tar_file_iterator", "tar reading")]
    found = {(Path(file).name, func): row for (file, _, func), row in stats.stats.items()}
    for file, func, label in wanted:
        row = found.get((file, func))
        if row is not None:
            per_patch = row[3] / (batches * BATCH) * 1e3
            lines.append(f"  {label:44} {row[3]:7.2f} s {row[3] / total:6.1%} {per_patch:7.3f} ms/patch")
    n, kept = 50, []
    t = time.perf_counter()
    for _ in range(n):
        batch = (inputs.clone(), targets.clone())
        ForkingPickler.dumps(batch)
        kept = [batch] + kept[:7]  # a prefetch queue's worth stays alive, as in the DataLoader
    transfer = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n):
        batch = (inputs.clone(), targets.clone())
    transfer -= time.perf_counter() - t
    label = "transfer, worker side (pickling into shm)"
    lines.append(f"  {label:44} {transfer / (n * BATCH) * 1e3:24.3f} ms/patch (measured apart, not profiled)")
    return lines


def measure_against(tree: Path, shards: Path, args, warmup: int) -> tuple[list[float], list[float]]:
    """patches/s of this checkout's loader and of `tree`'s, each in a process of its own, in turn."""
    import subprocess

    results: dict[str, list[float]] = {"ours": [], "theirs": []}
    for r in range(args.rounds):
        for name, root in (("ours", REPO), ("theirs", tree)):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", str(shards), "--workers",
                   str(args.workers), "--steps", str(args.steps), "--warmup", str(warmup), "--rounds", str(r)]
            env = os.environ | {"BENCH_RESTORER_TREE": str(root.resolve())}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            results[name].append(float(out.split()[-1]))
    return results["ours"], results["theirs"]


# ----------------------------------------------------------------------------- main


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=320,
                    help="timed batches (of 16) per DataLoader run, after the start-up batches (default 320)")
    ap.add_argument("--workers", type=int, default=_cores(),
                    help="DataLoader workers, one per core (default: the cores)")
    ap.add_argument("--photos", type=int, default=14, help="photos in the set (default 14)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each alternative; the best counts (default 2)")
    ap.add_argument("--seed-samples", type=int, default=40, help="samples timed for the seed pipeline (default 40)")
    ap.add_argument("--floor-patches", type=int, default=1500, help="patches timed for the floor (default 1500)")
    ap.add_argument("--profile", type=int, default=0, metavar="BATCHES",
                    help="also cProfile this many batches of the stream in one process (default 0: off)")
    ap.add_argument("--against", metavar="DIR", help="also measure another checkout's loader (see above)")
    ap.add_argument("--measure", metavar="SHARDS", help=argparse.SUPPRESS)  # (the child of --against)
    ap.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # one measurement, in the restorer BENCH_RESTORER_TREE names: patches/s on stdout
        pps, _, _ = bench_loader(DataConfig(shards=args.measure, workers=args.workers), args.warmup, args.steps,
                                 args.rounds)
        print(pps)
        return
    if args.workers < 1 or args.photos < 4 or args.steps < 1 or args.rounds < 1:
        ap.error("--workers >= 1, --photos >= 4, --steps >= 1, --rounds >= 1")

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        src, out = Path(tmp) / "photos", Path(tmp) / "shards"
        src.mkdir()
        paths = make_photos(src, args.photos, args.workers)
        photo_bytes = sum(p.stat().st_size for p in paths)
        manifest = run(PackOptions(sources=(str(src),), val_count=1, maxcount=4, min_side=128), out,
                       workers=args.workers, force=True, log=lambda *a: None)
        assert manifest["images"]["kept"] == args.photos, manifest["images"]
        t_setup = time.perf_counter() - t_start

        blobs = shard_images(out)
        images = [decode_image(b) for b in blobs]  # also warms Pillow
        decode_s: dict[str, list[float]] = {"PNG": [], "JPEG": []}
        for b in blobs:
            t = time.perf_counter()
            decode_image(b)
            decode_s[Image.open(io.BytesIO(b)).format].append(time.perf_counter() - t)
        decode_ms = sum(map(sum, decode_s.values())) / len(blobs) * 1e3
        decode_fmt_ms = {k: float(np.mean(v)) * 1e3 for k, v in decode_s.items() if v}

        cfg = DataConfig(shards=str(out), workers=args.workers)
        amortized_cfg = replace(cfg, patches_per_image=AMORTIZED_PATCHES_PER_IMAGE)
        chroma_cfg = replace(cfg, jpeg=replace(cfg.jpeg, chroma="random"))
        double_cfg = replace(cfg, jpeg=replace(cfg.jpeg, double_p=1.0))
        blind_cfg = replace(cfg, jpeg=load_config(str(REPO / "configs" / "cpu.yaml")).data.jpeg)
        # start-up: until every worker's shuffle buffer is full and its prefetch queue has turned over
        warmup = math.ceil(cfg.shuffle_buffer * args.workers / BATCH) + 4 * args.workers + 8
        spec = cfg.patch
        loaders = {"ours": cfg, "amortized": amortized_cfg, "chroma": chroma_cfg, "double": double_cfg, "blind": blind_cfg}

        rows: dict[str, list[float]] = {"seed": [], "floor": [], **{name: [] for name in loaders}}
        cpu: dict[str, list[float]] = {name: [] for name in loaders}
        main_share: dict[str, list[float]] = {name: [] for name in loaders}
        floor_split = []
        for r in range(args.rounds):
            rows["seed"].append(bench_seed(paths, args.seed_samples, r))
            fps, cut_ms, dec_ms, jpeg_bytes = bench_floor(images, args.floor_patches, cfg, r, cfg.patches_per_image)
            rows["floor"].append(fps)
            floor_split.append((cut_ms, dec_ms, jpeg_bytes))
            for name, c in loaders.items():
                pps, per_cpu, share = bench_loader(c, warmup, args.steps, r)
                rows[name].append(pps / args.workers)
                cpu[name].append(per_cpu)
                main_share[name].append(share)

        profile = profile_single_process(cfg, args.profile) if args.profile else []
        against = measure_against(Path(args.against), out, args, warmup) if args.against else None

    best = {k: max(v) for k, v in rows.items()}
    ours_vs_seed = best["ours"] / best["seed"]
    amortized_vs_floor = best["amortized"] / best["floor"]
    floor_ms = 1e3 / best["floor"]
    cut_ms, dec_ms, jpeg_bytes = floor_split[int(np.argmax(rows["floor"]))]  # the best round's
    p = spec.size
    buffer_mb = cfg.shuffle_buffer * (p * p * spec.channels + jpeg_bytes) / 2**20
    n_png = sum(1 for q in paths if q.suffix == ".png")
    total_s = time.perf_counter() - t_start

    print(f"{args.photos} photos ({n_png} PNG 2040x1360, {args.photos - n_png} JPEG q95 2560x1600, "
          f"{photo_bytes / 1e6:.0f} MB), patch {p}, JPEG q{cfg.jpeg.quality[0]}, batch {BATCH}, "
          f"{args.workers} workers, {os.cpu_count()} cores; {args.rounds} rounds, best counts")
    print(f"DataLoader runs: {warmup} start-up batches untimed, then {args.steps} timed; "
          f"patches_per_image {cfg.patches_per_image} (amortized: {AMORTIZED_PATCHES_PER_IMAGE})")
    print(f"{'':10} {'patches/s/core':>15} {'rounds':>17} {'ms/patch':>9} {'per CPU-s':>10} {'main CPU':>9}  goal")
    goals = {
        "seed": "",
        "ours": f">= {GOAL_OURS_PER_CORE:.0f}/core: {'ok' if best['ours'] >= GOAL_OURS_PER_CORE else 'BELOW'}; "
                f">= {GOAL_OURS_VS_SEED:.0f}x seed: {ours_vs_seed:.0f}x "
                f"{'ok' if ours_vs_seed >= GOAL_OURS_VS_SEED else 'BELOW'}",
        "floor": "",
        "amortized": f">= {GOAL_AMORTIZED_VS_FLOOR} of floor: {amortized_vs_floor:.2f} "
                     f"{'ok' if amortized_vs_floor >= GOAL_AMORTIZED_VS_FLOOR else 'BELOW'}",
        "chroma": f"{best['chroma'] / best['ours']:.2f}x ours (the cost of that setting)",
        "double": f"{best['double'] / best['ours']:.2f}x ours (the cost of that setting)",
        "blind": f"{best['blind'] / best['ours']:.2f}x ours (configs/cpu.yaml's JPEG against q10 alone)",
    }
    for name in ("seed", "ours", "floor", "amortized", "chroma", "double", "blind"):
        per_cpu = f"{max(cpu[name]):10.0f}" if max(cpu.get(name, [0])) > 0 else f"{'':>10}"
        share = f"{max(main_share[name]):8.0%}" if name in main_share else f"{'':>8}"
        rounds = " ".join(f"{v:.0f}" for v in rows[name])
        print(f"{name:10} {best[name]:15.1f} {rounds:>17} {1e3 / best[name]:9.3f} {per_cpu} {share:>9}  {goals[name]}")
    by_fmt = ", ".join(f"{k} {v:.1f}" for k, v in decode_fmt_ms.items())
    print(f"source decode (decode_image on the shard bytes, mean of {len(blobs)}): {decode_ms:.1f} ms ({by_fmt}) "
          f"= {decode_ms / floor_ms:.0f} floor patches; floor per patch {floor_ms:.3f} ms "
          f"(training_pair {cut_ms:.3f}, jpeg.decode {dec_ms:.3f})")
    print(f"expected ours/core from decode + {cfg.patches_per_image} floor patches: "
          f"{cfg.patches_per_image / (decode_ms + cfg.patches_per_image * floor_ms) * 1e3:.0f}; "
          f"shuffle buffer per worker: {cfg.shuffle_buffer} x ({p}*{p}*{spec.channels} + {jpeg_bytes:.0f} JPEG) "
          f"bytes = {buffer_mb:.1f} MiB")
    print(f"ratios: ours/seed {ours_vs_seed:.1f}x, amortized/floor {amortized_vs_floor:.3f}; "
          f"per CPU-s: patches per second of worker CPU time; main CPU: the main process's CPU / wall time; "
          f"set-up {t_setup:.1f} s, total {total_s:.1f} s")
    for line in profile:
        print(line)
    if against is not None:
        ours, theirs = against
        print(f"against {args.against}: ours {max(ours):.1f} patches/s ({' '.join(f'{v:.0f}' for v in ours)}), "
              f"theirs {max(theirs):.1f} ({' '.join(f'{v:.0f}' for v in theirs)}): ours/theirs "
              f"{max(ours) / max(theirs):.3f} (goal >= 0.95: {'ok' if max(ours) / max(theirs) >= 0.95 else 'BELOW'})")
    print(json.dumps({
        **({"against_ratio": round(max(against[0]) / max(against[1]), 3)} if against is not None else {}),
        "seed": round(best["seed"], 2), "ours": round(best["ours"], 1), "floor": round(best["floor"], 1),
        "amortized_vs_floor": round(amortized_vs_floor, 3), "ours_vs_seed": round(ours_vs_seed, 1),
        "amortized": round(best["amortized"], 1), "ours_per_cpu_s": round(max(cpu["ours"]), 1),
        "amortized_per_cpu_s": round(max(cpu["amortized"]), 1),
        "chroma_random": round(best["chroma"], 1), "double_jpeg": round(best["double"], 1),
        "double_vs_ours": round(best["double"] / best["ours"], 3),
        "blind": round(best["blind"], 1), "blind_vs_ours": round(best["blind"] / best["ours"], 3),
        "decode_ms": round(decode_ms, 2), "floor_ms": round(floor_ms, 4),
        "buffer_mib_per_worker": round(buffer_mb, 1), "patches_per_image": cfg.patches_per_image,
        "workers": args.workers, "photos": args.photos, "steps": args.steps, "rounds": args.rounds,
    }))


if __name__ == "__main__":
    main()
