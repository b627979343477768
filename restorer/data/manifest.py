"""The shard set's manifest.json, its one owner: its names, how it is written (by the shard tool),
read (by the trainer and the tools) and checked against the shards on disk.

    format, version        "restorer-shards", FORMAT_VERSION
    args, plan             the shard tool's arguments and the fingerprint of its plan (to resume)
    splits.{train,val}     samples, images, bytes, and every shard: name, samples, bytes, sha256
    images                 found, kept, rejected, duplicates
    rejected, duplicates   every rejected input with one reason; every duplicate and what it copies
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from restorer.fileio import atomic_write_json

from restorer.errors import RestorerError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "restorer-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


class ManifestError(RestorerError):
    """A manifest that cannot be used; the message is one line for the user."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def manifest_path(shards: str | os.PathLike) -> Path:
    """`shards` is a shard folder or its manifest.json."""
    p = Path(shards)
    return p / MANIFEST_NAME if p.is_dir() else p


def load_manifest(shards: str | os.PathLike) -> dict:
    """Read and check a manifest; raises ManifestError with a one-line reason."""
    path = manifest_path(shards)
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"no shard manifest at {path} (make one with shard_tools/make_shards.py)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path} is not a restorer shard manifest")
    if m.get("version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has format version {m.get('version')}, this restorer reads {FORMAT_VERSION}")
    for split in SPLITS:
        part = m.get("splits", {}).get(split) if isinstance(m.get("splits"), dict) else None
        if not isinstance(part, dict) or not isinstance(part.get("shards"), list) or not isinstance(part.get("samples"), int) \
                or not all(isinstance(sh, dict) and {"name", "bytes", "sha256"} <= sh.keys() for sh in part["shards"]):
            raise ManifestError(f"{path} has no usable splits.{split} (shards with name, bytes and sha256; samples): "
                                "make it again with make_shards.py")
    return m


def shard_paths(shards: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths of one split's shards, in manifest order."""
    path = manifest_path(shards)
    m = load_manifest(path)
    return [str(path.parent.resolve() / sh["name"]) for sh in m["splits"][split]["shards"]]


def build_manifest(args: dict, plan: str, shards: dict[str, list[dict]], images: dict[str, int], found: int,
                   rejected: list[dict], duplicates: list[dict]) -> dict:
    """The manifest of a finished shard set: `shards` per split are the shard tool's records (name,
    samples, bytes, sha256, ...), `images` the images per split."""
    def split(records: list[dict], n_images: int) -> dict:
        return {"samples": sum(r["samples"] for r in records), "images": n_images,
                "bytes": sum(r["bytes"] for r in records),
                "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in records]}

    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "args": args, "plan": plan,
            "splits": {name: split(shards[name], images[name]) for name in SPLITS},
            "images": {"found": found, "kept": sum(images.values()), "rejected": len(rejected),
                       "duplicates": len(duplicates)},
            "rejected": rejected, "duplicates": duplicates}


def write_manifest(out: str | os.PathLike, manifest: dict) -> Path:
    """OUT/manifest.json, atomically: written last, it only ever names complete shards. A manifest
    already there with the same content is left as it is (a rerun on a finished folder touches nothing)."""
    path = Path(out) / MANIFEST_NAME
    try:
        if json.loads(path.read_text(encoding="utf-8")) == manifest:
            return path
    except (OSError, ValueError):
        pass
    atomic_write_json(path, manifest)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_shards(shards: str | os.PathLike, verify: bool = False, share: tuple[int, int] = (0, 1)) -> None:
    """Every shard the manifest lists exists with the size it records (and, with `verify`, its
    sha256: of the shards of `share` = (i, n), every n-th from the i-th, so n ranks can split the
    reading): shards rewritten or cut short after the manifest are caught before training.
    ManifestError (one line) otherwise."""
    path = manifest_path(shards)
    manifest = load_manifest(shards)
    listed = [shard for split in SPLITS for shard in manifest["splits"][split]["shards"]]
    for i, shard in enumerate(listed):
        file = path.parent / shard["name"]
        try:
            size = file.stat().st_size
        except OSError:
            raise ManifestError(f"shard {file} is listed in {path} but cannot be read") from None
        if size != shard["bytes"]:
            raise ManifestError(f"shard {file} is {size} bytes, {path} says {shard['bytes']}: the shards changed "
                                "after the manifest was written; run make_shards.py again")
        if verify and i % share[1] == share[0] and sha256_file(file) != shard["sha256"]:
            raise ManifestError(f"shard {file} does not match the sha256 in {path}: run make_shards.py again")
