"""The report a researcher reads: a run directory → markdown pages with altair charts →
an offline mkdocs-material site (`build_report`). See docs/report.md."""

from __future__ import annotations

from coact.report.build import build_report
from coact.report.evidence import Evidence, default_decode

__all__ = ["Evidence", "build_report", "default_decode"]
