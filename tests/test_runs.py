"""python -m restorer runs and the several-run python -m restorer plot, on a real sweep: three tiny
runs of the trainer, two finished (optim.lr 1e-3 and 2e-3, validated at steps 2 and 4) and one
stopped by SIGTERM (train.max_steps=400, no validation)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, assert_ok, logged_step, metrics, require, train_cmd, train_env, train_here, train_lines, wait_for
from restorer.tools import plot, runs
from restorer.formats.config import flatten
from restorer.tools.runs import differing_keys, run_labels

HEADER = ["run", "optim.lr", "train.max_steps", "log.val_every", "state", "steps", "minutes", "best PSNR", "vs JPEG",
          "at step", "loss"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, shards) -> Path:
    """root/sweep-0 (lr 1e-3), sweep-1 (lr 2e-3): 4 steps, validated at 2 and 4; sweep-2 stopped after its
    first log (it holds there until the signal: it cannot reach its 400 steps first, however slow the machine)."""
    root = tmp_path_factory.mktemp("sweep")
    short = ("train.max_steps=4", "log.val_every=2")
    stopped = subprocess.Popen(train_cmd(0, shards, root / "sweep-2", "train.max_steps=400", "log.val_every=0"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=train_env({"rank": 0, "hold_after_step": 2}))
    for name, lr in (("sweep-0", "1e-3"), ("sweep-1", "2e-3")):  # (in this process: a new one costs seconds)
        assert_ok(train_here(shards, root / name, *short, f"optim.lr={lr}"))
    wait_for(lambda: logged_step(root / "sweep-2") >= 2, stopped, "its first log")
    stopped.send_signal(signal.SIGTERM)
    _, stderr = stopped.communicate(timeout=120)
    assert stopped.returncode == 0, stderr[-4000:]
    assert metrics(root / "sweep-2")[-1]["event"] == "stopped"
    return root


def parse(table: str) -> list[list[str]]:
    """The printed table's rows of cells (columns are 2 or more spaces apart; a header may hold one)."""
    return [re.split(r"\s{2,}", line.strip()) for line in table.strip().splitlines()]


def expected(run_dir: Path) -> dict:
    """A run's row, worked out from its metrics.jsonl here, independently of restorer.tools.runs."""
    records = metrics(run_dir)
    vals = [r for r in records if "val_psnr" in r]
    best = max(vals, key=lambda r: r["val_psnr"]) if vals else None
    return {"state": {"finished": "finished", "stopped": "stopped"}[records[-1]["event"]],
            "steps": records[-1]["step"], "minutes": records[-1]["minutes"],
            "best_psnr": best and best["val_psnr"], "gain_db": best and best["val_psnr"] - best["val_psnr_jpeg"],
            "best_step": best and best["step"], "last_loss": train_lines(run_dir)[-1]["loss"]}


