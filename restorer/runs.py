"""Many runs, one view: a table of the runs of a sweep (a SLURM job array with
train.out_dir=runs/sweep-%a, a few runs by hand), one row a run, best validation PSNR first.

    python -m restorer.runs PATTERN [PATTERN ...] [--json FILE]
    python -m restorer.runs 'runs/sweep-*'          (quote it: the tool expands it, ** included)

Each PATTERN is a glob or a folder. A folder that holds metrics.jsonl is a run (so is a glob's
match of a metrics.jsonl file: 'runs/*/metrics.jsonl'); a folder named as such (not a glob's match)
that holds none stands for its subfolders that are runs (`python -m restorer.runs runs`). A run
named twice is shown once. A PATTERN that matches no run is an error (exit 2).

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
the table's order]}. A line of metrics.jsonl cut short (a writer killed mid-line) is skipped, with a
warning that counts them.
"""

from __future__ import annotations

import glob
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from restorer.cli import Parser, UsageError, run
from restorer.config import flatten
from restorer.errors import one_line
from restorer.fileio import atomic_write_json

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
#: keys that say where or how a run is kept or shown, not what it trains: never a difference
BOOKKEEPING = frozenset({"train.out_dir", "train.resume", "train.overwrite", "log.progress", "log.tensorboard"})
FINISHED, STOPPED, RUNNING = "finished", "stopped", "running?"
MISSING = object()  # a key one run's config does not have


# ----------------------------------------------------------------------------- configs and their differences


def read_config(run_dir: Path, prog: str = "runs") -> Optional[dict[str, Any]]:
    """RUN_DIR/config.yaml flattened, or None when there is none (or it cannot be read: a warning)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        print(f"{prog}: warning: {path} cannot be read ({one_line(e)}): its settings are not compared",
              file=sys.stderr)
        return None
    return flatten(tree) if isinstance(tree, dict) else None


def differing_keys(configs: Sequence[Optional[dict[str, Any]]]) -> list[str]:
    """The keys whose values are not the same in every config (None: a run without one, left out),
    in the configs' own order, bookkeeping keys left out. One config or none: no differences."""
    present = [c for c in configs if c is not None]
    if len(present) < 2:
        return []
    keys = list(dict.fromkeys(k for c in present for k in c))
    return [k for k in keys if k not in BOOKKEEPING
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


def read_records(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a metrics.jsonl, and how many lines were not JSON (a write cut short)."""
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


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
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_run(run_dir: Path) -> Run:
    """One run's row: its state, steps, minutes, best validation and last loss from metrics.jsonl."""
    records, bad = read_records(run_dir / METRICS)
    r = Run(Path(run_dir), config=read_config(run_dir), skipped_lines=bad)
    last_event = None
    for record in records:
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            r.steps = step
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
            for name in sorted(glob.glob(pattern, recursive=True)):
                path = Path(name)
                if path.name == METRICS and path.is_file():  # 'runs/*/metrics.jsonl'
                    path = path.parent
                if is_run(path):
                    matched.append(path)
        if not matched:
            raise UsageError(f"no run folders (with {METRICS}) match {pattern!r}")
        for path in matched:
            found.setdefault(path.resolve(), path)
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
    p = Parser(prog="python -m restorer.runs", description=__doc__.split("\n\n")[0])
    p.add_argument("patterns", nargs="+", metavar="PATTERN",
                   help="run folders, folders of runs, or globs (quoted: 'runs/sweep-*')")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")

    def body() -> int:
        args = p.parse_args(argv)
        keys, runs = collect(find_runs(args.patterns))
        for r in runs:
            if r.skipped_lines:
                s = "s are" if r.skipped_lines > 1 else " is"
                print(f"runs: warning: {r.path / METRICS}: {r.skipped_lines} line{s} not JSON (a write cut short?): "
                      "skipped", file=sys.stderr)
        print(format_table(keys, runs))
        if args.json:
            atomic_write_json(args.json, as_json(keys, runs))
        return 0

    return run("runs", body)


if __name__ == "__main__":
    sys.exit(main())
