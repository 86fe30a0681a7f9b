"""A config field that carries its own help text and valid range: the dataclass is the one
place a setting's default, meaning and bounds are written; the command line reads all
three from it (`coact.cli.option`), as sparsify's dataclass configs are its CLI, and the
config checks the bounds when it is built (`check_ranges`), so the API is held to them too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from coact.errors import CoactError

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts: `low` ≤ value (< when `low_open`) ≤ `high`;
    None leaves a side open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if value != value:  # NaN
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        side = "above" if self.low_open else "at least"
        low = None if self.low is None else f"{side} {self.low:g}"
        high = None if self.high is None else f"at most {self.high:g}"
        if low and high and not self.low_open:
            return f"{self.low:g} to {self.high:g}"
        return " and ".join(part for part in (low, high) if part) or "a number"


def setting(
    default: T,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> T:
    """A dataclass field with this default, help text and (for numbers) valid range."""
    metadata: dict[str, Any] = {"help": help}
    if low is not None or high is not None:
        metadata["range"] = Range(low, high, low_open)
    return dataclasses.field(default=default, metadata=metadata)


def bounded(
    default: T, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> T:
    """A field the command line does not expose, with a valid range all the same."""
    return dataclasses.field(default=default, metadata={"range": Range(low, high, low_open)})


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


def range_of(cls: Any, name: str) -> Range | None:
    """The valid range of field `name` of dataclass `cls` (None when it declares none)."""
    found = {f.name: f for f in dataclasses.fields(cls)}[name]
    value = found.metadata.get("range")
    return value if isinstance(value, Range) else None


def check_ranges(config: Any) -> None:
    """One clear error naming the first field of `config` outside its declared range (a
    config's `__post_init__` calls this; nested configs check themselves)."""
    for f in dataclasses.fields(config):
        bounds = f.metadata.get("range")
        value = getattr(config, f.name)
        if isinstance(bounds, Range) and value is not None and not bounds.holds(value):
            flag = "--" + f.name.replace("_", "-")
            raise CoactError(
                f"{type(config).__name__}.{f.name} ({flag}) must be {bounds.describe()}, "
                f"got {value!r}"
            )


__all__ = ["Range", "bounded", "check_ranges", "default_of", "help_of", "range_of", "setting"]
