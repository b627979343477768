"""The shard manifest as its readers see it (the trainer, the checks, the shard tool): any damage is
one line naming the file and the problem, and a shard name never leads outside the manifest's folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, train_here
from restorer.data.manifest import ManifestError, check_shards, load_manifest, shard_paths

REMEDY = "; make it again with shard_tools/make_shards.py"


@pytest.fixture
def shard_copy(shards, tmp_path) -> Path:
    """A copy of the session's shard folder, this test's to damage."""
    return Path(shutil.copytree(shards, tmp_path / "shards", ignore=shutil.ignore_patterns(".make_shards")))


def _edit(folder: Path, change) -> Path:
    """Its manifest changed by `change(m)`: in place, or replaced by what it returns."""
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps(change(m) or m))
    return path


def _train0(m: dict) -> dict:
    return m["splits"]["train"]["shards"][0]


# (what is damaged, how, the problem the one line names)
DAMAGE = [
    ("a list", lambda m: [m], "is not a restorer shard manifest"),
    ("samples a string", lambda m: m["splits"]["train"].update(samples="8"),
     "has no sample count in splits.train.samples"),
    ("an entry a string", lambda m: m["splits"]["train"]["shards"].__setitem__(0, "train-000000.tar"),
     "has a shard without name, bytes or sha256 in splits.train.shards[0]"),
    ("a key missing", lambda m: _train0(m).__delitem__("bytes"),
     "has a shard without name, bytes or sha256 in splits.train.shards[0]"),
    ("a name that is a number", lambda m: _train0(m).update(name=123),
     "has a name that is not a string in splits.train.shards[0]"),
    ("bytes a string", lambda m: _train0(m).update(bytes="10240"),
     "has a size that is not a byte count in splits.train.shards[0].bytes"),
    ("bytes negative", lambda m: _train0(m).update(bytes=-1),
     "has a size that is not a byte count in splits.train.shards[0].bytes"),
    ("sha256 not hex", lambda m: _train0(m).update(sha256=None),
     "has a sha256 that is not 64 hex digits in splits.train.shards[0].sha256"),
]
OUTSIDE = ["../outside.tar", "{tmp}/outside.tar", "sub/train-000000.tar", "..", "", "pipe:cat train-000000.tar",
           "http://example.com/train-000000.tar", "file:train-000000.tar", "sub\\train-000000.tar"]


@pytest.mark.parametrize("change, problem", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_each_damage_is_one_line_naming_the_file_and_the_problem(shard_copy, change, problem):
    path = _edit(shard_copy, change)
    for read in (load_manifest, lambda folder: shard_paths(folder, "train"), check_shards):
        with pytest.raises(ManifestError) as e:
            read(shard_copy)
        assert str(e.value) == f"{path} {problem}{REMEDY}"


@pytest.mark.parametrize("text, problem", [
    ('{"format": "restorer-shards", "version": 1, "spl', "is not valid JSON (Unterminated string"),
    ("[" * 100_000 + "]" * 100_000, "is not valid JSON (nested too deeply)"),
], ids=["truncated", "deeply nested"])
def test_a_manifest_that_is_not_json_is_one_line(tmp_path, text, problem):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'manifest.json'} {problem}") and str(e.value).endswith(REMEDY)


@pytest.mark.parametrize("name", OUTSIDE)
def test_a_shard_name_outside_the_folder_is_refused(shard_copy, tmp_path, name):
    # a real shard outside the folder, of the size and sha256 the manifest records: only the name is wrong
    shutil.copy(shard_copy / "train-000000.tar", tmp_path / "outside.tar")
    (shard_copy / "sub").mkdir()
    shutil.copy(shard_copy / "train-000000.tar", shard_copy / "sub" / "train-000000.tar")
    name = name.format(tmp=tmp_path)
    path = _edit(shard_copy, lambda m: _train0(m).update(name=name))
    readers = (load_manifest, lambda folder: shard_paths(folder, "train"), lambda folder: check_shards(folder, verify=True))
    for read in readers:
        with pytest.raises(ManifestError) as e:
            read(shard_copy)
        assert str(e.value) == (f"{path} names a shard outside its folder in splits.train.shards[0]: {name!r} "
                                f"(a shard is a plain file name in the manifest's folder){REMEDY}")


def _returns(code: str) -> subprocess.CompletedProcess:
    """`code` run in a process of its own with a time limit: a read that blocks fails the test, not the suite."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("kind", ["fifo", "zero", "folder"])
def test_a_manifest_that_is_not_a_regular_file_is_not_read(tmp_path, kind):
    path = tmp_path / "manifest.json"
    {"fifo": os.mkfifo, "zero": lambda p: p.symlink_to("/dev/zero"), "folder": os.mkdir}[kind](path)
    p = _returns(f"from restorer.data.manifest import load_manifest\nload_manifest({str(tmp_path)!r})")
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f"restorer.data.manifest.ManifestError: {path} is not a regular file{REMEDY}")


def test_a_shard_that_is_a_fifo_is_not_read(shard_copy):
    # a FIFO in a shard's place; the manifest's size (0) matches what stat says of it
    (shard_copy / "train-000000.tar").unlink()
    os.mkfifo(shard_copy / "train-000000.tar")
    path = _edit(shard_copy, lambda m: _train0(m).update(bytes=0))
    p = _returns(f"from restorer.data.manifest import check_shards\ncheck_shards({str(shard_copy)!r}, verify=True)")
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f"restorer.data.manifest.ManifestError: shard {shard_copy / 'train-000000.tar'} is listed in {path} "
        "but is not a regular file")


@pytest.mark.parametrize("name, problem", [
    (123, "has a name that is not a string in splits.train.shards[0]"),
    ("../outside.tar", "names a shard outside its folder in splits.train.shards[0]: '../outside.tar' "
                       "(a shard is a plain file name in the manifest's folder)"),
], ids=["a number", "outside"])
def test_the_trainer_given_a_damaged_manifest_says_so_in_one_line(shard_copy, tmp_path, name, problem):
    shutil.copy(shard_copy / "train-000000.tar", tmp_path / "outside.tar")
    path = _edit(shard_copy, lambda m: _train0(m).update(name=name))
    p = train_here(shard_copy, tmp_path / "run")
    assert p.returncode == 2, p.stderr
    assert p.stderr == f"restorer train: error: data.shards: {path} {problem}{REMEDY}\n"
