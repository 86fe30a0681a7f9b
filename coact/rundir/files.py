"""Crash-safe file writing and checksums, shared by every stage that writes a run."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from coact.errors import CoactError


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed so shards of any size fit in memory."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _file_mode() -> int:
    """What open() gives a new file under this process's umask (mkstemp's is 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()  # read once, at import: os.umask is not thread-safe


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write via a synced temporary file + rename: a crash leaves the old file or the new
    one. The temporary name is unique (in the target's folder, so the rename is atomic),
    so two writers of one file never write into each other's temporary file."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # as readable as a plain write would leave it
        with open(tmp, "rb") as synced:
            os.fsync(synced.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A fresh folder beside `final` (unique, so concurrent builders never share one) to
    build into; when the block succeeds it replaces `final` whole (`swap_in`), when it
    fails it is removed and `final` is left as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_owned(final), suffix=".tmp", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the report from its readers
    try:
        yield staging
        swap_in(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def swap_in(staging: Path, final: Path, tries: int = 50) -> None:
    """Move folder `staging` to `final`: the old `final` is moved aside first and removed
    after, so a reader finds the old folder or the new one, never a half-written one.

    A process killed mid-swap leaves its aside folder behind (and its staged folder, and
    perhaps no `final` at all: the next build then finds no report and rebuilds it). Once
    the new folder is in place, the aside and staged folders of `final` whose process is
    dead are removed (`remove_leftovers`)."""
    aside = Path(tempfile.mkdtemp(prefix=_owned(final), suffix=".old", dir=final.parent))
    try:
        for attempt in range(tries):  # another writer may swap its folder in between
            with suppress(FileNotFoundError):  # another writer may have moved it aside
                os.replace(final, aside / str(attempt))
            try:
                os.replace(staging, final)
                break
            except OSError as error:  # `final` is back: another writer's folder, not ours
                if error.errno not in _TAKEN:
                    raise
            time.sleep(random.uniform(0, 0.001 * (attempt + 1)))  # let that writer finish
        else:
            raise OSError(f"could not swap {staging} in as {final}: it keeps being replaced")
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    remove_leftovers(final)


_TAKEN = (errno.ENOTEMPTY, errno.EEXIST)  # what renaming onto a full folder raises


def _owned(final: Path) -> str:
    """The name prefix of this process's staged and aside folders of `final`: its pid and
    host, so that a later swap can tell the folders of a dead process."""
    return f".{final.name}.{os.getpid()}@{socket.gethostname()}."


def remove_leftovers(final: Path) -> list[Path]:
    """Remove the staged (`.tmp`) and aside (`.old`) folders of `final` left by a process
    of this host that is dead; return them. A folder of a live process, of another host
    (whose processes cannot be seen from here) or without an owner in its name is kept."""
    owned = re.compile(rf"\.{re.escape(final.name)}\.(\d+)@(.*)\.[^.]*\.(?:tmp|old)")
    removed = []
    for path in sorted(final.parent.glob(f".{glob.escape(final.name)}.*")):
        match = owned.fullmatch(path.name)
        if match and path.is_dir() and not _alive(int(match[1]), match[2]):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int, host: str) -> bool:
    """Whether process `pid` of `host` may still run (True where this host cannot tell)."""
    if host != socket.gethostname() or os.name != "posix":  # os.kill(pid, 0) kills on Windows
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_json(path: Path, payload: Any) -> None:
    """`payload` as indented JSON, written atomically (values JSON lacks become strings)."""
    text = json.dumps(payload, indent=2, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`; None when the file is missing, one clear error when it
    is not a JSON object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CoactError(f"corrupt {path}: {error}") from None
    if not isinstance(data, dict):
        raise CoactError(f"corrupt {path}: expected a JSON object")
    return data
