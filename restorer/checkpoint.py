"""Checkpoints: one file holds everything a run needs to go on; written atomically, by rank 0 only."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from restorer.fileio import atomic_open

LAST, BEST = "last.pt", "best.pt"
_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temporary file beside `path`, fsync, rename: a kill at any moment leaves
    either the previous file or the new one, never a partial one."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Tensors and plain values only (`weights_only`): loading runs no pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def keep_step_copy(out_dir: Path, step: int, state: dict, keep: int) -> None:
    """Save step-NNNNNNNN.pt and delete all but the newest `keep` of them."""
    save_checkpoint(out_dir / f"step-{step:08d}.pt", state)
    copies = sorted(p for p in out_dir.iterdir() if _STEP_FILE.match(p.name))
    for old in copies[:-keep]:
        old.unlink()
