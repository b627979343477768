"""Many runs, one view: a table of the runs of a sweep (a SLURM job array with
train.out_dir=runs/sweep-%a, a few runs by hand), one row a run, best validation PSNR first.

    python -m restorer runs PATTERN [PATTERN ...] [--json FILE]
    python -m restorer runs 'runs/sweep-*'          (quote it: the tool expands it, ** included)

Each PATTERN is a glob or a folder. A folder that holds metrics.jsonl is a run (so is a glob's
match of a metrics.jsonl file: 'runs/*/metrics.jsonl'); a folder named as such (not a glob's match)
that holds none stands for its subfolders that are runs (`python -m restorer runs runs`). A run
named twice is shown once (by its shortest name). A PATTERN that matches no run is an error (exit 2).

The columns:

* run: the folder;
* the settings that differ between the runs: every key of the runs' config.yaml (the resolved
  config, flattened to dotted keys such as optim.lr) whose value is not the same in all of them,
  bookkeeping left out (train.out_dir, train.resume, train.overwrite, log.progress,
  log.tensorboard); "-" where a run's config has no such key. A run without config.yaml (nothing
  to compare) shows "?" there;
* state, from the last event of metrics.jsonl: "finished" (it ended: its steps, epochs or
  train.max_minutes were done), "stopped" (a signal stopped it; start it again to resume), or
  "running?" (no end event after its last start or resume: it is still training, or its process
  died without one, killed -9, out of memory, a lost node; the file cannot tell which);
* steps: the last step it logged; minutes: of training, from the end event ("-" while running);
* best PSNR: the highest validation PSNR (dB), "vs JPEG" its gain over the JPEG input on the same
  validation, "at step" where; "-" without validation (such runs come last);
* loss: the last training loss logged.

``--json FILE`` writes the same table: {"keys": [the differing keys], "runs": [one object a row, in
the table's order]}; never over a run's metrics.jsonl or config.yaml (refused, exit 2). A line of
metrics.jsonl that is not a record the trainer writes (a writer killed mid-line, a field of the wrong
type) is skipped, with a warning that counts them.

`**` walks real subfolders only: a symlinked folder it meets is a match (a run, when it is one) but
is not walked into, so links that loop cannot make the search endless.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import yaml

from restorer.base.cli import Parser, UsageError, run, warn
from restorer.formats.config import bookkeeping_keys, flatten
from restorer.base.errors import one_line
from restorer.base.fileio import PathLike, atomic_write_json, refuse_overwrites
from restorer.base.urls import mask_secrets
from restorer.formats.run_folder import CONFIG, METRICS, is_number, read_records, warn_skipped

PROG = "restorer runs"

FINISHED, STOPPED, RUNNING = "finished", "stopped", "running?"
MISSING = object()  # a key one run's config does not have


# ----------------------------------------------------------------------------- outputs that are not inputs


def run_inputs(run_dirs: Iterable[PathLike]) -> list[tuple[str, Path]]:
    """The files plot and runs read in each run: no output of theirs may be one of them."""
    return [("the input", Path(d) / name) for d in run_dirs for name in (METRICS, CONFIG)]


# ----------------------------------------------------------------------------- configs and their differences


def read_config(run_dir: Path) -> Optional[dict[str, Any]]:
    """RUN_DIR/config.yaml flattened, or None when there is none (or it cannot be read: a warning)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        warn(f"{path} cannot be read ({one_line(e)}): its settings are not compared")
        return None
    return flatten(mask_secrets(tree)) if isinstance(tree, dict) else None  # (a shard URL's password: never shown)


def differing_keys(configs: Sequence[Optional[dict[str, Any]]]) -> list[str]:
    """The keys whose values are not the same in every config (None: a run without one, left out),
    in the configs' own order, bookkeeping keys left out. One config or none: no differences."""
    present = [c for c in configs if c is not None]
    if len(present) < 2:
        return []
    keys = list(dict.fromkeys(k for c in present for k in c))
    bookkeeping = bookkeeping_keys()
    return [k for k in keys if k not in bookkeeping
            and any(c.get(k, MISSING) != present[0].get(k, MISSING) for c in present[1:])]


