"""A config field that carries its own help text: the dataclass is the one place a setting's
default and meaning are written, and the command line reads both from it
(`coact.cli.option`), as sparsify's dataclass configs are its CLI."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def setting(default: T, help: str) -> T:
    """A dataclass field with this default and help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def default_of(cls: Any, name: str) -> Any:
    """The default of field `name` of dataclass `cls` (its factory called, if it has one)."""
    found = {f.name: f for f in dataclasses.fields(cls)}[name]
    if found.default is not dataclasses.MISSING:
        return found.default
    if found.default_factory is not dataclasses.MISSING:
        return found.default_factory()
    raise TypeError(f"{cls.__name__}.{name} has no default")


def help_of(cls: Any, name: str) -> str:
    """The help text of field `name` of dataclass `cls` ("" when it has none)."""
    found = {f.name: f for f in dataclasses.fields(cls)}[name]
    return str(found.metadata.get("help", ""))
