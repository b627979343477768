"""Rank 0's account of a run: metrics.jsonl (one JSON object a line, appended), TensorBoard scalars
when the package is installed, the experiment trackers asked for (restorer.trackers), the
validation pictures (RUN/val/step-N.png), and the console (a tqdm bar and lines that do not break
it). Other ranks report nothing (errors excepted, by their own tools).

Under a time budget (train.max_minutes) the bar counts minutes of the budget, with the time left and
the steps a second: the steps an epoch count says a run would take are never reached then.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from restorer.fileio import atomic_open

PROG = "train"


class Reporter:
    """metrics.jsonl, TensorBoard and the console of one run, on rank 0 (`active`); every method is
    a no-op elsewhere. `due(step)` says when a training line is written (log.every)."""

    def __init__(self, out_dir: Path, *, active: bool, every: int, total_steps: int, budget_s: float, start_step: int,
                 start_seconds: float, steps_per_epoch: int, progress: bool, tensorboard: bool, pictures: int = 0,
                 trackers: Sequence = ()):
        self.active, self.every, self.steps_epoch = active, every, steps_per_epoch
        self.total_steps, self.budget_s = total_steps, budget_s
        self.out_dir, self.path = out_dir, out_dir / "metrics.jsonl"
        self.pictures, self.trackers = pictures, list(trackers)
        self.tb = self.bar = None
        self.window = (start_step, time.perf_counter())  # (step, clock) where the current log window began
        if not active:
            return
        if tensorboard:
            with contextlib.suppress(ImportError):  # tensorboard is an optional extra
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
        if progress:
            from tqdm import tqdm

            # in a log file (SLURM, nohup) a redraw every minute, not ten a second
            common = dict(dynamic_ncols=True, file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 60)
            if budget_s:
                self.bar = tqdm(total=round(budget_s / 60, 2), initial=round(start_seconds / 60, 2), unit="min",
                                bar_format="{desc}{percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} min "
                                           "[{remaining} left{postfix}]", **common)
            else:
                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", **common)

    def due(self, step: int, last: bool = False) -> bool:
        return last or step % self.every == 0

    def say(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(f"{PROG}: {text}", file=sys.stderr)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record["step"])
        for tracker in self.trackers:
            tracker.log(record, record["step"])

    def training(self, step: int, figures: dict, patches_per_step: int) -> None:
        """A training line (loss, target, lr, nonfinite, ...) for the steps since the last one."""
        now = time.perf_counter()
        steps, elapsed = step - self.window[0], max(now - self.window[1], 1e-9)
        self.window = (step, now)
        record = {"step": step, "epoch": step / self.steps_epoch, **figures,
                  "patches_per_s": steps * patches_per_step / elapsed}
        self.write(record)
        if self.bar is not None:
            postfix = {"loss": f"{record['loss']:.4g}", "target": f"{record['target']:.4g}",
                       "patches_s": f"{record['patches_per_s']:.0f}"}
            if self.budget_s:  # the bar counts minutes: say the steps here
                postfix.update(step=step, steps_s=f"{steps / elapsed:.1f}")
            self.bar.set_description(f"epoch {step // self.steps_epoch}", refresh=False)
            self.bar.set_postfix(postfix, refresh=False)

    def advance(self, step: int, seconds: float) -> None:
        """The bar, after a step: one more step, or the minutes spent of the budget."""
        if self.bar is None:
            return
        if self.budget_s:
            self.bar.n = min(round(seconds / 60, 2), self.bar.total)
            if step % self.every == 0:
                self.bar.refresh()
        else:
            self.bar.update()

    def validation(self, step: int, metrics: dict) -> None:
        self.write({"step": step, "epoch": step / self.steps_epoch, **metrics})
        self.say(f"step {step}: val PSNR {metrics['val_psnr']:.2f} dB (JPEG {metrics['val_psnr_jpeg']:.2f}), "
                 f"SSIM {metrics['val_ssim']:.4f} (JPEG {metrics['val_ssim_jpeg']:.4f})")

    def picture(self, step: int, inp: np.ndarray, out: np.ndarray, target: np.ndarray) -> None:
        """The validation picture of a step: JPEG input | network | original, with a zoomed crop (as
        restore --compare draws it), as RUN/val/step-N.png (the last log.pictures kept), in
        TensorBoard and in every tracker."""
        if not (self.active and self.pictures):
            return
        from restorer.pictures import make_compare

        picture = make_compare(inp, out, target)
        folder = self.out_dir / "val"
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{step:08d}.png"
        with atomic_open(path, "wb") as f:
            picture.save(f, format="PNG")
        for old in sorted(folder.glob("step-*.png"))[:-self.pictures]:
            old.unlink()
        if self.tb is not None:
            self.tb.add_image("val/picture", np.asarray(picture), step, dataformats="HWC")
        for tracker in self.trackers:
            tracker.picture(path, step)

    def artifact(self, path: Path) -> None:
        for tracker in self.trackers:
            tracker.artifact(path)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            tracker.close()