def format_value(value: Any) -> str:
    """A config value as an override would spell it: 0.001, true, [10,50], null; "-" for a missing key."""
    if value is MISSING:
        return "-"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def run_labels(run_dirs: Sequence[Path], configs: Optional[Sequence[Optional[dict]]] = None) -> list[str]:
    """A name for each run that says what sets it apart: its differing settings, "optim.lr=0.001
    train.max_steps=4"; the folder where there is nothing to say (identical configs, no config.yaml)."""
    if configs is None:
        configs = [read_config(Path(d)) for d in run_dirs]
    keys = differing_keys(configs)
    labels = []
    for run_dir, config in zip(run_dirs, configs):
        if config is None or not keys:
            labels.append(str(run_dir))
        else:
            labels.append(" ".join(f"{k}={format_value(config.get(k, MISSING))}" for k in keys))
    return labels


# ----------------------------------------------------------------------------- one run's account


@dataclass
class Run:
    path: Path
    config: Optional[dict[str, Any]] = None
    state: str = RUNNING
    steps: Optional[int] = None
    minutes: Optional[float] = None
    best_psnr: Optional[float] = None
    gain_db: Optional[float] = None  # best_psnr - the JPEG input's PSNR on that validation
    best_step: Optional[int] = None
    last_loss: Optional[float] = None
    skipped_lines: int = 0
    settings: dict[str, Any] = field(default_factory=dict)  # its values of the differing keys


def _number(value: Any) -> Optional[float]:
    return float(value) if is_number(value) else None


def read_run(run_dir: Path) -> Run:
    """One run's row: its state, steps, minutes, best validation and last loss from metrics.jsonl."""
    records, bad = read_records(run_dir / METRICS)
    r = Run(Path(run_dir), config=read_config(run_dir), skipped_lines=bad)
    last_event = None
    for record in records:
        r.steps = record["step"]
        if "event" in record:
            last_event = record
        if _number(record.get("loss")) is not None:
            r.last_loss = float(record["loss"])
        psnr = _number(record.get("val_psnr"))
        if psnr is not None and math.isfinite(psnr) and (r.best_psnr is None or psnr > r.best_psnr):
            jpeg = _number(record.get("val_psnr_jpeg"))
            r.best_psnr, r.best_step = psnr, record.get("step")
            r.gain_db = psnr - jpeg if jpeg is not None else None
    if last_event is not None:
        r.state = {"finished": FINISHED, "stopped": STOPPED}.get(last_event["event"], RUNNING)
        r.minutes = _number(last_event.get("minutes"))
    return r


# ----------------------------------------------------------------------------- finding runs


def is_run(path: Path) -> bool:
    return (path / METRICS).is_file()


def _has_magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def _matching(folder: str, part: str) -> list[str]:
    """The names in `folder` that the glob `part` matches (hidden ones only when `part` starts with '.', as glob)."""
    try:
        names = os.listdir(folder or os.curdir)
    except OSError:  # not a folder, no permission: no matches, as glob
        return []
    if not part.startswith("."):
        names = [n for n in names if not n.startswith(".")]
    return fnmatch.filter(names, part)


