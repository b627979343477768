"""A run folder (train.out_dir), the one owner of what is in it: the names the trainer writes there,
the records of its metrics.jsonl (their schema, and the one reader), and which files the trainer may
delete or replace (RunFolder). (Which config keys are bookkeeping the config says: `bookkeeping(...)`.)

    last.pt, best.pt, step-NNNNNNNN.pt   checkpoints (restorer.formats.checkpoint)
    config.yaml                          the resolved config the run trains with
    metrics.jsonl                        one JSON record a line: every one has a step; training lines
                                         a loss, validation lines val_psnr, events an `event` (EVENTS)
    trace.jsonl                          with data.trace: the image and patch of every slot of every step
    trackers.json, card.json             the trackers' run ids; the network's card
    tb/, val/, wandb/                    TensorBoard's events, validation pictures, wandb's offline runs
    .restorer-run                        the marker: every name the trainer claimed here (RunFolder)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from restorer.base.cli import warn
from restorer.base.errors import RestorerError, one_line
from restorer.base.fileio import atomic_write_json

LAST, BEST = "last.pt", "best.pt"
CONFIG, METRICS, TRACE = "config.yaml", "metrics.jsonl", "trace.jsonl"
TRACKER_IDS, CARD = "trackers.json", "card.json"
TENSORBOARD, PICTURES, WANDB = "tb", "val", "wandb"  # folders
CURVES = "curves.png"  # plot's picture of a run (plot writes it, not the trainer)
RUN_FILES = (LAST, BEST, CONFIG, METRICS, TRACKER_IDS, CARD, TRACE)  # and:
RUN_FOLDERS = (TENSORBOARD, PICTURES, WANDB)
STEP_COPIES = "step-NNNNNNNN.pt"  # in a run marker: every step copy
RUN_MARKER = ".restorer-run"  # a run folder's record of the names the trainer claimed there (RunFolder)
MARKER_FORMAT = "restorer-run"
_RUN_NAMES = frozenset((*RUN_FILES, *RUN_FOLDERS, STEP_COPIES))
_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
_TEMP_FILE = re.compile(r"^\.(.+)\.tmp\d+$")  # restorer.base.fileio.temp_path's names: the file's own name inside


# ----------------------------------------------------------------------------- metrics.jsonl's records

EVENTS = ("start", "resume", "stopped", "finished")  # an event record's `event`: a run's attempts and ends


#: the figures of a record that are numbers when present; a training line has both loss and target, a
#: validation line both PSNRs (what plot draws)
NUMBERS = ("epoch", "loss", "target", "lr", "val_psnr", "val_psnr_jpeg", "val_ssim", "val_ssim_jpeg", "minutes")
PAIRS = (("loss", "target"), ("val_psnr", "val_psnr_jpeg"))
MAX_STEP = 2 ** 63


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def usable(record: Any) -> bool:
    """Whether a parsed line is a record as the trainer writes it: an object with a step (an integer
    from 0), its figures numbers, a training or validation line complete, an event's name a string."""
    if not isinstance(record, dict):
        return False
    step = record.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step < MAX_STEP):
        return False
    if any(k in record and not is_number(record[k]) for k in NUMBERS):
        return False
    if any((a in record) != (b in record) for a, b in PAIRS):
        return False
    return isinstance(record.get("event", ""), str)


