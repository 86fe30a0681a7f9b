"""How the command line meets its user's mistakes: a value outside its field's range
(a typer callback), a usage error as at most three lines, a file-system fault as one;
`coact.cli.main` prints them and exits 2, never with a traceback."""

from __future__ import annotations

import errno
import re
import sys
from typing import Any

import typer

from coact.settings import Range


def in_range(bounds: Range) -> Any:
    """A typer callback that rejects a value outside the field's declared range."""

    def check(value: Any) -> Any:
        if value is not None and not bounds.holds(value):
            raise typer.BadParameter(f"must be {bounds.describe()}, got {value}")
        return value

    return check


def fail(message: str) -> None:
    """One line on stderr, exit status 2."""
    print(f"coact: error: {message}", file=sys.stderr)
    sys.exit(2)


def file_fault(error: OSError) -> str:
    """A file-system fault as one line: what could not be done to which path, and why."""
    where = f" {error.filename}" if error.filename else ""
    reason = error.strerror or str(error)
    fixes = {
        "EACCES": "make it writable or choose another --run-dir",
        "EROFS": "the file system is read-only; choose another --run-dir",
        "ENOTDIR": "a file stands where a directory is needed; move it or choose another path",
        "EEXIST": "a file stands where a directory is needed; move it or choose another path",
        "ENOSPC": "free some space and re-run the same command to resume",
    }
    fix = fixes.get(errno.errorcode.get(error.errno or 0, ""), "check the path and its rights")
    return f"cannot use{where}: {reason}; {fix}"


def usage_lines(error: BaseException) -> list[str] | None:
    """A command-line usage error (typer's vendored click, or click itself) as at most
    three lines: what was wrong, the valid form and where the help is; None for anything
    else. No-arguments help has already been printed, so it adds nothing."""
    kinds: list[type] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            kinds.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except ImportError:
            continue
    if not isinstance(error, tuple(kinds)) or getattr(error, "exit_code", 1) == 0:
        return None
    if type(error).__name__ == "NoArgsIsHelpError":
        return []
    message = str(error.format_message()).strip().splitlines()[0]  # type: ignore[attr-defined]
    ctx = getattr(error, "ctx", None)
    if ctx is None:
        return [f"coact: error: {message}"]
    usage = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), ctx.get_usage().strip())
    return [
        f"coact: error: {message}",
        " ".join(usage.split()),
        f"Try '{ctx.command_path} --help' for help.",
    ]


__all__ = ["fail", "file_fault", "in_range", "usage_lines"]