def _below(folder: str) -> Iterator[str]:
    """Every path below `folder` (hidden ones left out, as glob's `**`), walking into real subfolders
    only, each once (by device and inode: a bind mount loops too): a symlinked folder is listed, not
    entered."""
    try:
        st = os.stat(folder or os.curdir)
    except OSError:
        return
    seen, todo = {(st.st_dev, st.st_ino)}, [folder]
    while todo:
        current = todo.pop()
        try:
            with os.scandir(current or os.curdir) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = os.path.join(current, entry.name)
            yield path
            try:
                if entry.is_dir(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        todo.append(path)
            except OSError:
                continue


def expand(pattern: str) -> list[str]:
    """The paths a glob matches, as glob.glob(pattern, recursive=True) finds them, except that `**`
    does not walk into symlinked folders (`_below`): glob's follows every link, and a few links that
    loop make its walk exponential."""
    folders_only = pattern.endswith(os.sep)
    paths = [os.sep] if pattern.startswith(os.sep) else [""]
    for part in (p for p in pattern.split(os.sep) if p):
        if part == "**":
            found = [p for base in paths if os.path.isdir(base or os.curdir) for p in (base, *_below(base))]
        elif _has_magic(part):
            found = [os.path.join(base, name) for base in paths for name in _matching(base, part)]
        else:
            found = [os.path.join(base, part) for base in paths if os.path.lexists(os.path.join(base, part))]
        paths = list(dict.fromkeys(found))
    paths = [p for p in paths if p]  # ('**' alone: the current folder, '' here)
    return [p for p in paths if os.path.isdir(p)] if folders_only else paths


def find_runs(patterns: Iterable[str]) -> list[Path]:
    """The run folders the patterns name (globs, folders, folders of runs), each once, in order."""
    found: dict[Path, Path] = {}
    for pattern in patterns:
        path = Path(pattern)
        if is_run(path):
            matched = [path]
        elif path.is_dir():  # a folder of runs, named as such (not a glob's match: that one is only itself)
            matched = [p for p in sorted(path.iterdir()) if p.is_dir() and is_run(p)]
        else:
            matched = []
            for name in sorted(expand(pattern)):
                path = Path(name)
                if path.name == METRICS and path.is_file():  # 'runs/*/metrics.jsonl'
                    path = path.parent
                if is_run(path):
                    matched.append(path)
        if not matched:
            raise UsageError(f"no run folders (with {METRICS}) match {pattern!r}")
        for path in matched:  # one row a run, named its shortest way ('root/**' meets links that loop back)
            key = path.resolve()
            if key not in found or len(path.parts) < len(found[key].parts):
                found[key] = path
    return list(found.values())


# ----------------------------------------------------------------------------- the table


def collect(run_dirs: Sequence[Path]) -> tuple[list[str], list[Run]]:
    """(the differing keys, the runs sorted best validation PSNR first, those without validation last)."""
    runs = [read_run(d) for d in run_dirs]
    keys = differing_keys([r.config for r in runs])
    for r in runs:
        r.settings = {k: (r.config.get(k, MISSING) if r.config is not None else None) for k in keys}
    runs.sort(key=lambda r: (r.best_psnr is None, -(r.best_psnr or 0.0)))  # stable: ties keep the given order
    return keys, runs


def _cell(value: Any, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = ("state", "steps", "minutes", "best PSNR", "vs JPEG", "at step", "loss")
NUMERIC = frozenset(COLUMNS[1:])


def table_rows(keys: list[str], runs: Sequence[Run]) -> list[list[str]]:
    """The header and one row of cells a run."""
    rows = [["run", *keys, *COLUMNS]]
    for r in runs:
        settings = ["?" if r.config is None else format_value(r.settings[k]) for k in keys]
        rows.append([str(r.path), *settings, r.state, _cell(r.steps), _cell(r.minutes, ".2f"),
                     _cell(r.best_psnr, ".2f"), _cell(r.gain_db, "+.2f"), _cell(r.best_step), _cell(r.last_loss, ".4g")])
    return rows


def format_table(keys: list[str], runs: Sequence[Run]) -> str:
    rows = table_rows(keys, runs)
    header = rows[0]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if name in NUMERIC else cell.ljust(w) for cell, w, name in zip(row, widths, header)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def as_json(keys: list[str], runs: Sequence[Run]) -> dict:
    return {"keys": keys, "runs": [
        {"run": str(r.path),
         "config": None if r.config is None else {k: (None if v is MISSING else v) for k, v in r.settings.items()},
         "state": r.state, "steps": r.steps, "minutes": r.minutes, "best_psnr": r.best_psnr, "gain_db": r.gain_db,
         "best_step": r.best_step, "last_loss": r.last_loss}
        for r in runs]}


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("patterns", nargs="+", metavar="PATTERN",
                   help="run folders, folders of runs, or globs (quoted: 'runs/sweep-*')")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")

    def body() -> int:
        args = p.parse_args(argv)
        run_dirs = find_runs(args.patterns)
        if args.json:
            refuse_overwrites([("--json", args.json)], run_inputs(run_dirs), hint="write the table elsewhere")
        keys, runs = collect(run_dirs)
        for r in runs:
            warn_skipped(r.path / METRICS, r.skipped_lines)
        print(format_table(keys, runs))
        if args.json:
            atomic_write_json(args.json, as_json(keys, runs))
        return 0

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
