"""The command-line tools' one parser and one way to end: a mistake in the command (a missing file,
a bad option) or any other RestorerError is one line `PROG: error: ...` on stderr and its exit code
(restorer.base.errors), never a traceback; so is a file that cannot be read or written (exit 2); Ctrl-C
is one line and 130."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from restorer.base.errors import RestorerError, UsageError, one_line

__all__ = ["Parser", "UsageError", "one_line", "run", "warn"]


def warn(prog: str, text: str) -> None:
    """Every warning of every tool: one line `prog: warning: text` on stderr."""
    print(f"{prog}: warning: {text}", file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as UsageError (one line, no usage block)."""

    def error(self, message: str):
        raise UsageError(message)


def run(prog: str, body: Callable[[], int], *, quiet: Callable[[RestorerError], bool] = lambda e: False,
        interrupted: str = "interrupted") -> int:
    """body()'s exit status; a RestorerError is one line `prog: error: ...` (unless `quiet(e)`: an
    error every rank of a run raises alike is said by rank 0 alone) and its exit code."""
    try:
        return body()
    except RestorerError as e:
        if not quiet(e):
            print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file the tool could not read or write (a full disk, no permission): the user's to fix
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: {interrupted}", file=sys.stderr)
        return 130
