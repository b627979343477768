"""Benchmark the training stream's resumption and reads: the time to the first step of a loader
started fresh, and resumed at 1% and at 99% of a large epoch; and the bytes an epoch reads across
the job, at 1, 2 and 40 streams over 8 shards, against the shards' size. All in one run.

    python bench/stream.py [--images 20000] [--workers 2] [--rounds 3]

The shard set: `--images` small JPEG photos (byte-unique: each carries its number in a COM segment)
in 8 shards, written with tarfile and described by a manifest the way the shard tool does.

  first step    train_loader(step=s) built and its first micro-batch taken: the tar headers indexed,
                the DataLoader's workers started, each lane's window decoded up to its position.
                The best of --rounds at each position, the positions in turn.
  bytes read    every lane of a global batch of 40 run through one image epoch by streams of its
                lanes (one ImageReader each, as a DataLoader worker has; the images' bytes are read,
                their decode is skipped), the bytes they read summed;
                against the shards' size and their image members' size. What main's streaming
                pipeline read at the same stream counts is counted from its rule (a stream reads its
                own shards, or all of them when there are fewer shards than streams).

The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from restorer.formats.config import DataConfig  # noqa: E402
from restorer.data.jpeg import JpegSpec  # noqa: E402
from restorer.data.manifest import build_manifest, shard_paths, write_manifest  # noqa: E402
from restorer.data.patches import PatchSpec  # noqa: E402
from restorer.data.stream import ImageReader, StreamPlan, index_shards, lane_patches, worker_lanes  # noqa: E402
from restorer.train.loader import train_loader  # noqa: E402

SHARDS = 8
PATCHES_PER_IMAGE = 64
BATCH = 8
GOAL_POSITION_RATIO, GOAL_VS_FRESH = 1.5, 2.0


def make_shards(out: Path, images: int) -> Path:
    """`images` JPEGs (160 x 120, a few pictures made byte-unique) in SHARDS train shards and one val shard."""
    rng = np.random.default_rng(0)
    bases = []
    for i in range(4):
        yy, xx = np.mgrid[0:120, 0:160]
        pic = (128 + 60 * np.sin(xx * (0.05 + 0.02 * i)) * np.cos(yy * 0.04) + rng.normal(0, 10, (120, 160)))
        pic = np.clip(np.stack([pic, np.roll(pic, 7, 1), np.roll(pic, 13, 0)], -1), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pic).save(buf, format="JPEG", quality=92)
        bases.append(buf.getvalue())
    out.mkdir(parents=True)
    records = {"train": [], "val": []}
    per_shard = -(-images // SHARDS)
    for split, count, shards in (("train", images, SHARDS), ("val", 2, 1)):
        for s in range(shards):
            name = f"{split}-{s:06d}.tar"
            n = min(per_shard, count - s * per_shard) if split == "train" else count
            with tarfile.open(out / name, "w") as tar:
                for i in range(n):
                    base = bases[i % len(bases)]
                    data = base[:2] + b"\xff\xfe" + (8).to_bytes(2, "big") + f"{s:02d}{i:04d}".encode() + base[2:]
                    for ext, payload in (("jpg", data), ("json", b"{}")):
                        info = tarfile.TarInfo(f"{split}{s}_{i:06d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
            size = (out / name).stat().st_size
            records[split].append({"name": name, "samples": n, "bytes": size, "sha256": "0" * 64})
    manifest = build_manifest({}, "bench", records, {k: sum(r["samples"] for r in v) for k, v in records.items()},
                              images + 2, [], [])
    write_manifest(out, manifest)
    return out


def first_step_seconds(cfg: DataConfig, step: int) -> float:
    t = time.perf_counter()
    loader = train_loader(cfg, batch_size=BATCH, seed=0, world_size=1, step=step)
    next(iter(loader))
    seconds = time.perf_counter() - t
    del loader
    return seconds


def epoch_bytes(shards: Path, streams: int, lanes: int = 40) -> int:
    """Bytes one image epoch reads across `streams` streams sharing a global batch of `lanes`."""
    paths = shard_paths(shards, "train")
    import restorer.data.manifest as manifest

    counts = [sh["samples"] for sh in manifest.load_manifest(shards)["splits"]["train"]["shards"]]
    index = index_shards(paths, counts)
    # (4 patches an image: what is read does not depend on it, and the bench's patches are cut faster)
    plan = StreamPlan(seed=0, images=len(index), lanes=lanes, patches_per_image=4, window_images=1)
    total = 0
    for stream in range(streams):
        reader = ImageReader(index)
        mine = worker_lanes(range(lanes), stream, streams)
        if len(mine):
            counting = _Counting(reader)
            for _, _ in zip(range(plan.steps_per_image_epoch), lane_patches(plan, mine, 0, counting, PatchSpec(size=8),
                                                                             JpegSpec(), lambda *a: None)):
                pass
        total += reader.bytes_read
    return total


class _Counting:
    """An ImageReader that reads the bytes and skips the decode and the patches (what is measured is
    the reading): every image is a 16 x 16 grey picture to the lanes."""

    def __init__(self, reader: ImageReader):
        self.reader, self.index = reader, reader.index

    def decode(self, i: int) -> np.ndarray:
        self.reader.read(i)
        return np.full((16, 16, 3), 128, np.uint8)


def main_pipeline_bytes(shard_bytes: list[int], streams: int) -> int:
    """What main's streams read an epoch: their own shards, or every shard when there are fewer shards than streams."""
    if len(shard_bytes) >= streams:
        return sum(shard_bytes)
    return sum(shard_bytes) * streams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000, help="training images (default 20000)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="tries of each position; the best counts (default 3)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        shards = make_shards(Path(tmp) / "shards", args.images)
        cfg = DataConfig(shards=str(shards), workers=args.workers, patches_per_image=PATCHES_PER_IMAGE,
                         shuffle_buffer=4 * PATCHES_PER_IMAGE, patch=PatchSpec(size=64))
        steps = len(train_loader(cfg, batch_size=BATCH, seed=0))
        positions = {"fresh (step 0)": 0, "1% of the epoch": steps // 100, "99% of the epoch": steps * 99 // 100}
        best = {name: float("inf") for name in positions}
        for _ in range(args.rounds):
            for name, step in positions.items():
                best[name] = min(best[name], first_step_seconds(cfg, step))
        print(f"time to the first step: {args.images:,} images, {steps:,} steps an epoch (batch {BATCH}, "
              f"{PATCHES_PER_IMAGE} patches an image), {args.workers} workers; best of {args.rounds}")
        for name, step in positions.items():
            print(f"  {name:18} step {step:>7,}  {best[name]:6.2f} s  ({best[name] / best['fresh (step 0)']:.2f}x fresh)")
        late, early, fresh = best["99% of the epoch"], best["1% of the epoch"], best["fresh (step 0)"]
        ratio = max(late, early) / min(late, early)
        print(f"  99% against 1%: {late / early:.2f}x (goal within {GOAL_POSITION_RATIO}x: "
              f"{'ok' if ratio <= GOAL_POSITION_RATIO else 'MISSED'}); slowest resume against fresh: "
              f"{max(late, early) / fresh:.2f}x (goal <= {GOAL_VS_FRESH}x: "
              f"{'ok' if max(late, early) / fresh <= GOAL_VS_FRESH else 'MISSED'})")

        shard_bytes = [p.stat().st_size for p in sorted(shards.glob("train-*.tar"))]
        import restorer.data.manifest as manifest

        counts = [sh["samples"] for sh in manifest.load_manifest(shards)["splits"]["train"]["shards"]]
        image_bytes = int(index_shards(shard_paths(shards, "train"), counts).size.sum())
        print(f"\nbytes read in one image epoch (global batch 40, {SHARDS} shards of {sum(shard_bytes) / 2**20:.1f} MiB "
              f"together, image members {image_bytes / 2**20:.1f} MiB)")
        print(f"  {'streams':>7}  {'lanes read':>12}  {'x shards':>8}  {'x images':>8}  {'main read':>12}  {'x shards':>8}")
        reads = {}
        for streams in (1, 2, 40):
            ours, theirs = epoch_bytes(shards, streams), main_pipeline_bytes(shard_bytes, streams)
            reads[streams] = {"bytes": ours, "x_shards": ours / sum(shard_bytes), "x_images": ours / image_bytes,
                              "main_x_shards": theirs / sum(shard_bytes)}
            print(f"  {streams:>7}  {ours:>12,}  {ours / sum(shard_bytes):>8.3f}  {ours / image_bytes:>8.3f}  "
                  f"{theirs:>12,}  {theirs / sum(shard_bytes):>8.2f}")
    print(json.dumps({"images": args.images, "steps_per_epoch": steps, "first_step_s": best,
                      "late_vs_early": late / early, "resume_vs_fresh": max(late, early) / fresh, "bytes": reads}))


if __name__ == "__main__":
    main()
