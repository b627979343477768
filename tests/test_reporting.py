"""The console of a run (restorer.train.reporting.Reporter), in-process on its own clock: in a log file
the progress is whole lines, and the time left counts the validations still to come."""

from __future__ import annotations

import io

import pytest

from restorer.base.cli import run
from restorer.formats.config import LogConfig
from restorer.train.reporting import LINE_EVERY_S, Reporter, Schedule

VAL = {"val_psnr": 30.0, "val_psnr_jpeg": 29.0, "val_ssim": 0.9, "val_ssim_jpeg": 0.8}


class Clock:
    """The seconds a Reporter reads, moved by the test."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def reporter(tmp_path, stream, clock, **kw) -> Reporter:
    """A Reporter of rank 0: log.every 10, log.val_every 100, 1000 steps of 250 an epoch (`kw` changes
    the schedule)."""
    schedule = Schedule(**(dict(total_steps=1000, steps_per_epoch=250) | kw))
    return Reporter(tmp_path, LogConfig(every=10, val_every=100, progress=True), schedule, active=True, stream=stream,
                    clock=clock)


def steps(report: Reporter, clock: Clock, first: int, last: int, seconds: float) -> None:
    for step in range(first, last + 1):
        clock.now += seconds
        if report.due(step):
            report.training(step, {"loss": 0.01, "target": 0.02, "lr": 1e-3, "nonfinite": 0}, 16)
        report.advance(step, 0.0)


def validate(report: Reporter, clock: Clock, step: int, seconds: float) -> None:
    report.validating(step)
    clock.now += seconds
    report.validation(step, VAL)


def test_in_a_log_file_the_progress_is_a_whole_line_once_a_minute(tmp_path):
    log, clock = io.StringIO(), Clock()  # a StringIO is no terminal, as a SLURM log file
    report = reporter(tmp_path, log, clock)
    assert LINE_EVERY_S == 60

    def trainer() -> int:  # (its lines carry the name of the tool that is running)
        steps(report, clock, 1, 100, 1.0)  # 100 s of steps
        validate(report, clock, 100, 5.0)
        steps(report, clock, 101, 130, 1.0)
        report.close()
        return 0

    assert run("restorer train", trainer) == 0
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    progress = [line for line in text.splitlines() if " left" in line]
    # a line each 60 s of the clock: the 5 s of validation count
    assert [line.split(",")[0] for line in progress] == ["restorer train: step 60/1000 (6%)", "restorer train: step 115/1000 (12%)"]
    assert progress[0].endswith("; 15:40 left")  # 940 steps of 1 s, no validation measured yet
    assert "epoch 0, loss 0.01, target 0.02, 16 patches/s; " in progress[0]  # 10 steps of 16 patches in 10 s
    assert "restorer train: step 100: validating" in text.splitlines()


def test_the_time_left_counts_the_validations_still_to_come(tmp_path):
    clock = Clock()
    report = reporter(tmp_path, Terminal(), clock)
    steps(report, clock, 1, 100, 0.1)
    validate(report, clock, 100, 50.0)
    steps(report, clock, 101, 200, 0.1)
    # 800 steps of 0.1 s, and 8 validations of 50 s: at 300, ..., 900 and the last one at 1000
    assert report.seconds_left() == pytest.approx(800 * 0.1 + 8 * 50)
    assert "<08:00," in str(report.bar)  # the terminal's bar says the same
    assert report.progress_line().endswith("; 08:00 left")
    report.close()


def test_under_a_time_budget_the_time_left_is_the_budgets(tmp_path):
    clock = Clock()
    report = reporter(tmp_path, io.StringIO(), clock, budget_s=3600)
    steps(report, clock, 1, 10, 1.0)
    report.advance(11, 600.0)
    assert report.seconds_left() == 3000
    assert report.progress_line().startswith("10.0/60.0 min (17%), epoch 0")
    report.close()
