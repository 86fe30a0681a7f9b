"""Crash-safe file writing and checksums, shared by every stage that writes a run."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed so shards of any size fit in memory."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write via a synced temp file + rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def finished_result(done: Path, key: str, required: Iterable[str] = ()) -> dict[str, Any] | None:
    """The headline a stage wrote last (`done`), if it carries `key` and every `required`
    file beside it exists: a finished result to reuse. Otherwise None, and `done` is
    removed so an interrupted run is redone rather than half-reused."""
    if done.is_file():
        previous = json.loads(done.read_text())
        if previous.get("key") == key and all((done.parent / f).is_file() for f in required):
            return dict(previous)
    done.unlink(missing_ok=True)
    return None


def result_key(codes: str, config: Any, version: int, ignore: Iterable[str] = ("progress",)) -> str:
    """What a stage's result depends on: the codes' fingerprint, its (dataclass) config
    without the fields that only change how it runs or is shown, and its result version."""
    relevant = {k: v for k, v in asdict(config).items() if k not in set(ignore)}
    text = json.dumps({"codes": codes, "config": relevant, "version": version}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def finite_mean(values: Any) -> float:
    """Mean over the finite entries (dead features give NaN), NaN when there are none."""
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else float("nan")
