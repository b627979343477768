"""The command-line tools' one face: one parser, one way to end and one way to warn, under one name
a tool ("restorer plot": its usage, its errors, its warnings, the command that runs it).

A mistake in the command (a missing file, a bad option) or any other RestorerError is one line
`restorer TOOL: error: ...` on stderr and its exit code (restorer.base.errors), never a traceback;
so is a file that cannot be read or written (exit 2); Ctrl-C is one line and 130. Library code warns
with `warn(text)`: the line carries the name of the tool that is running (`run` sets it; the
trainer's DataLoader workers, forked, inherit it), "restorer" outside any tool."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from restorer.base.errors import FieldError, RestorerError, UsageError, one_line
from restorer.base.urls import mask_secrets

__all__ = ["Parser", "UsageError", "one_line", "run", "tool_name", "warn"]

_tool = "restorer"  # the tool that is running (run sets it)


def tool_name() -> str:
    return _tool


def said_as_option(e: FieldError, options: Optional[dict[str, str]] = None) -> UsageError:
    """A library's FieldError as the command's mistake: the option that set the field (`options` maps
    the fields whose option is not --FIELD) instead of the field's name."""
    option = (options or {}).get(e.field, f"--{e.field}")
    return UsageError(f"{option}: {e.message}")


def warn(text: str) -> None:
    """Every warning of every tool: one line `restorer TOOL: warning: text` on stderr (a password in a
    URL masked)."""
    print(mask_secrets(f"{_tool}: warning: {text}"), file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as UsageError (one line, no usage block)."""

    def error(self, message: str):
        raise UsageError(message)


def run(prog: str, body: Callable[[], int], *, quiet: Callable[[RestorerError], bool] = lambda e: False,
        interrupted: str = "interrupted") -> int:
    """body()'s exit status; a RestorerError is one line `prog: error: ...` (unless `quiet(e)`: an
    error every rank of a run raises alike is said by rank 0 alone) and its exit code. `prog` is the
    tool's name for warn() meanwhile."""
    global _tool
    outer, _tool = _tool, prog
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
    finally:
        _tool = outer