def read_records(path: Path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl, and how many lines were not one (not JSON: a write cut short;
    nested too deep to parse; a field missing or of the wrong type: see `usable`)."""
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, an integer of 4300+ digits; [[[... 100,000 deep
            record = None
        if usable(record):
            records.append(record)
        else:
            bad += 1
    return records, bad


def warn_skipped(path: Path, count: int) -> None:
    """The one warning for a metrics.jsonl's lines that `read_records` skipped."""
    if count:
        lines = "1 line is" if count == 1 else f"{count} lines are"
        warn(f"{path}: {lines} not a record (cut short, not JSON, or a field of the wrong type): skipped")


# ----------------------------------------------------------------------------- names and what is the run's


def step_copy(step: int) -> str:
    return f"step-{step:08d}.pt"


def step_picture(step: int) -> str:
    """A validation picture's name in PICTURES."""
    return f"step-{step:08d}.png"


def step_copies(out_dir: Path) -> list[Path]:
    """The step-NNNNNNNN.pt copies, oldest first."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if _STEP_FILE.match(p.name))


class RunFolderError(RestorerError):
    """A train.out_dir the trainer will not write in: it holds files of a run's names that no run of
    this trainer recorded as its own; one line."""


@dataclass
class RunFolder:
    """A run folder as the trainer may touch it: the trainer removes only what it can prove it wrote.

    Before a run creates anything in a folder, rank 0 claims it (`claim`): the marker RUN_MARKER,
    written atomically, lists every name the run may create there (RUN_FILES, RUN_FOLDERS and the
    step copies, STEP_COPIES) that is not there yet, whichever module writes it. Deleting (`remove_ours`:
    an attempt that died before its first checkpoint, or train.overwrite=true) and pruning step
    copies touch only names the marker lists (`owns`). A run's name that is there but not listed
    (`theirs`: a user's config.yaml or val/ of photos, the files of a run from before markers) is
    never deleted nor written over: the trainer refuses to start a run there, train.overwrite or not.
    Any other file in the folder (a user's notes.txt) is left alone: a run only adds its own names.
    Resuming deletes nothing and needs no marker: a checkpoint that loads is resumed from (a run from
    before markers too), and the claim then lists only the names that were not there yet.
    """

    path: Path
    owned: frozenset = frozenset()  # the names the marker lists, of _RUN_NAMES
    earlier: frozenset = frozenset()  # step copies already there when STEP_COPIES was claimed: not the run's

    @classmethod
    def read(cls, path: str | os.PathLike) -> "RunFolder":
        """The folder and what its marker lists (nothing when it has none); RunFolderError when
        the marker cannot be read."""
        path = Path(path)
        marker = path / RUN_MARKER
        if not os.path.lexists(marker):
            return cls(path)
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
            names = record.get("names") if isinstance(record, dict) and record.get("format") == MARKER_FORMAT else None
            earlier = record.get("earlier", []) if isinstance(names, list) else None
            if not (isinstance(earlier, list) and all(isinstance(n, str) for n in names + earlier)):
                raise ValueError(f"not a {MARKER_FORMAT} record")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RunFolderError(f"{marker} cannot be read ({one_line(e, 80)}): it says which files in {path} "
                                 "the trainer wrote; move the run's files away, or use another train.out_dir") from None
        return cls(path, frozenset(names) & _RUN_NAMES, frozenset(n for n in earlier if _STEP_FILE.match(n)))

    def owns(self, name: str) -> bool:
        if _STEP_FILE.match(name):
            return STEP_COPIES in self.owned and name not in self.earlier
        return name in self.owned

    def entries(self) -> list[Path]:
        """The run's names that are in the folder (whatever they are: files, folders, links)."""
        if not self.path.is_dir():
            return []
        return [self.path / n for n in (*RUN_FILES, *RUN_FOLDERS) if os.path.lexists(self.path / n)] + \
            step_copies(self.path)

    def ours(self) -> list[Path]:
        return [p for p in self.entries() if self.owns(p.name)]

    def theirs(self) -> list[Path]:
        """The run's names in the folder that the marker does not list: not the trainer's to touch."""
        return [p for p in self.entries() if not self.owns(p.name)]

    def claim(self) -> None:
        """Create the folder if need be and record in its marker, as the run's, every name the run may
        create that is not there yet (all of them, in a new or emptied folder)."""
        self.path.mkdir(parents=True, exist_ok=True)
        owned = set(self.owned) | {n for n in (*RUN_FILES, *RUN_FOLDERS) if not os.path.lexists(self.path / n)}
        if STEP_COPIES not in owned:
            owned.add(STEP_COPIES)
            self.earlier = frozenset(p.name for p in step_copies(self.path))
        self.owned = frozenset(owned)
        atomic_write_json(self.path / RUN_MARKER, {"format": MARKER_FORMAT, "version": 1, "names": sorted(owned),
                                                   "earlier": sorted(self.earlier)})

    def remove_ours(self) -> None:
        """Delete the run's names that the marker lists (a link itself, never what it points to)."""
        for path in self.ours():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def remove_stale_temp_files(self) -> None:
        """Temporary files (restorer.base.fileio.temp_path's) of the run's own names that a SIGKILL
        interrupted; never of a live writer: rank 0 owns the folder."""
        if self.path.is_dir():
            for p in self.path.iterdir():
                temp = _TEMP_FILE.match(p.name)
                if temp and (self.owns(temp[1]) or temp[1] == RUN_MARKER):
                    with contextlib.suppress(OSError):
                        p.unlink()
