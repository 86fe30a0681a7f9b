"""The report is rebuilt only when what it is built from changed: a fingerprint of its
inputs (every result and table of the run, the code store's manifest, the SAEs, the pages
asked for and the report's own code) is stored beside the built report; a resume or a
second `coact report` with the same fingerprint reuses the site as it is.

Figures that change on every run without changing the report's content (summary.json's
timings and the report's own path) are left out of the fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from coact.report.evidence import Decode
from coact.rundir.files import atomic_write, read_json, sha256_file
from coact.rundir.layout import SUMMARY, CodesFiles, ReportFiles, RunLayout

SKIPPED = ("report", "graph")  # what the report writes, or reads nothing from
VOLATILE = ("timings", "report")  # summary.json keys that change on every run


def _inputs(run_dir: Path) -> Iterator[Path]:
    """The run's files the report may read: not its own output, not hidden files (claims,
    stamps, kept copies), and of the code store only its manifest (which holds every
    shard's checksum)."""
    for path in sorted(run_dir.rglob("*")):
        parts = path.relative_to(run_dir).parts
        if not path.is_file() or parts[0] in SKIPPED or path.name.endswith(".tmp"):
            continue
        if any(part.startswith(".") for part in parts):
            continue
        if parts[0] == "codes" and path.name != "manifest.json":
            continue
        yield path


def _digest(path: Path) -> str:
    if path.name == SUMMARY:
        data = read_json(path) or {}
        kept = {k: v for k, v in data.items() if k not in VOLATILE}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    return sha256_file(path)


def _code() -> str:
    """The report package's own source: a new coact draws a new report."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def inputs_fingerprint(run_dir: str | Path, features: Sequence[int] | int | None) -> str:
    """sha256 over the report's inputs (names and contents), the pages asked for and the
    report's code."""
    run = Path(run_dir)
    layout = RunLayout.of(run)
    entries = [(str(p.relative_to(run)), _digest(p)) for p in _inputs(run)]
    shared = CodesFiles(layout.codes).manifest
    if layout.shared_dir.resolve() != run.resolve() and shared.is_file():
        entries.append(("shared codes manifest", sha256_file(shared)))
    asked = features if features is None or isinstance(features, int) else list(features)
    text = json.dumps({"inputs": entries, "features": asked, "code": _code()})
    return hashlib.sha256(text.encode()).hexdigest()


def build_report_if_changed(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    decode: Decode | None = None,
    features: Sequence[int] | int | None = None,
) -> Path:
    """`coact.report.build.build_report`, unless the report in `out_dir` was built from the
    same inputs: then its index is returned as it is."""
    from coact.report.build import build_report

    run = Path(run_dir)
    final = ReportFiles(Path(out_dir) if out_dir is not None else RunLayout.of(run).report.path)
    fingerprint = inputs_fingerprint(run, features)
    built = final.index.is_file() and final.inputs.is_file()
    if built and final.inputs.read_text() == fingerprint:
        return final.index.resolve()
    index = build_report(run, out_dir, decode=decode, features=features)
    atomic_write(final.inputs, lambda tmp: tmp.write_text(fingerprint))
    return index


__all__ = ["build_report_if_changed", "inputs_fingerprint"]
