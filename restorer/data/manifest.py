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
import re
import stat
from pathlib import Path
from typing import Any, Optional

from restorer.base.fileio import atomic_write_json

from restorer.base.errors import RestorerError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "restorer-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
MAX_MANIFEST_BYTES = 1024**3  # far more than any shard set's manifest: a bound, not a budget
REMAKE = "make it again with shard_tools/make_shards.py"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(RestorerError):
    """A manifest that cannot be used; the message is one line for the user."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def manifest_path(shards: str | os.PathLike) -> Path:
    """`shards` is a shard folder or its manifest.json."""
    p = Path(shards)
    return p / MANIFEST_NAME if p.is_dir() else p


def read_json_file(path: Path) -> Any:
    """A JSON file's content, or ManifestError naming it and why. Only a regular file is read (a
    FIFO would block, /dev/zero never ends) and only up to MAX_MANIFEST_BYTES. FileNotFoundError
    is left to the caller: a missing file means something else to each."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"{path} is not a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} is {st.st_size:,} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES:,})")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise ManifestError(f"{path} is not valid JSON (nested too deeply)") from None


def is_plain_file_name(name: Any) -> bool:
    """A name that can only mean a file in the manifest's own folder: no folder separator, no `..`,
    not absolute, no scheme (`pipe:`, `http:`)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\:\0")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def manifest_problem(m: Any) -> Optional[str]:
    """What makes `m` unusable as a shard manifest (the structure and types every reader relies on),
    or None."""
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        return "is not a restorer shard manifest"
    if m.get("version") != FORMAT_VERSION:
        version = m.get("version")
        return f"has format version {version if _is_count(version) else '?'}, this restorer reads {FORMAT_VERSION}"
    splits = m.get("splits")
    for split in SPLITS:
        where = f"splits.{split}"
        part = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(part, dict):
            return f"has no usable {where}"
        if not _is_count(part.get("samples")):
            return f"has no sample count in {where}.samples"
        if not isinstance(part.get("shards"), list):
            return f"has no list of shards in {where}.shards"
        for i, shard in enumerate(part["shards"]):
            at = f"{where}.shards[{i}]"
            if not isinstance(shard, dict) or not {"name", "bytes", "sha256"} <= shard.keys():
                return f"has a shard without name, bytes or sha256 in {at}"
            if not isinstance(shard["name"], str):
                return f"has a name that is not a string in {at}"
            if not is_plain_file_name(shard["name"]):
                return (f"names a shard outside its folder in {at}: {shard['name'][:100]!r} "
                        "(a shard is a plain file name in the manifest's folder)")
            if not _is_count(shard["bytes"]):
                return f"has a size that is not a byte count in {at}.bytes"
            if not (isinstance(shard["sha256"], str) and _SHA256.fullmatch(shard["sha256"])):
                return f"has a sha256 that is not 64 hex digits in {at}.sha256"
    return None


def load_manifest(shards: str | os.PathLike, remedy: str = REMAKE) -> dict:
    """Read and check a manifest; raises ManifestError with a one-line reason ending in `remedy`."""
    path = manifest_path(shards)
    try:
        m = read_json_file(path)
    except FileNotFoundError:
        raise ManifestError(f"no shard manifest at {path} (make one with shard_tools/make_shards.py)") from None
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from None
    except ManifestError as e:
        raise ManifestError(f"{e}; {remedy}") from None
    problem = manifest_problem(m)
    if problem is not None:
        raise ManifestError(f"{path} {problem}; {remedy}")
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
        if read_json_file(path) == manifest:
            return path
    except (OSError, ManifestError):
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
            st = file.stat()
        except OSError:
            raise ManifestError(f"shard {file} is listed in {path} but cannot be read") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader, a device never end
            raise ManifestError(f"shard {file} is listed in {path} but is not a regular file")
        size = st.st_size
        if size != shard["bytes"]:
            raise ManifestError(f"shard {file} is {size} bytes, {path} says {shard['bytes']}: the shards changed "
                                "after the manifest was written; run make_shards.py again")
        if verify and i % share[1] == share[0] and sha256_file(file) != shard["sha256"]:
            raise ManifestError(f"shard {file} does not match the sha256 in {path}: run make_shards.py again")
