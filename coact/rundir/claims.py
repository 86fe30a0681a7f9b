"""Claims on a run directory: before a process writes a stage, a layer or a shared step
(SAEs, codes), it claims it, so two writers of one run directory (two hand-started
processes, or the workers of `coact analyze --workers N`) never write the same files.

A claim is an OS file lock (`filelock`; the kernel drops it when its process dies, even
under SIGKILL) plus a record of its holder (pid, host, start time) beside it, which the
next writer names while it waits. A record left behind by a dead holder marks a claim that
was taken over: the work it guarded is redone from what was finished (every stage resumes).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from filelock import FileLock, Timeout

from coact.errors import CoactError
from coact.rundir.files import write_json
from coact.rundir.layout import ClaimFiles

Say = Callable[[str], None]
SHARED, SUMMARY = "shared", "summary"  # claims on what a run's layers share, and on its end


def say_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Holder:
    """Who holds a claim: enough to find the process (pid on host) and to judge its age."""

    pid: int
    host: str
    started: str  # UTC, ISO 8601 to the second

    @classmethod
    def me(cls) -> Holder:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(pid=os.getpid(), host=socket.gethostname(), started=now)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started}"


class ClaimHeld(CoactError):
    """Another writer holds the claim and the caller would not wait."""


class Claim:
    """One named claim of a run directory (`files`); `what` names it in messages."""

    def __init__(self, files: ClaimFiles, name: str, what: str = "") -> None:
        self.files, self.name, self.what = files, name, what or name
        files.path.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(files.lock(name), thread_local=False)

    def holder(self) -> Holder | None:
        """The recorded holder, or None (free, or its record not written yet)."""
        try:
            return Holder(**json.loads(self.files.holder(self.name).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def try_acquire(self, say: Say = say_stderr) -> bool:
        """Take the claim if it is free; False when another writer holds it."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        self._record(say)
        return True

    def acquire(self, *, wait: bool = True, say: Say = say_stderr) -> None:
        """Take the claim; while another writer holds it, wait (saying so in one line) or,
        with `wait=False`, stop with one line naming the holder."""
        if self.try_acquire(say):
            return
        holder = self.holder() or "another process (its record is not written yet)"
        if not wait:
            raise ClaimHeld(
                f"{self.what} is being written by {holder}; rerun when it is done, or wait "
                "for it (leave out --no-wait)"
            )
        say(f"coact: waiting for {self.what}: it is being written by {holder}")
        self._lock.acquire()
        self._record(say)

    def release(self) -> None:
        """Free the claim: the record goes first, so a record found later means its holder
        died holding the claim."""
        self.files.holder(self.name).unlink(missing_ok=True)
        self._lock.release()

    def _record(self, say: Say) -> None:
        previous = self.holder()
        if previous is not None and previous.pid != os.getpid():
            say(f"coact: taking over {self.what} from {previous}, which stopped without finishing")
        write_json(self.files.holder(self.name), asdict(Holder.me()))


@contextmanager
def claimed(
    files: ClaimFiles, name: str, what: str = "", *, wait: bool = True, say: Say = say_stderr
) -> Iterator[Claim]:
    """Hold claim `name` of `files` for the block (see `Claim.acquire`)."""
    claim = Claim(files, name, what)
    claim.acquire(wait=wait, say=say)
    try:
        yield claim
    finally:
        claim.release()