@pytest.mark.slow
def test_one_table_of_the_sweep_best_first_and_the_json_agrees(sweep, tmp_path):
    js = tmp_path / "table.json"
    p = subprocess.run([sys.executable, "-m", "restorer", "runs", str(sweep / "sweep-*"), "--json", str(js)],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    print(p.stdout)
    rows = parse(p.stdout)
    assert rows[0] == HEADER and len(rows) == 4

    want = {f"sweep-{i}": expected(sweep / f"sweep-{i}") for i in range(3)}
    order = sorted(["sweep-0", "sweep-1"], key=lambda n: -want[n]["best_psnr"]) + ["sweep-2"]  # no validation: last
    assert [Path(r[0]).name for r in rows[1:]] == order
    settings = {"sweep-0": ["0.001", "4", "2"], "sweep-1": ["0.002", "4", "2"], "sweep-2": ["0.001", "400", "0"]}
    for row in rows[1:]:
        name, w = Path(row[0]).name, want[Path(row[0]).name]
        assert row[1:4] == settings[name]
        assert row[4:7] == [w["state"], str(w["steps"]), f"{w['minutes']:.2f}"]
        if w["best_psnr"] is None:
            assert row[7:10] == ["-", "-", "-"]
        else:
            assert row[7:10] == [f"{w['best_psnr']:.2f}", f"{w['gain_db']:+.2f}", str(w["best_step"])]
        assert float(row[10]) == pytest.approx(w["last_loss"], rel=1e-3)
    assert [want[n]["state"] for n in order] == ["finished", "finished", "stopped"]
    assert want["sweep-0"]["steps"] == want["sweep-1"]["steps"] == 4 and 2 <= want["sweep-2"]["steps"] < 400
    for name in ("sweep-0", "sweep-1"):  # each validated run's picture, one per validation
        assert sorted(p.name for p in (sweep / name / "val").glob("step-*.png")) == ["step-00000002.png",
                                                                                     "step-00000004.png"]

    table = json.loads(js.read_text())
    assert table["keys"] == HEADER[1:4]
    assert [r["run"] for r in table["runs"]] == [r[0] for r in rows[1:]]
    for r in table["runs"]:
        name = Path(r["run"]).name
        assert r["config"] == dict(zip(HEADER[1:4], map(json.loads, settings[name])))
        assert {k: r[k] for k in want[name]} == pytest.approx(want[name])


def test_folders_globs_and_metrics_files_name_each_run_once(sweep, capsys):
    assert runs.main([str(sweep), str(sweep / "sweep-*"), str(sweep / "sweep-0" / "metrics.jsonl")]) == 0
    rows = parse(capsys.readouterr().out)
    assert rows[0] == HEADER and sorted(Path(r[0]).name for r in rows[1:]) == ["sweep-0", "sweep-1", "sweep-2"]
    # two runs that differ only in the learning rate: that is the one key shown
    assert runs.main([str(sweep / "sweep-[01]")]) == 0
    rows = parse(capsys.readouterr().out)
    assert rows[0] == ["run", "optim.lr", *HEADER[4:]] and len(rows) == 3


@pytest.mark.parametrize("case", ["nothing", "not_a_run", "one_of_two"])
def test_a_pattern_without_runs_exits_2_with_one_line(case, sweep, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = {"nothing": [str(tmp_path / "sweep-*")], "not_a_run": [str(tmp_path / "empty")],
            "one_of_two": [str(sweep / "sweep-*"), str(tmp_path / "nope-*")]}[case]
    assert runs.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("restorer runs: error: no run folders (with metrics.jsonl) match ") and args[-1] in err


def test_a_run_without_its_end_reads_running_and_a_cut_line_is_counted(sweep, tmp_path, capsys):
    """A trainer killed mid-write: its last line cut short, no end event after its start."""
    run = tmp_path / "killed"
    shutil.copytree(sweep / "sweep-0", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "finished"
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1] + [lines[-2][:40]]) + "\n")
    assert runs.main([str(run), str(sweep / "sweep-1")]) == 0
    out, err = capsys.readouterr()
    row = next(r for r in parse(out) if r[0] == str(run))
    assert row[2:5] == ["running?", "4", "-"]
    assert err == (f"restorer runs: warning: {run / 'metrics.jsonl'}: 1 line is not a record (cut short, not JSON, or a field "
                   "of the wrong type): skipped\n")
    # the plot reads it the same way; a JSON line that is not an object is counted, not a traceback
    if importlib.util.find_spec("matplotlib") is not None:
        with open(run / "metrics.jsonl", "a") as f:
            f.write("3\n")
        assert plot.main([str(run), "--out", str(tmp_path / "killed.png")]) == 0
        out, err = capsys.readouterr()
        assert err == (f"restorer plot: warning: {run / 'metrics.jsonl'}: 2 lines are not a record (cut short, not JSON, or a "
                       "field of the wrong type): skipped\n")
        assert (tmp_path / "killed.png").stat().st_size > 0


def test_labels_and_differences(sweep):
    s0, s1, s2 = (sweep / f"sweep-{i}" for i in range(3))
    assert run_labels([s0, s1]) == ["optim.lr=0.001", "optim.lr=0.002"]  # train.out_dir differs too: bookkeeping
    assert run_labels([s0, s1, s2]) == ["optim.lr=0.001 train.max_steps=4 log.val_every=2",
                                        "optim.lr=0.002 train.max_steps=4 log.val_every=2",
                                        "optim.lr=0.001 train.max_steps=400 log.val_every=0"]
    assert run_labels([s0]) == [str(s0)]  # nothing to tell apart: the folder
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}
    assert differing_keys([{"a": 1, "b": [1], "train.out_dir": "x"}, None, {"a": 1.0, "b": [2], "c": True,
                                                                             "train.out_dir": "y"}]) == ["b", "c"]
    assert run_labels([Path("x"), Path("y")], [{"a": 1, "b": True}, {"a": 1}]) == ["b=true", "b=-"]
    assert run_labels([Path("x"), Path("y")], [{"a": 1}, None]) == ["x", "y"]


@pytest.mark.slow
def test_plot_draws_several_runs_in_one_picture(sweep, tmp_path, capsys):
    require("matplotlib", "plot")  # draws the pictures
    from PIL import Image

    png = tmp_path / "sweep.png"
    runs_ = [str(sweep / f"sweep-{i}") for i in range(3)]
    p = subprocess.run([sys.executable, "-m", "restorer", "plot", *runs_, "--out", str(png)], capture_output=True,
                       text=True, cwd=REPO)
    # (no warning: cpu.yaml's psnr loss is negative, in dB, and drawn on a linear axis)
    assert p.returncode == 0 and p.stdout == f"restorer plot: {png}\n" and p.stderr == "", p.stderr
    assert Image.open(png).format == "PNG" and Image.open(png).size[0] > 500
    assert not any((sweep / f"sweep-{i}" / "curves.png").exists() for i in range(3))

    assert plot.main(runs_[:2]) == 2  # several runs, no --out: no run folder is the place for it
    out, err = capsys.readouterr()
    assert err.startswith("restorer plot: error: 2 runs: say where their picture goes with --out") and err.count("\n") == 1
