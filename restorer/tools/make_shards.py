"""The shard tool's command line: `python shard_tools/make_shards.py SRC [SRC ...] --out DIR`
(also `python -m restorer make-shards` and `restorer-make-shards`). Its logic lives in
restorer.data.sharding, the manifest in restorer.data.manifest."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional

from restorer.base.cli import Parser, UsageError, run
from restorer.data.decode import DEFAULT_MAX_PIXELS
from restorer.data.sharding import DEFAULT_MAX_BYTES, PROG, PackOptions
from restorer.data.sharding import run as pack


def build_parser() -> Parser:
    p = Parser(
        prog=PROG,
        description="Pack photos into WebDataset tar shards (train-NNNNNN.tar, val-NNNNNN.tar, "
        "manifest.json). Original bytes are kept; broken files are rejected with a reason.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="folder (walked recursively), image file, or text file listing paths (one a line)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and manifest.json")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.01,
                     help="fraction of images held out for validation (default 0.01; at least 1 image "
                     "when the fraction is > 0 and 2 or more images are kept)")
    val.add_argument("--val-count", type=int, help="exact number of images held out for validation")
    p.add_argument("--maxcount", type=int, default=1000, help="max samples per shard (default 1000)")
    p.add_argument("--maxsize", type=_size, default="256M",
                   help="max bytes per shard, e.g. 256M, 1G (default 256M; a single larger sample gets a shard of its own; "
                   "with --tile, tiles count at their largest possible PNG size, so shards come out smaller)")
    p.add_argument("--min-side", type=int, default=128, help="reject images whose short side is smaller (default 128)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"reject images with more pixels (decompression bombs; default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--max-bytes", type=_size, default=str(DEFAULT_MAX_BYTES),
                   help=f"reject files larger than this, e.g. 100M, 1G (default {DEFAULT_MAX_BYTES // 1024**2}M); "
                   "files that are not regular files (FIFOs, devices, sockets) are rejected whatever their size")
    p.add_argument("--tile", type=int, metavar="SIZE",
                   help="cut each image into SIZExSIZE lossless PNG tiles (edge tiles aligned to the border); off by default")
    p.add_argument("--workers", type=int, default=_cpu_count(), help="worker processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="shuffle and split seed (default 0)")
    p.add_argument("--force", action="store_true", help="delete shards and manifest in DIR and start over")
    return p


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500000, 256M, 1G)")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def options_from_args(a: argparse.Namespace) -> PackOptions:
    if a.maxcount < 1:
        raise UsageError(f"--maxcount must be >= 1, got {a.maxcount}")
    if a.maxsize < 1:
        raise UsageError(f"--maxsize must be > 0, got {a.maxsize}")
    if a.max_bytes < 1:
        raise UsageError(f"--max-bytes must be > 0, got {a.max_bytes}")
    if a.min_side < 1:
        raise UsageError(f"--min-side must be >= 1, got {a.min_side}")
    if a.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {a.workers}")
    if a.val_count is not None and a.val_count < 0:
        raise UsageError(f"--val-count must be >= 0, got {a.val_count}")
    if not 0.0 <= a.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {a.val_fraction}")
    if a.tile is not None and a.tile < a.min_side:
        raise UsageError(f"--tile {a.tile} is smaller than --min-side {a.min_side}")
    sources = []
    for s in a.sources:
        if not os.path.exists(s):
            raise UsageError(f"source does not exist: {s}")
        sources.append(os.path.abspath(s))
    return PackOptions(
        sources=tuple(sources),
        val_fraction=0.0 if a.val_count is not None else a.val_fraction,
        val_count=a.val_count,
        maxcount=a.maxcount,
        maxsize=a.maxsize,
        min_side=a.min_side,
        seed=a.seed,
        tile=a.tile,
        max_pixels=a.max_pixels,
        max_bytes=a.max_bytes,
    )


def main(argv: Optional[list[str]] = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        pack(options_from_args(args), Path(args.out), args.workers, args.force)
        return 0

    return run(PROG, body, interrupted="interrupted; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
