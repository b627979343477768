"""The shard set's manifest.json: names shared by the shard tool and the trainer, and its reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "restorer-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


class ManifestError(ValueError):
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
