"""What export, plot and runs write never replaces what they read (the checkpoint, a run's
metrics.jsonl or config.yaml, however the output names it: the same path, a symlink, a hard link,
"x/../"); hostile metrics.jsonl lines are skipped and counted, never a traceback; and runs' `**`
ends on a tree whose symlinks loop."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path

import pytest

from helpers import cli_here, save_network
from restorer.tools import export, plot, runs
from restorer.models import build_model

GOOD = [{"event": "start", "step": 0, "world_size": 1},
        {"step": 2, "epoch": 0.5, "loss": 0.02, "target": 0.03, "lr": 0.001, "nonfinite": 0},
        {"step": 2, "epoch": 0.5, "val_psnr": 30.0, "val_psnr_jpeg": 28.0, "val_ssim": 0.9, "val_ssim_jpeg": 0.8},
        {"step": 4, "epoch": 1.0, "loss": 0.01, "target": 0.03, "lr": 0.001, "nonfinite": 0},
        {"step": 4, "epoch": 1.0, "val_psnr": 31.5, "val_psnr_jpeg": 28.5, "val_ssim": 0.92, "val_ssim_jpeg": 0.8},
        {"event": "finished", "step": 4, "signal": None, "nonfinite": 0, "minutes": 0.5}]

#: lines a metrics.jsonl may hold that are not records the trainer writes (after the good ones: a
#: reader that took any of them would show step 9 or a finished run "running?")
HOSTILE = ['{"loss": 0.5, "target": 0.6}',  # a training line without its step
           '{"step": "9", "loss": 0.5, "target": 0.6}',  # a string step
           '{"step": 9.5, "loss": 0.5, "target": 0.6}',
           '{"step": true, "loss": 0.5, "target": 0.6}',
           '{"step": -1, "loss": 0.5, "target": 0.6}',
           '{"step": 100000000000000000000000000000, "loss": 0.5, "target": 0.6}',
           '{"event": ["finished"], "step": 9}',  # an event list
           '{"event": "stopped", "step": 9, "minutes": "0.5"}',
           '{"step": 9, "loss": "0.5", "target": 0.6}',  # a figure that is not a number
           '{"step": 9, "loss": 0.5}',  # a training line without its target
           '{"step": 9, "val_psnr": {"db": 40}, "val_psnr_jpeg": 28.0}',
           "[" * 100_000 + "]" * 100_000,  # json.loads: RecursionError
           "1" * 5000,  # json.loads: ValueError (an integer of more than 4300 digits)
           "3",  # JSON, not an object
           '{"step": 9, "lo']  # a write cut short


def make_run(folder: Path, lines: list[str] | None = None, lr: float = 0.001) -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in GOOD] if lines is None else lines
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "config.yaml").write_text(f"optim:\n  lr: {lr}\ntrain:\n  max_steps: 4\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links as what they point to) and its bytes."""
    return {str(p.relative_to(folder)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


def one_error(p, prog: str, *words: str) -> None:
    assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
    assert p.stderr.startswith(f"restorer {prog}: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert all(w in p.stderr for w in words), p.stderr


# ----------------------------------------------------------------------------- outputs over inputs


def _same_file(way: str, target: Path, where: Path) -> Path:
    """`target` named another way, in the folder `where`."""
    if way == "path":
        return target
    if way == "dotdot":  # through a folder that does not exist yet (export makes --out's folder)
        return target.parent / "new" / ".." / target.name
    link = where / f"{way}-{target.name}"
    (os.symlink if way == "symlink" else os.link)(target, link)
    return link


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return save_network(tmp_path / "net.pt", build_model("seed", residual=True), "seed", {"residual": True})


@pytest.mark.parametrize("way", ["path", "dotdot", "symlink", "hardlink"])
@pytest.mark.parametrize("fmt", ["torchscript", "safetensors"])
def test_export_refuses_an_out_that_is_its_checkpoint(tmp_path, checkpoint, way, fmt):
    out = _same_file(way, checkpoint, tmp_path)
    before = snapshot(tmp_path)
    one_error(cli_here(export.main, "--ckpt", checkpoint, "--format", fmt, "--out", out), "export",
              "would overwrite --ckpt", "give --out a file name of its own")
    assert snapshot(tmp_path) == before  # the checkpoint byte for byte, and nothing written beside it


@pytest.mark.parametrize("case", ["weights_named_as_card", "card_named_as_checkpoint", "out_a_folder"])
def test_export_refuses_outputs_that_clash_or_a_folder(tmp_path, checkpoint, case):
    """safetensors writes the weights and the card beside them (OUT with .json): --out w.json would
    have the card replace the weights; a checkpoint named net.json would be replaced by the card."""
    if case == "card_named_as_checkpoint":
        checkpoint = checkpoint.rename(tmp_path / "net.json")
    out = {"weights_named_as_card": tmp_path / "w.json", "card_named_as_checkpoint": tmp_path / "net.safetensors",
           "out_a_folder": tmp_path}[case]
    before = snapshot(tmp_path)
    p = cli_here(export.main, "--ckpt", checkpoint, "--format", "safetensors", "--out", out)
    words = {"weights_named_as_card": ["its card", "would overwrite --out"],
             "card_named_as_checkpoint": ["its card", "would overwrite --ckpt"], "out_a_folder": ["is a folder"]}[case]
    one_error(p, "export", *words)
    assert snapshot(tmp_path) == before


def test_export_out_in_a_new_folder_is_written_and_under_a_file_is_one_line(tmp_path, checkpoint):
    out = tmp_path / "new" / "deeper" / "net.safetensors"
    p = cli_here(export.main, "--ckpt", checkpoint, "--format", "safetensors", "--out", out)
    assert p.returncode == 0, p.stderr
    assert out.stat().st_size > 0 and json.loads(out.with_suffix(".json").read_text())["network"] == "seed"
    p = cli_here(export.main, "--ckpt", checkpoint, "--format", "safetensors", "--out", checkpoint / "net.safetensors")
    one_error(p, "export")  # (its folder is a file: the OSError's one line)


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml"])
@pytest.mark.parametrize("way", ["path", "symlink", "hardlink"])
@pytest.mark.parametrize("tool", ["plot", "runs"])
def test_plot_and_runs_refuse_an_output_that_is_a_runs_input(tmp_path, tool, way, name):
    """Either run of the two: each one's metrics.jsonl and config.yaml are inputs."""
    run_a, run_b = make_run(tmp_path / "a"), make_run(tmp_path / "b", lr=0.002)
    out = _same_file(way, run_b / name, tmp_path)
    before = snapshot(tmp_path)
    if tool == "plot":
        p = cli_here(plot.main, run_a, run_b, "--out", out)
    else:
        p = cli_here(runs.main, run_a, run_b, "--json", out)
    one_error(p, tool, "would overwrite the input", str(run_b / name))
    assert snapshot(tmp_path) == before


def test_plot_refuses_its_default_out_when_it_is_a_folder_and_a_single_runs_input(tmp_path):
    run = make_run(tmp_path / "a")
    (run / "curves.png").mkdir()
    before = snapshot(tmp_path)
    one_error(cli_here(plot.main, run), "plot", "is a folder")
    one_error(cli_here(plot.main, run, "--out", run / "metrics.jsonl"), "plot", "would overwrite the input")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- hostile metrics.jsonl lines


def test_hostile_metrics_lines_are_skipped_and_counted_by_runs_and_plot(tmp_path):
    run = make_run(tmp_path / "run", [json.dumps(r) for r in GOOD] + HOSTILE)
    warning = (f"{run / 'metrics.jsonl'}: {len(HOSTILE)} lines are not a record (cut short, not JSON, or a field of "
               "the wrong type): skipped\n")
    p = cli_here(runs.main, run, "--json", tmp_path / "table.json")
    assert p.returncode == 0 and p.stderr == f"restorer runs: warning: {warning}", p.stderr
    row = json.loads((tmp_path / "table.json").read_text())["runs"][0]
    assert {k: row[k] for k in ("state", "steps", "minutes", "best_psnr", "gain_db", "best_step", "last_loss")} == \
           {"state": "finished", "steps": 4, "minutes": 0.5, "best_psnr": 31.5, "gain_db": 3.0, "best_step": 4,
            "last_loss": 0.01}
    train, val = plot.read_metrics(run)  # what plot draws: the good records alone
    assert sorted(train) == sorted(val) == [2, 4] and train[4]["loss"] == 0.01 and val[4]["val_psnr"] == 31.5
    if importlib.util.find_spec("matplotlib") is not None:
        p = cli_here(plot.main, run, "--out", tmp_path / "curves.png")
        assert p.returncode == 0 and p.stderr == f"restorer plot: warning: {warning}", p.stderr
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_metrics_file_of_hostile_lines_alone_is_a_warning_and_no_traceback(tmp_path):
    run = make_run(tmp_path / "run", HOSTILE)
    p = cli_here(runs.main, run)
    assert p.returncode == 0 and p.stderr.startswith("restorer runs: warning: ") and p.stderr.count("\n") == 1, p.stderr
    assert p.stdout.splitlines()[1].split()[1:] == ["running?", "-", "-", "-", "-", "-", "-"]
    if importlib.util.find_spec("matplotlib") is not None:
        p = cli_here(plot.main, run)
        assert p.returncode == 2 and p.stderr.splitlines() == [
            f"restorer plot: warning: {run / 'metrics.jsonl'}: {len(HOSTILE)} lines are not a record (cut short, not JSON, or a "
            "field of the wrong type): skipped",
            f"restorer plot: error: {run / 'metrics.jsonl'} has no training or validation lines yet"], p.stderr


# ----------------------------------------------------------------------------- runs' ** and symlinks


@pytest.fixture
def looping_tree(tmp_path) -> Path:
    """root/a/run-1, root/b/c/run-2 (real), root/b/run-linked -> elsewhere/run-3 (a symlinked run), and two
    symlinks that loop back to root, root/a/up and root/b/c/back (glob.glob's `**`: about 2 ** 40 paths)."""
    root = tmp_path / "root"
    for run in (root / "a" / "run-1", root / "b" / "c" / "run-2", tmp_path / "elsewhere" / "run-3"):
        make_run(run)
    (root / "a" / "up").symlink_to(root)
    (root / "b" / "c" / "back").symlink_to(root)
    (root / "b" / "run-linked").symlink_to(tmp_path / "elsewhere" / "run-3")
    return root


@pytest.mark.timeout(30)
def test_runs_double_star_ends_on_symlinks_that_loop_and_finds_the_runs(looping_tree):
    root, linked = looping_tree, looping_tree / "b" / "run-linked"

    def shown(*patterns) -> list[str]:
        p = cli_here(runs.main, *patterns)
        assert p.returncode == 0, p.stderr
        return sorted(line.split()[0] for line in p.stdout.splitlines()[1:])

    for pattern in ("**", "**/metrics.jsonl", "**/run-*"):
        assert shown(root / pattern) == [str(root / "a/run-1"), str(root / "b/c/run-2"), str(linked)], pattern
    assert shown(linked, linked / "**") == [str(linked)]  # a symlinked run named: itself, once


@pytest.mark.parametrize("relative", [False, True])
def test_expand_matches_glob_where_no_symlink_loops(tmp_path, monkeypatch, relative):
    """Without symlinked folders runs' walk finds what glob.glob(recursive=True) finds."""
    for run in ("a/run-1", "a/run-2", "b/c/run-3", "b/.hidden/run-4", ".dot/run-5"):
        make_run(tmp_path / "tree" / run)
    (tmp_path / "tree" / "b" / "notes.txt").write_text("x")
    base = "tree" if relative else str(tmp_path / "tree")
    monkeypatch.chdir(tmp_path)
    for pattern in ("**", "*", "*/*", "**/metrics.jsonl", "**/run-?", "[ab]/**/config.yaml", "**/", "*/run-1/",
                    ".*/*", "b/*", "b/c/run-3/metrics.jsonl", "**/nothing"):  # (glob: 'nothing/**' is 'nothing/')
        pattern = f"{base}/{pattern}"
        want = sorted({p.rstrip("/") for p in glob.glob(pattern, recursive=True)})
        assert sorted(p.rstrip("/") for p in runs.expand(pattern)) == want, pattern


@pytest.mark.parametrize("way", ["symlink", "hardlink"])
def test_restore_refuses_an_output_that_is_its_input_by_another_name(tmp_path, checkpoint, way):
    """restore writes OUT/<stem>.png: where that file is the input itself, reached by a symlink (an
    input inside --out is not one: find_inputs leaves it out) or a hard link (refused with its reason),
    the input is not restored over itself, and the others are restored."""
    from helpers import encode, photo_like
    from restorer.tools import restore

    (tmp_path / "in").mkdir(), (tmp_path / "out").mkdir()
    source = tmp_path / "out" / "a.png"
    source.write_bytes(encode(photo_like(64, 48, 1), "PNG"))
    (os.symlink if way == "symlink" else os.link)(source, tmp_path / "in" / "a.png")
    (tmp_path / "in" / "b.png").write_bytes(encode(photo_like(64, 48, 2), "PNG"))
    before = source.read_bytes()
    p = cli_here(restore.main, "--ckpt", checkpoint, tmp_path / "in", "--out", tmp_path / "out")
    assert source.read_bytes() == before
    assert (tmp_path / "out" / "b.png").is_file()
    assert ("would overwrite the input" in p.stderr) == (way == "hardlink"), p.stderr
