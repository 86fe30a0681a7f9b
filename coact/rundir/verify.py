"""Verify before reuse: a stage's finished results and the code store are checked before a
command trusts them, so a corrupted or deleted file stops the command (naming the file and
the command that recomputes it) instead of being reused in silence.

Sizes are checked always; the sha256 only when a file's size or time moved since it was
last seen whole. Each stage folder carries a stamp of what it wrote (`StageFiles.stamp`);
the code store's manifest holds each shard's sha256, and `CodesFiles.stamp` remembers the
size and time at which each shard last matched it.

A stage reruns guarded (`guarded`): its previous folder is kept aside while it runs and put
back if it fails, so a rejected or crashed rerun never costs the earlier results.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from coact.errors import CoactError
from coact.rundir.files import read_json, sha256_file, write_json
from coact.rundir.layout import CodesFiles, StageFiles

T = TypeVar("T")
ANALYZE = "the `coact analyze` that made the run (same settings) to recompute it"


def _files(folder: Path) -> list[Path]:
    """The files a stage wrote into `folder` (its stamp, temporaries and hidden ones aside)."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)
        if path.is_file() and not hidden and not path.name.endswith(".tmp"):
            found.append(path)
    return found


def stamp(files: StageFiles) -> None:
    """Record size, time and sha256 of every file in the stage's folder (after it finished);
    an unchanged stamp is not rewritten."""
    old = read_stamp(files)
    entries: dict[str, list[Any]] = {}
    for path in _files(files.path):
        name = str(path.relative_to(files.path))
        stat = path.stat()
        seen = old.get(name)
        if seen is not None and seen[:2] == [stat.st_size, stat.st_mtime_ns]:
            entries[name] = seen
        else:
            entries[name] = [stat.st_size, stat.st_mtime_ns, sha256_file(path)]
    if entries != old and files.path.is_dir():
        write_json(files.stamp, {"files": entries})


def read_stamp(files: StageFiles) -> dict[str, list[Any]]:
    try:
        data = read_json(files.stamp)
    except CoactError:
        return {}
    entries = (data or {}).get("files")
    return dict(entries) if isinstance(entries, dict) else {}


def problem(files: StageFiles) -> str | None:
    """What is wrong with a finished stage's files against its stamp (None: all whole, or
    no stamp to check against, as in runs from before stamps)."""
    if not files.result.is_file():
        return None
    entries = read_stamp(files)
    for name, (size, mtime, digest) in entries.items():
        path = files.path / name
        if not path.is_file():
            return f"{path} is missing"
        stat = path.stat()
        if stat.st_size != size:
            return f"{path} is {stat.st_size} bytes, {size} when its stage wrote it"
        if stat.st_mtime_ns != mtime and sha256_file(path) != digest:
            return f"{path} changed since its stage wrote it (checksum mismatch)"
    for path in files.tables:
        if not path.is_file():
            return f"{path} is missing"
    return None


def require(files: StageFiles, command: str) -> None:
    """Stop, naming the file and `command`, when an input a command reads is not as its
    stage wrote it."""
    found = problem(files)
    if found is not None:
        raise CoactError(f"{found}; rerun {command}")


def require_codes(codes: Path, command: str = ANALYZE) -> None:
    """Every shard the code store's manifest lists is there, of the size it had when its
    checksum last held; a shard whose size or time moved is hashed against the manifest."""
    files = CodesFiles(codes)
    manifest = read_json(files.manifest)
    if manifest is None or not isinstance(manifest.get("shards"), list):
        raise CoactError(f"no feature codes in {codes} (manifest.json missing); rerun {command}")
    try:
        seen = read_json(files.stamp) or {}
    except CoactError:
        seen = {}
    fresh: dict[str, list[Any]] = {}
    for shard in manifest["shards"]:
        for relative, digest in dict(shard.get("files", {})).items():
            fresh[relative] = _shard_entry(codes / relative, digest, seen.get(relative), command)
    if fresh != seen:
        with suppress(OSError):  # a read-only store is verified again next time
            write_json(files.stamp, fresh)


def _shard_entry(path: Path, digest: str, seen: Any, command: str) -> list[Any]:
    if not path.is_file():
        raise CoactError(f"{path} is missing from the code store; rerun {command}")
    stat = path.stat()
    entry = [stat.st_size, stat.st_mtime_ns, digest]
    if seen == entry:
        return entry
    if isinstance(seen, list) and len(seen) == 3 and seen[2] == digest and seen[0] != entry[0]:
        raise CoactError(
            f"{path} is {entry[0]} bytes, {seen[0]} when it was collected; delete it and "
            f"rerun {command}"
        )
    if sha256_file(path) != digest:
        raise CoactError(
            f"{path} does not match its checksum in the code store's manifest; delete it "
            f"and rerun {command}"
        )
    return entry


@contextmanager
def guarded(files: StageFiles) -> Iterator[None]:
    """Run a stage into its folder with the previous results kept aside: a finished result
    whose files no longer match its stamp is not reused (its headline goes, so the stage
    recomputes); on failure the previous folder is put back whole; on success the folder
    is stamped and the kept copy dropped."""
    _recover(files)
    found = problem(files)
    if found is not None:
        print(f"coact: {found}; recomputing {files.path}", file=sys.stderr)
        files.result.unlink()
    kept = files.path.is_dir()
    if kept:
        os.replace(files.path, files.backup)
        shutil.copytree(files.backup, files.path)  # copied: a write in place spares the kept
    try:
        yield
    except BaseException:
        if kept:
            shutil.rmtree(files.path, ignore_errors=True)
            os.replace(files.backup, files.path)
        raise
    if kept:
        shutil.rmtree(files.backup, ignore_errors=True)
    stamp(files)


def guarded_call(files: StageFiles, compute: Callable[..., T], *args: Any) -> T:
    """`compute(*args)` run `guarded` for the stage whose folder `files` names."""
    with guarded(files):
        return compute(*args)


def _recover(files: StageFiles) -> None:
    """After a run killed mid-stage: the kept previous results come back unless the stage
    had finished (its headline is there), in which case they are dropped."""
    if not files.backup.is_dir():
        return
    if files.result.is_file() and files.path.is_dir():
        shutil.rmtree(files.backup, ignore_errors=True)
        return
    shutil.rmtree(files.path, ignore_errors=True)
    os.replace(files.backup, files.path)


__all__ = ["guarded", "guarded_call", "problem", "require", "require_codes", "stamp"]
