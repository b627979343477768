"""Benchmark the shard tool: images/s and MB/s with 1 and 2 workers, and the cost per image
measured against one plain decode of the same image, all in one run.

    python bench/shards.py [--images 240] [--workers 1 2]

The set: 1-2 MP photographs (scikit-image's sample photos, upscaled, with sensor-like noise so they
decode like camera pictures; synthetic ones if scikit-image is absent), half JPEG q95 and half PNG.
A few base pictures are encoded once; each file is made byte-unique with a comment (JPEG COM / PNG
tEXt) so nothing is dropped as a duplicate while every decode costs the same as a fresh photo.
The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from restorer.data.sharding import PackOptions, run  # noqa: E402

SIZES = {"JPEG": (1600, 1000), "PNG": (1280, 960)}  # 1.6 MP and 1.2 MP


def base_photos(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    try:
        import skimage

        folder = Path(skimage.data_dir)
        names = ["astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg",
                 "hubble_deep_field.jpg", "ihc.png", "retina.jpg"]
        sources = [Image.open(folder / n).convert("RGB") for n in names if (folder / n).exists()]
    except ImportError:
        sources = []
    if not sources:  # smooth gradients: a weaker stand-in for real photographs
        yy, xx = np.mgrid[0:500, 0:700]
        sources = [Image.fromarray(np.stack([(np.sin(xx / (9 + c + k)) * np.cos(yy / (13 + k)) * 100 + 128)
                                             for c in range(3)], -1).astype(np.uint8)) for k in range(4)]
    photos = []
    for i in range(count):
        fmt = "JPEG" if i % 2 == 0 else "PNG"
        im = sources[i % len(sources)].resize(SIZES[fmt], Image.BICUBIC)
        arr = np.asarray(im, np.float32) + rng.normal(0, 4, (SIZES[fmt][1], SIZES[fmt][0], 3))
        photos.append(np.clip(arr, 0, 255).astype(np.uint8))
    return photos


def unique_variant(data: bytes, fmt: str, tag: int) -> bytes:
    """The same picture with a different byte string: a JPEG COM segment or a PNG tEXt chunk."""
    text = f"bench copy {tag}".encode()
    if fmt == "JPEG":  # after SOI (FFD8)
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[2:]
    body = b"tEXt" + b"Comment\x00" + text  # before IEND (the last 12 bytes)
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return data[:-12] + chunk + data[-12:]


def make_set(folder: Path, n_images: int) -> int:
    bases = []
    for i, arr in enumerate(base_photos(8)):
        fmt = "JPEG" if i % 2 == 0 else "PNG"
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        bases.append((fmt, buf.getvalue()))
    total = 0
    for i in range(n_images):
        fmt, data = bases[i % len(bases)]
        data = unique_variant(data, fmt, i)
        (folder / f"photo_{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}").write_bytes(data)
        total += len(data)
    return total


def plain_decode_seconds(folder: Path) -> float:
    """Total time of one PIL open+load per file, bytes already in memory: the floor for checking."""
    blobs = [p.read_bytes() for p in sorted(folder.iterdir())]
    t = time.perf_counter()
    for data in blobs:
        Image.open(io.BytesIO(data)).load()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        src = Path(tmp) / "photos"
        src.mkdir()
        total_bytes = make_set(src, args.images)
        plain_decode_seconds(src)  # warm the page cache and Pillow
        warmup = tuple(str(p) for p in sorted(src.iterdir())[:16])  # the first run is otherwise ~8% slower
        run(PackOptions(sources=warmup, maxcount=4), Path(tmp) / "warmup", workers=max(args.workers), force=True,
            log=lambda *a: None)
        rows = []
        for workers in args.workers:
            decode_before = plain_decode_seconds(src)
            os.sync()  # each run pays for flushing its own shards only, not what was written before
            out = Path(tmp) / f"out{workers}"
            opts = PackOptions(sources=(str(src),), val_fraction=0.01, maxcount=25)
            t = time.perf_counter()
            manifest = run(opts, out, workers=workers, force=True, log=lambda *a: None)
            seconds = time.perf_counter() - t
            # the decode reference is the mean of one pass just before and one just after the run:
            # this machine's speed drifts by 10-20% over seconds
            decode_s = (decode_before + plain_decode_seconds(src)) / 2
            assert manifest["images"]["kept"] == args.images
            rows.append({"workers": workers, "seconds": seconds, "images_per_s": args.images / seconds,
                         "mb_per_s": total_bytes / 1e6 / seconds,
                         "cost_vs_decode": seconds * workers / decode_s, "decode_ms": decode_s / args.images * 1e3})

    print(f"{args.images} images (half JPEG q95 1600x1000, half PNG 1280x960), {total_bytes / 1e6:.0f} MB, "
          f"{os.cpu_count()} cores")
    print(f"{'workers':>7} {'seconds':>8} {'images/s':>9} {'MB/s':>7} {'decode ms':>10} "
          f"{'cost/decode':>12} {'speed-up':>9}")
    for r in rows:
        print(f"{r['workers']:7d} {r['seconds']:8.2f} {r['images_per_s']:9.1f} {r['mb_per_s']:7.1f} "
              f"{r['decode_ms']:10.1f} {r['cost_vs_decode']:11.2f}x {rows[0]['seconds'] / r['seconds']:8.2f}x")
    print("cost/decode: worker-seconds spent per image / one plain decode of it (goal <= 1.25); "
          "speed-up vs the first row (goal: near-linear)")
    print(json.dumps({
        "images": args.images, "megabytes": round(total_bytes / 1e6, 1),
        **{f"images_per_s_{r['workers']}w": round(r["images_per_s"], 2) for r in rows},
        **{f"mb_per_s_{r['workers']}w": round(r["mb_per_s"], 2) for r in rows},
        **{f"cost_vs_decode_{r['workers']}w": round(r["cost_vs_decode"], 3) for r in rows},
        "speedup": round(rows[0]["seconds"] / rows[-1]["seconds"], 3),
    }))


if __name__ == "__main__":
    main()
