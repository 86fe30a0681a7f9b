"""The README's key table of summary.json against the typed summary: every key it names
exists, and every key of a run and of each stage's headline is named."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

from coact.pipeline.summary import RunSummary

README = Path(__file__).resolve().parents[1] / "README.md"


def documented_keys() -> list[str]:
    """Key paths of the table under '### `summary.json`': in a row, a key without a dot
    continues the prefix of the row's first key (`connect.alpha`, `alpha_index`)."""
    text = README.read_text()
    section = text[text.index("### `summary.json`") :]
    section = section[: section.index("\n### ", 1)]
    keys = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split(" | ")[0].lstrip("| ")
        prefix = ""
        for key in re.findall(r"`([^`]+)`", cell):
            if "." in key:
                prefix = key.rsplit(".", 1)[0] + "."
                keys.append(key)
            else:
                keys.append(prefix + key)
    return keys


def _unwrap(hint: Any) -> Any:
    """The dataclass or dict type behind an optional."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return options[0] if len(options) == 1 else hint
    return hint


def resolve(path: str) -> Any:
    """The type a key path names in RunSummary (`<...>` is any key of a mapping)."""
    hint: Any = RunSummary
    for part in path.split("."):
        hint = _unwrap(hint)
        if part.startswith("<"):
            assert typing.get_origin(hint) is dict, f"{path}: {part} is no mapping's key"
            hint = typing.get_args(hint)[1]
            continue
        assert dataclasses.is_dataclass(hint), f"{path}: {part} is inside no typed result"
        hints = typing.get_type_hints(hint)
        assert part in hints, f"{path}: {hint.__name__} has no field {part!r}"
        hint = hints[part]
    return hint


def test_every_documented_key_exists() -> None:
    keys = documented_keys()
    assert len(keys) > 80
    for key in keys:
        resolve(key)


def test_every_key_of_a_run_and_of_each_stage_headline_is_documented() -> None:
    keys = set(documented_keys())
    tops = {key.split(".")[0] for key in keys}
    hints = typing.get_type_hints(RunSummary)
    assert {f.name for f in dataclasses.fields(RunSummary)} <= tops
    for name, hint in hints.items():
        stage, prefix = _unwrap(hint), name
        if typing.get_origin(stage) is dict:  # sites.<site>.…
            stage, prefix = typing.get_args(stage)[1], f"{name}.<site>"
        if not dataclasses.is_dataclass(stage):
            continue
        for field in dataclasses.fields(stage):  # type: ignore[arg-type]
            path = f"{prefix}.{field.name}"
            named = path in keys or any(key.startswith(path + ".") for key in keys)
            assert named, f"{path} is not documented"


def test_a_wrong_key_is_caught() -> None:
    import pytest

    with pytest.raises(AssertionError, match="no field 'alhpa'"):
        resolve("connect.alhpa")
    with pytest.raises(AssertionError, match="no mapping"):
        resolve("connect.<site>")
