"""The one error convention: every failure a user can act on is a RestorerError whose message is one
line and whose `exit_code` says how a tool ends: 2 when the command, a config or an input file was
wrong (fix it and run again), 1 when the work itself failed (a diverging run, an export that did not
check out). Each module raises its own subclass; every command-line tool reports them the same way
(restorer.base.cli.run): `TOOL: error: message`, never a traceback."""

from __future__ import annotations

MAX_LINE = 300  # characters of a message a library raised (an exporter's, a decoder's) that are kept


def one_line(e: BaseException | str, limit: int = MAX_LINE) -> str:
    """An exception's (or a text's) message on one line, whitespace collapsed, cut at `limit`."""
    text = " ".join(str(e).split()) or (type(e).__name__ if isinstance(e, BaseException) else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


class RestorerError(Exception):
    """A failure the user can act on; the message is one line."""

    exit_code = 2

    def __str__(self) -> str:
        return one_line(super().__str__(), limit=10_000)


class UsageError(RestorerError):
    """A mistake in the command: an option, a missing file or folder."""


class FieldError(UsageError):
    """A value a library function cannot use, in the library's words: `field` names the parameter, and
    a command that set it from an option says the option instead (restorer.base.cli.said_as_option)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class RunError(RestorerError):
    """The work itself failed (the inputs were fine)."""

    exit_code = 1


class LaunchError(RestorerError):
    """The processes were started in a way that cannot work; one line saying how to launch."""
