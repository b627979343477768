"""Credentials in URLs (`https://user:password@host/...`): what may be shown of them. Every place
that prints or logs a URL, a config or a message that may hold one masks it with `mask_secrets`:
warnings, errors, config.yaml, the trackers' parameters, the resume line. And which URLs the data
pipeline may open at all (`shard_url_problem`)."""

from __future__ import annotations

import re
from typing import Any, Optional
from urllib.parse import urlsplit

MASK = "***"
# scheme://userinfo@ where userinfo holds a ':' (user:password) or is a token alone (https://TOKEN@host)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:'\"]*)(?::(?P<password>[^\s/@'\"]*))?@")


def _mask(m: re.Match) -> str:
    if m.group("password") is not None:
        return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
    return f"{m.group('scheme')}{MASK}@" if m.group("user") else m.group(0)


def mask_secrets(value: Any) -> Any:
    """`value` with the password (or the token) of every URL in it replaced by ***: a string, or the
    strings inside a dict, list or tuple (a config tree); anything else as it is."""
    if isinstance(value, str):
        return _USERINFO.sub(_mask, value) if "@" in value else value
    if isinstance(value, dict):
        return {k: mask_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_secrets(v) for v in value)
    return value


# ----------------------------------------------------------------------------- what the data pipeline may open

READ_SCHEMES = ("file", "http", "https")  # besides plain paths; pipe: only with data.allow_pipe


def shard_url_problem(url: str, allow_pipe: bool) -> Optional[str]:
    """Why the data pipeline must not open `url` (one line, its secrets masked), or None.

    The scheme is read as webdataset's gopen reads it (urllib's, lower-cased, after leading blanks
    and tabs are dropped), so `Pipe:`, ` pipe:` or `pi<TAB>pe:` are the pipes they would open; and it
    must be written exactly as the pipeline dispatches on it (gopen's own `assert` on `pipe:` is gone
    under `python -O`). Only plain paths, file:, http:, https: and, allowed, pipe: are read."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError as e:  # "http://[::1/x": Invalid IPv6 URL
        return f"{mask_secrets(url)!r} is not a URL the pipeline can read: {e}"
    if not scheme or (url.startswith(f"{scheme}:") and (scheme in READ_SCHEMES or (scheme == "pipe" and allow_pipe))):
        return None
    if scheme == "pipe" and not allow_pipe:
        return (f"{mask_secrets(url)!r}: a pipe: URL runs a shell command on every rank and worker: "
                "set data.allow_pipe=true if you mean it")
    written = url[: url.find(":") + 1]
    return (f"{mask_secrets(url)!r}: {written!r} is not a scheme the pipeline reads: plain paths, file:, http:, "
            "https: (and pipe: with data.allow_pipe=true), written in lower case")
