"""Rank 0's account of a run: metrics.jsonl (one JSON object a line, appended), the trackers
(restorer.train.trackers: TensorBoard when the package is installed, W&B and MLflow when asked for), the
validation pictures (RUN/val/step-N.png), and the console (progress, and lines that do not break
it). Other ranks report nothing (errors excepted, by their own tools).

The progress: on a terminal a tqdm bar; in a log file (SLURM, nohup: stderr not a terminal) a plain
line every LINE_EVERY_S instead, as a log file cannot redraw. Both say the time left: the steps left
at the measured seconds a step (validation excluded), plus the validations still to come (every
log.val_every steps and the last one) at their measured mean time. Under a time budget
(train.max_minutes) the bar counts minutes of the budget, with the time left and the steps a second:
the steps an epoch count says a run would take are never reached then.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO

import numpy as np

from restorer.base.cli import tool_name
from restorer.formats.config import LogConfig
from restorer.formats.run_folder import METRICS, PICTURES, TRACE, step_picture
from restorer.base.fileio import atomic_open
from restorer.train.trackers import close_trackers

LINE_EVERY_S = 60.0  # a progress line in a log file, once a minute
RATES = {"patches_s": "patches/s", "steps_s": "steps/s"}  # the bar's figures that a progress line says as rates


@dataclass(frozen=True)
class Schedule:
    """Where the run starts and where it ends: what the epochs and the time left are counted from."""

    total_steps: int
    steps_per_epoch: int
    budget_s: float = 0.0  # train.max_minutes in seconds; 0: the steps decide
    start_step: int = 0
    start_seconds: float = 0.0  # training seconds spent before (a resumed run)


class Reporter:
    """metrics.jsonl, the trackers (TensorBoard among them) and the console of one run, on rank 0
    (`active`); every method is a no-op elsewhere. `log` is the config's log section (every,
    val_every, progress, pictures); `due(step)` says when a training line is written. `stream`: the
    console (sys.stderr); `clock`: the seconds the time left is measured with (time.perf_counter)."""

    def __init__(self, out_dir: Path, log: LogConfig, schedule: Schedule, *, active: bool, trackers: Sequence = (),
                 stream: Optional[TextIO] = None, clock: Callable[[], float] = time.perf_counter):
        self.active, self.every, self.val_every, self.pictures = active, log.every, log.val_every, log.pictures
        self.steps_epoch, self.total_steps, self.budget_s = schedule.steps_per_epoch, schedule.total_steps, schedule.budget_s
        self.out_dir, self.path = out_dir, out_dir / METRICS
        self.trackers = list(trackers)
        self.stream, self.clock = stream if stream is not None else sys.stderr, clock
        self.bar = None
        self.window = (schedule.start_step, clock())  # (step, clock) where the current log window began
        # the time left: training seconds over steps (from the first step on), validations' seconds
        self.step_at: Optional[float] = None  # the clock at the last step (or the end of a validation)
        self.step_seconds, self.steps_timed = 0.0, 0
        self.val_started: Optional[float] = None
        self.val_seconds, self.vals_timed = 0.0, 0
        self.step, self.seconds = schedule.start_step, schedule.start_seconds
        self.figures: dict = {}  # the last training line's, for the progress line
        self.lines = False  # progress as plain lines (a log file), not a bar
        self.line_at = clock()
        if active and log.progress:
            self.lines = not _is_terminal(self.stream)
            self.bar = None if self.lines else _bar(self, self.stream)

    def due(self, step: int, last: bool = False) -> bool:
        return last or step % self.every == 0

    def say(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(f"{tool_name()}: {text}", file=self.stream)
        else:
            print(f"{tool_name()}: {text}", file=self.stream, flush=True)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record, record["step"])

    def trace(self, step: int, samples: list) -> None:
        """One line of RUN/trace.jsonl (data.trace): the [image, patch] of every slot of the step's global
        batch, in slot order. A resumed run appends the steps it does again: the last line of a step counts."""
        if self.active:
            with open(self.out_dir / TRACE, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "samples": samples}, separators=(",", ":")) + "\n")

    def training(self, step: int, figures: dict, patches_per_step: int) -> None:
        """A training line (loss, target, lr, nonfinite, ...) for the steps since the last one."""
        now = self.clock()
        steps, elapsed = step - self.window[0], max(now - self.window[1], 1e-9)
        self.window = (step, now)
        record = {"step": step, "epoch": step / self.steps_epoch, **figures,
                  "patches_per_s": steps * patches_per_step / elapsed}
        self.write(record)
        self.figures = {"loss": f"{record['loss']:.4g}", "target": f"{record['target']:.4g}",
                        "patches_s": f"{record['patches_per_s']:.0f}"}
        if self.budget_s:  # the bar counts minutes: say the steps here
            self.figures.update(step=step, steps_s=f"{steps / elapsed:.1f}")
        if self.bar is not None:
            self.bar.set_description(f"epoch {step // self.steps_epoch}", refresh=False)
            self.bar.set_postfix(self.figures, refresh=False)

    def advance(self, step: int, seconds: float) -> None:
        """After a step: its time, the bar (one more step, or the minutes spent of the budget), or in a
        log file a progress line when one is due."""
        now = self.clock()
        if self.step_at is not None:
            self.step_seconds += now - self.step_at
            self.steps_timed += step - self.step
        self.step_at, self.step, self.seconds = now, step, seconds
        if self.bar is not None:
            if self.budget_s:
                self.bar.n = min(round(seconds / 60, 2), self.bar.total)
                if step % self.every == 0:
                    self.bar.refresh()
            else:
                self.bar.update(step - self.bar.n)
        elif self.lines and now - self.line_at >= LINE_EVERY_S:
            self.line_at = now
            self.say(self.progress_line())

    def seconds_left(self) -> Optional[float]:
        """The run's time left: the budget's, or the steps left at the measured time a step plus the
        validations to come at their measured mean time; None before anything was measured."""
        if self.budget_s:
            return max(self.budget_s - self.seconds, 0.0)
        if not self.steps_timed:
            return None
        left = (self.total_steps - self.step) * self.step_seconds / self.steps_timed
        if self.vals_timed:
            left += self.validations_left() * self.val_seconds / self.vals_timed
        return left

    def validations_left(self) -> int:
        """Those every val_every steps before the last step, and the one at the end."""
        every = (max(self.total_steps - 1, 0) // self.val_every - self.step // self.val_every) if self.val_every else 0
        return max(every, 0) + 1

    def progress_line(self) -> str:
        """The bar's content as one line of text, for a log file."""
        from tqdm import tqdm

        epoch = self.step // self.steps_epoch
        if self.budget_s:
            done = self.seconds / self.budget_s
            where = f"{self.seconds / 60:.1f}/{self.budget_s / 60:.1f} min ({100 * done:.0f}%), epoch {epoch}"
        else:
            done = self.step / max(self.total_steps, 1)
            where = f"step {self.step}/{self.total_steps} ({100 * done:.0f}%), epoch {epoch}"
        figures = "".join(f", {v} {RATES[k]}" if k in RATES else f", {k} {v}" for k, v in self.figures.items())
        left = self.seconds_left()
        return f"{where}{figures}; {tqdm.format_interval(round(left)) if left is not None else '?'} left"

    def validating(self, step: int) -> None:
        """A validation starts (all ranks); its time is measured to the `validation` report."""
        self.val_started = self.clock()
        self.say(f"step {step}: validating")

    def validation(self, step: int, metrics: dict) -> None:
        now = self.clock()
        if self.val_started is not None:
            self.val_seconds += now - self.val_started
            self.vals_timed += 1
            self.val_started = None
        if self.step_at is not None:
            self.step_at = now  # the validation is not a step's time
        self.write({"step": step, "epoch": step / self.steps_epoch, **metrics})
        self.say(f"step {step}: val PSNR {metrics['val_psnr']:.2f} dB (JPEG {metrics['val_psnr_jpeg']:.2f}), "
                 f"SSIM {metrics['val_ssim']:.4f} (JPEG {metrics['val_ssim_jpeg']:.4f})")

    def picture(self, step: int, inp: np.ndarray, out: np.ndarray, target: np.ndarray) -> None:
        """The validation picture of a step: JPEG input | network | original, with a zoomed crop (as
        restore --compare draws it), as RUN/val/step-N.png (the last log.pictures kept), and in every
        tracker."""
        if not (self.active and self.pictures):
            return
        from restorer.infer.pictures import make_compare

        picture = make_compare(inp, out, target)
        folder = self.out_dir / PICTURES
        folder.mkdir(exist_ok=True)
        path = folder / step_picture(step)
        with atomic_open(path, "wb") as f:
            picture.save(f, format="PNG")
        for old in sorted(folder.glob("step-*.png"))[:-self.pictures]:
            old.unlink()
        for tracker in self.trackers:
            tracker.picture(path, step)

    def artifact(self, path: Path) -> None:
        for tracker in self.trackers:
            tracker.artifact(path)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        close_trackers(self.trackers)


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _bar(report: Reporter, stream: TextIO):
    """A tqdm bar on a terminal whose time left is the report's (tqdm's own would leave validation out)."""
    from tqdm import tqdm

    class Bar(tqdm):
        @property
        def format_dict(self):
            left = report.seconds_left()
            return {**super().format_dict, "left": self.format_interval(round(left)) if left is not None else "?"}

    common = dict(dynamic_ncols=True, file=stream, mininterval=0.5)
    if report.budget_s:
        return Bar(total=round(report.budget_s / 60, 2), initial=round(report.seconds / 60, 2), unit="min",
                   bar_format="{desc}{percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} min [{left} left{postfix}]",
                   **common)
    return Bar(total=report.total_steps, initial=report.step, unit="step",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{left}, {rate_fmt}{postfix}]", **common)
