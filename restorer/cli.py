"""The command-line tools' one error convention: a mistake in the command (a missing file, a bad
option) is one line `PROG: error: ...` on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """A mistake in the command; the message is one line."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as UsageError (one line, no usage block)."""

    def error(self, message: str):
        raise UsageError(message)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def fail(prog: str, e: BaseException) -> int:
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    return 2
