"""Typed stage results: each stage returns a frozen dataclass of its figures that writes
and reads its own JSON, so readers get fields, not `.get(...)` chains."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TypedDict

from coact.errors import CoactError
from coact.models.sites import SitePair
from coact.rundir.files import read_json, write_json
from coact.rundir.layout import StageFiles


@dataclasses.dataclass(frozen=True, kw_only=True)
class Result:
    """The base of every stage's result: `to_dict` / `from_dict` and JSON files."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return from_dict(cls, data)

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> Self | None:
        """The result in `path`; None when it is missing, one clear error when it is not
        this kind of result (a file of another version or another stage)."""
        data = read_json(path)
        if data is None:
            return None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise CoactError(
                f"{path} is not a {cls.__name__} (written by another version of coact?): "
                f"{error}; rerun its stage"
            ) from None

    @classmethod
    def finished(cls, files: StageFiles, key: str) -> Self | None:
        """The result a stage wrote last, if it carries `key` and every table beside it
        exists: a finished result to reuse. Otherwise None, and the stale headline is
        removed: an interrupted or outdated result is redone, not half-reused."""
        path = files.result
        data = read_json(path) if path.is_file() else None
        if data is not None and data.get("key") == key and all(p.is_file() for p in files.tables):
            try:
                return cls.from_dict(data)
            except (TypeError, ValueError):
                pass  # written by another version: redone below
        path.unlink(missing_ok=True)
        return None


class PairHead(TypedDict):
    """What every result of a stage on a site pair starts with: its key, the pair and
    the folder of its tables."""

    key: str
    in_site: str
    out_site: str
    directory: str


def pair_head(key: str, pair: SitePair, files: StageFiles) -> PairHead:
    return PairHead(
        key=key, in_site=str(pair.in_site), out_site=str(pair.out_site), directory=str(files.path)
    )


class Timings(dict[str, float]):
    """Seconds per part of a stage, as its result reports them (`<part>_s`)."""

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self[f"{name}_s"] = time.perf_counter() - started


def from_dict(cls: Any, data: Mapping[str, Any]) -> Any:
    """A (nested) dataclass from its `asdict()` form: nested dataclasses, optional ones,
    mappings and lists of them are rebuilt, lists become tuples where typed so. Keys the
    class does not know are ignored (figures a newer version adds)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.init and f.name in data:
            values[f.name] = _value(hints[f.name], data[f.name])
    return cls(**values)


def _value(hint: Any, value: Any) -> Any:
    """`value` (from JSON) as the type `hint` names, where that takes rebuilding."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):  # e.g. an on/off flag where settings now stand
            raise TypeError(f"{getattr(hint, '__name__', hint)} settings expected, found {value!r}")
        return from_dict(hint, value)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _value(options[0], value)
        if isinstance(value, list) and any(typing.get_origin(a) is tuple for a in options):
            return tuple(value)
        return value
    if origin is tuple and isinstance(value, list):
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        return tuple(_value(inner, v) if inner is not None else v for v in value)
    if origin is list and isinstance(value, list):
        return [_value(args[0], v) for v in value]
    if origin in (dict, Mapping) and isinstance(value, Mapping) and len(args) == 2:
        return {k: _value(args[1], v) for k, v in value.items()}
    return value


def result_key(
    inputs: Any, config: Any, version: int, ignore: Iterable[str] = ("progress",)
) -> str:
    """What a stage's result depends on: its inputs' fingerprints (JSON-able), its
    (dataclass) config without the fields that only change how it runs or is shown, and
    its result version."""
    relevant = {k: v for k, v in dataclasses.asdict(config).items() if k not in set(ignore)}
    text = json.dumps({"codes": inputs, "config": relevant, "version": version}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
