"""The checkpoint's format version: a file of a version this restorer does not know is refused in one
line that names the versions it reads, by every tool that reads checkpoints."""

from __future__ import annotations

import pytest

from helpers import cli_here, encode, load_state, photo_like, save_network, save_state, write
from restorer.tools import restore
from restorer.formats.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, read_checkpoint
from restorer.models import build_model


@pytest.fixture
def checkpoint(tmp_path):
    return save_network(tmp_path / "net.pt", build_model("dncnn", depth=3, channels=8), "dncnn", {"depth": 3, "channels": 8})


@pytest.mark.parametrize("version", [99, FORMAT_VERSION + 1, 0, "2"])
def test_a_checkpoint_of_an_unknown_format_version_is_refused_in_one_line(tmp_path, checkpoint, version):
    state = load_state(checkpoint)
    assert read_checkpoint(checkpoint).network.name == "dncnn"  # the file as written reads
    future = save_state(tmp_path / "future.pt", {**state, "version": version})
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(future)
    message = str(e.value)
    assert "\n" not in message and f"versions 1 to {FORMAT_VERSION}" in message and FORMAT in message
    photo = write(tmp_path / "in" / "a.jpg", encode(photo_like(64, 48, 1), "JPEG", quality=20))
    p = cli_here(restore.main, "--ckpt", future, photo, "--out", tmp_path / "out")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and f"versions 1 to {FORMAT_VERSION}" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out" / "a.png").exists()
