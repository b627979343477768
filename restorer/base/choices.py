"""Choices in the typed configs: a dataclass field annotated `Literal[...]` takes one of its values.
`check_choices` is the one check (with the one message style, "field: must be one of ..., got ..."),
called by each section's validate(); the config loader reads such a field as a plain value."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

__all__ = ["Literal", "check_choices", "choices"]


def choices(cls: type, name: str) -> tuple:
    """The values field `name` of dataclass `cls` may take (its Literal's), or () if it is not one."""
    hint = typing.get_type_hints(cls)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def check_choices(obj) -> None:
    """ValueError for the first Literal field of a dataclass instance whose value is not a choice."""
    for f in dataclasses.fields(obj):
        allowed = choices(type(obj), f.name)
        if allowed and getattr(obj, f.name) not in allowed:
            raise ValueError(f"{f.name}: must be one of {', '.join(map(str, allowed))}, got {getattr(obj, f.name)!r}")
