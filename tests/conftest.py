"""Session fixtures: what many tests start from is built once (shards, a trained run) and copied."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import assert_ok, pack_photos, train_here

# the run every resume test starts from: 4 steps, a checkpoint every step (the newest 2 kept as
# step copies), validation at steps 2 and 4 (best.pt), a constant lr of 1e-3
BASE_RUN = ("train.max_steps=4", "checkpoint.every=1", "checkpoint.keep=2", "log.val_every=2", "optim.schedule=constant")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """10 photos: 8 for training in 3 shards (fewer than 2 ranks x 2 workers need), 2 for validation."""
    return pack_photos(tmp_path_factory.mktemp("shards"), 10, maxcount=3)


@pytest.fixture(scope="session")
def _base_run(tmp_path_factory, shards) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    assert_ok(train_here(shards, out, *BASE_RUN))
    return out


@pytest.fixture
def base_run(_base_run, tmp_path) -> Path:
    """A copy of the base run (BASE_RUN), this test's to change."""
    out = tmp_path / "run"
    shutil.copytree(_base_run, out)
    return out


# `make test` hands whole files to its workers in collection order (--no-loadscope-reorder: xdist would put the
# files of most tests first): the longest go first, so that no worker is left running one of them alone at the
# end. On 2 cores, two workers, the AVX-512 kind: test_slurm, test_exact_resume, test_train and test_resume
# 1-1.5 minutes each (test_slurm mostly waiting on its jobs, while the other worker has the CPU), test_trackers
# under 1, test_export and test_http under half, the others seconds.
LONGEST_FIRST = ("test_train.py", "test_slurm.py", "test_exact_resume.py", "test_resume.py", "test_trackers.py",
                 "test_export.py", "test_http.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept
