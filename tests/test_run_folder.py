"""The run folder: the trainer deletes or writes over only what it recorded as its own (the marker
.restorer-run); a user's files where a run's would go are refused in one line, train.overwrite or not."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import (REPO, assert_ok, encode, events, photo_like, train_cmd, train_env, train_here, write)
from restorer.formats.run_folder import RUN_MARKER, RunFolder, RunFolderError
from restorer.formats.config import load_config
from restorer.cluster.dist import DistInfo
from restorer.train.loop import TrainingError, prepare_run_dir

RANK0 = DistInfo(0, 1, 0, torch.device("cpu"))


def _prepare(out: Path, *overrides: str):
    """prepare_run_dir, rank 0 of one, as the trainer calls it for train.out_dir=out."""
    cfg = load_config(str(REPO / "configs" / "cpu.yaml"), ["data.shards=unused", f"train.out_dir={out}", *overrides])
    return prepare_run_dir(cfg, RANK0)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root (links as where they point), by relative path: what must not change."""
    return {str(p.relative_to(root)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


def _users_folder(root: Path) -> Path:
    """A project or data folder: its own config.yaml, a val/ of photos (real JPEGs), notes."""
    write(root / "config.yaml", b"# my project's settings\nlr: 0.1\n")
    for i in range(2):
        write(root / "val" / f"holiday{i}.jpg", encode(photo_like(96, 80, i), "JPEG", quality=90))
    write(root / "notes.txt", b"do not lose these\n")
    return root


@pytest.mark.parametrize("overrides", [[], ["train.overwrite=true"], ["train.resume=false"],
                                       ["train.resume=false", "train.overwrite=true"]])
def test_a_users_files_where_a_run_writes_are_never_deleted(tmp_path, overrides):
    out = _users_folder(tmp_path / "project")
    before = _tree(out)
    with pytest.raises(RunFolderError) as refused:
        _prepare(out, *overrides)
    message = str(refused.value)
    assert "\n" not in message and "config.yaml" in message and "val/" in message, message
    assert "notes.txt" not in message  # not in a run's way: only what collides is named
    assert "another train.out_dir" in message and "train.overwrite" in message, message
    assert refused.value.exit_code == 2  # the user's setting to change, not a failed run
    assert _tree(out) == before and not (out / RUN_MARKER).exists()  # nothing deleted, nothing written


@pytest.mark.slow
def test_out_dir_dot_in_a_project_folder_is_one_line_and_touches_nothing(tmp_path, shards):
    """train.out_dir=. from a project folder with its own config.yaml: the real command, exit 2."""
    project = _users_folder(tmp_path / "project")
    before = _tree(project)
    p = subprocess.run(train_cmd(0, shards, Path("."), "train.max_steps=1", "train.overwrite=true"), cwd=project,
                       capture_output=True, text=True, timeout=120, env=train_env())
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.startswith("restorer train: error: . holds config.yaml, val/,") and p.stderr.count("\n") == 1, p.stderr
    assert _tree(project) == before


def test_other_files_do_not_stop_a_run_and_stay_as_they_are(tmp_path, shards):
    out = tmp_path / "run"
    write(out / "notes.txt", b"my notes\n")
    write(out / "photos" / "a.jpg", encode(photo_like(96, 80, 1), "JPEG"))
    theirs = _tree(out)
    assert_ok(train_here(shards, out, "train.max_steps=2", "log.val_every=2"))
    marker = json.loads((out / RUN_MARKER).read_text())
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "val", "tb", "step-NNNNNNNN.pt"} <= {*marker["names"]}
    assert {k: v for k, v in _tree(out).items() if k in theirs} == theirs


def test_a_requeue_of_a_run_that_died_before_its_first_checkpoint_starts_again(tmp_path, shards):
    out = tmp_path / "run"
    write(out / "notes.txt", b"my notes\n")
    assert_ok(train_here(shards, out, "train.max_steps=2", "log.val_every=1"))
    for checkpoint in out.glob("*.pt"):  # what an attempt killed before its first save leaves
        checkpoint.unlink()
    assert len(list((out / "val").iterdir())) == 2 and (out / "metrics.jsonl").is_file()
    p = train_here(shards, out, "train.max_steps=1", "log.val_every=0")
    assert_ok(p)
    assert f"no checkpoint in {out} yet: starting at step 0 (replacing config.yaml, metrics.jsonl, val/" in p.stderr
    assert events(out) == ["start", "finished"]  # the dead attempt's lines are gone
    assert [p.name for p in (out / "val").iterdir()] == ["step-00000001.png"]  # its pictures too: this run's only
    assert (out / "notes.txt").read_bytes() == b"my notes\n"


def test_overwrite_deletes_exactly_the_names_the_marker_lists(tmp_path):
    out = tmp_path / "run"
    RunFolder(out).claim()  # what a run does first
    photos = write(tmp_path / "elsewhere" / "photo.jpg", encode(photo_like(96, 80, 2), "JPEG")).parent
    for name in ("last.pt", "best.pt", "step-00000002.pt", "config.yaml", "metrics.jsonl", "tb/events.out",
                 "wandb/run/files.txt"):
        write(out / name, b"the run's")
    (out / "val").symlink_to(photos, target_is_directory=True)  # recorded as the run's; a link now
    write(out / "notes.txt", b"mine\n")
    write(out / "my-data" / "x.bin", b"mine\n")
    write(out / ".notes.txt.tmp123", b"mine too: a temporary name, of no run's file\n")
    outside = _tree(photos)
    with pytest.raises(TrainingError, match="holds another run .* set train.overwrite=true"):
        _prepare(out, "train.resume=false")
    assert (out / "last.pt").exists()
    assert _prepare(out, "train.resume=false", "train.overwrite=true") is None
    assert sorted(p.name for p in out.iterdir()) == [".notes.txt.tmp123", RUN_MARKER, "my-data", "notes.txt"]
    assert _tree(photos) == outside  # the link went, not what it pointed to


def test_a_run_from_before_the_marker_resumes_and_its_files_are_never_deleted(base_run, shards):
    out = base_run
    (out / RUN_MARKER).unlink()  # as a run of an earlier restorer left its folder
    copies = sorted(p.name for p in out.glob("step-*.pt"))
    p = train_here(shards, out, "train.max_steps=6", "log.val_every=0", "checkpoint.every=1", "checkpoint.keep=1")
    assert_ok(p)
    assert f"resuming from {out / 'last.pt'} at step 4" in p.stderr
    # the earlier run's step copies are not provably the trainer's: kept; of its own copies it keeps 1
    assert sorted(p.name for p in out.glob("step-*.pt")) == [*copies, "step-00000006.pt"]
    owned = RunFolder.read(out)
    assert not owned.owns("last.pt") and not owned.owns("config.yaml") and owned.owns("step-00000006.pt")
    with pytest.raises(RunFolderError, match="holds last.pt, best.pt, config.yaml, metrics.jsonl and 3 more"):
        _prepare(out, "train.resume=false", "train.overwrite=true")
    assert (out / "last.pt").exists() and (out / "metrics.jsonl").exists()


def test_a_damaged_marker_is_one_line(tmp_path):
    out = tmp_path / "run"
    write(out / RUN_MARKER, b'{"format": "restorer-run", "names": "all"')
    with pytest.raises(RunFolderError, match=f"{RUN_MARKER} cannot be read"):
        _prepare(out)


def test_every_name_and_event_a_run_writes_is_one_the_run_folder_module_lists(base_run):
    """restorer.formats.run_folder owns the run folder: a real run (a checkpoint every step, validation,
    step copies, pictures) writes no name and no event it does not list."""
    from restorer.formats.run_folder import EVENTS, METRICS, RUN_FILES, RUN_FOLDERS, read_records, step_copies

    names = {p.name for p in base_run.iterdir()}
    copies = {p.name for p in step_copies(base_run)}
    assert copies and names - copies <= {*RUN_FILES, *RUN_FOLDERS, RUN_MARKER}, names
    records, bad = read_records(base_run / METRICS)
    assert bad == 0 and {r["event"] for r in records if "event" in r} <= set(EVENTS)


def test_bookkeeping_is_said_once_in_the_config_and_a_change_of_it_is_no_change_of_the_run(base_run, shards):
    from restorer.formats.config import bookkeeping_keys

    assert bookkeeping_keys() == {"train.out_dir", "train.resume", "train.overwrite", "train.stop_grace_s",
                                  "log.progress", "log.tensorboard"}
    from conftest import BASE_RUN

    p = train_here(shards, base_run, *BASE_RUN, "train.max_steps=5", "train.stop_grace_s=40", "log.progress=true")
    assert_ok(p)
    resumed = [m for m in (json.loads(line) for line in (base_run / "metrics.jsonl").read_text().splitlines())
               if m.get("event") == "resume"][-1]
    assert resumed["changes"] == ["train.max_steps 4 -> 5"]
