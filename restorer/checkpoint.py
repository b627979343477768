"""Checkpoints: one file holds everything a run needs to go on; written atomically, by rank 0 only.

A run folder holds last.pt (the newest), best.pt (the best validation PSNR), and with
`checkpoint.keep` the step-NNNNNNNN.pt copies of the newest saves. Resuming reads last.pt, or the
newest step copy that loads when last.pt is damaged.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from restorer.fileio import atomic_open, atomic_path

LAST, BEST = "last.pt", "best.pt"
RUN_FILES = (LAST, BEST, "config.yaml", "metrics.jsonl")  # what a run writes, besides step copies and tb/
_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
_TEMP_FILE = re.compile(r"^\..+\.tmp\d+$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line for the user."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temporary file beside `path`, fsync, rename: a kill at any moment leaves
    either the previous file or the new one, never a partial one; a failed save leaves nothing."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Tensors and plain values only (`weights_only`): loading runs no pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def step_copies(out_dir: Path) -> list[Path]:
    """The step-NNNNNNNN.pt copies, oldest first."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if _STEP_FILE.match(p.name))


def load_latest(out_dir: Path) -> Optional[tuple[dict, Path]]:
    """(state, path) of last.pt, or, when it does not load, of the newest step copy that does, or
    of best.pt (with a warning on stderr). None when the folder has no checkpoint; CheckpointError
    (one line) when there are checkpoints but none loads."""
    candidates = [p for p in [out_dir / LAST, *reversed(step_copies(out_dir)), out_dir / BEST] if p.is_file()]
    failures = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
            if not isinstance(state, dict) or "step" not in state or "model" not in state:
                raise CheckpointError("not a training checkpoint (no step / model)")
        except Exception as e:  # noqa: BLE001 - a truncated zip, a pickle error, a wrong object: try the next
            failures.append(f"{path.name}: {_one_line(e)}")
            continue
        if failures:
            print(f"restorer: warning: {'; '.join(failures)}; resuming from {path.name} (step {state['step']}) instead",
                  file=sys.stderr, flush=True)
        return state, path
    if failures:
        raise CheckpointError(f"no checkpoint in {out_dir} can be loaded ({'; '.join(failures)}); "
                              "move them away to start again, or set train.resume=false train.overwrite=true")
    return None


def best_psnr_on_disk(out_dir: Path) -> Optional[float]:
    """The validation PSNR best.pt was saved for (what a resumed run must beat), or None."""
    with contextlib.suppress(Exception):
        return float(load_checkpoint(out_dir / BEST)["best_psnr"])
    return None


def keep_step_copy(out_dir: Path, step: int, keep: int) -> None:
    """step-NNNNNNNN.pt, the last.pt just written, as a hard link (no second write; the next save
    renames a new file over last.pt and leaves the link alone), or a copy where links do not work;
    then delete all but the newest `keep` copies."""
    with atomic_path(out_dir / f"step-{step:08d}.pt") as tmp:
        try:
            os.link(out_dir / LAST, tmp)
        except OSError:
            shutil.copyfile(out_dir / LAST, tmp)
    for old in step_copies(out_dir)[:-keep]:
        old.unlink()


def run_files(out_dir: Path) -> list[Path]:
    """What an earlier run left in out_dir (checkpoints, config, metrics, TensorBoard events)."""
    if not out_dir.is_dir():
        return []
    found = [out_dir / n for n in RUN_FILES if (out_dir / n).is_file()] + step_copies(out_dir)
    return found + ([out_dir / "tb"] if (out_dir / "tb").is_dir() else [])


def remove_run_files(out_dir: Path) -> None:
    """Delete an earlier run's files (train.overwrite=true): nothing of it mixes with the new run."""
    for path in run_files(out_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def remove_stale_temp_files(out_dir: Path) -> None:
    """Temporary files of saves that a SIGKILL interrupted (never of a live writer: rank 0 owns the folder)."""
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if _TEMP_FILE.match(p.name):
                with contextlib.suppress(OSError):
                    p.unlink()
