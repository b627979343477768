"""Atomic file writes: a reader never sees a half-written file under its final name."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, Hashable, Iterator, Sequence, Union

from restorer.base.errors import UsageError

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(directory: PathLike) -> None:
    """Make a rename inside `directory` durable (a crash right after it cannot undo it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: PathLike) -> Path:
    """Where `path` is written before its rename: same folder (a rename across file systems is
    not atomic), hidden, and unique per process so two writers cannot interleave."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def commit(tmp: PathLike, path: PathLike) -> None:
    """Flush a finished temporary file to disk and rename it to its final name, durably."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """The temporary path to create `path` at; it is `commit`ted when the block ends. On any error,
    including KeyboardInterrupt or a failed rename, it is removed and `path` is left as it was."""
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to `temp_path(path)`, then `commit` it (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def atomic_write_json(path: PathLike, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


# what a tool writes is never what it reads (restore, export, plot, runs)


def file_identity(path: PathLike) -> Hashable:
    """What one file is, however it is named: (device, inode) when it exists (os.path.samefile's test:
    a symlink or a hard link to it is the same file); its absolute path, symlinks resolved, when it
    does not exist yet (two outputs named two ways)."""
    try:  # resolved first: "new/../net.pt" is net.pt once the writer has made the folder new
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop (RuntimeError before Python 3.13), a NUL
        resolved = Path(os.path.abspath(path))
    try:
        st = os.stat(resolved)
    except (OSError, ValueError):  # not there (yet), a dangling link
        return resolved
    return st.st_dev, st.st_ino


def refuse_overwrites(outputs: Sequence[tuple[str, PathLike]], inputs: Sequence[tuple[str, PathLike]],
                      hint: str) -> None:
    """UsageError (one line, before anything is written) for an output that is a folder, that is one
    of the tool's inputs or another of its outputs. Each pair: (what the user knows it as, its path)."""
    named: dict[Hashable, str] = {}
    for what, path in inputs:
        named.setdefault(file_identity(path), f"{what} {path}")
    for what, path in outputs:
        if os.path.isdir(path):
            raise UsageError(f"{what} {path} is a folder: {hint}")
        key = file_identity(path)
        if key in named:
            raise UsageError(f"{what} {path} would overwrite {named[key]}: {hint}")
        named[key] = f"{what} {path}"
