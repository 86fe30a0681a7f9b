"""The report a researcher reads: a run directory → markdown pages with altair charts →
an offline mkdocs-material site (`build_report`). See docs/report.md."""
