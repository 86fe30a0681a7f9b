"""The sortable table of the layer page's featured output features (every feature is in
the feature browser, browser.py): verdict, d, activity, the sparse connector, the logic
label, the outlier flag and why a feature was shown."""

from __future__ import annotations

import html
from collections.abc import Collection, Mapping
from typing import Any

import polars as pl

from coact.report.markdown import Cell, formula_html, html_table, num, sort_key
from coact.report.names import feature_link
from coact.report.outlier_marks import outlier_cell, outlier_mark
from coact.rundir.read import RunData

HEADERS = (
    "feature",
    "verdict",
    "d (seed form)",
    "d / variance",
    "active tokens",
    "sparse NMSE",
    "terms",
    "label",
    "confidence",
    "formula",
)


def features_table(
    data: RunData,
    featured: Mapping[int, list[str]] | None,
    pages: Collection[int],
    prefix: str,
) -> str:
    """A sortable table of output features (the featured ones, or all when None)."""
    f = data.features
    assert f is not None
    wanted = f if featured is None else f.filter(pl.col("feature").is_in(list(featured)))
    if featured is not None:
        order = {j: i for i, j in enumerate(featured)}
        wanted = wanted.sort(pl.col("feature").replace_strict(order, default=len(order)))
    headers = list(HEADERS)
    if data.outliers is not None:
        headers.append("artefact?")
    if data.calibrated is not None:
        headers.insert(2, "at calibrated τ")
    if featured is not None:
        headers.append("why shown")
    row = _Rows(data, featured, pages, prefix)
    return html_table(headers, [row(r) for r in wanted.iter_rows(named=True)], sortable=True)


class _Rows:
    """One row per output feature; its logic label and calibrated verdict are read once."""

    def __init__(
        self,
        data: RunData,
        featured: Mapping[int, list[str]] | None,
        pages: Collection[int],
        prefix: str,
    ) -> None:
        self.data, self.featured, self.pages, self.prefix = data, featured, pages, prefix
        self.labels: dict[int, dict[str, Any]] = {}
        if data.labels is not None:
            self.labels = {int(r["output"]): r for r in data.labels.iter_rows(named=True)}
        self.calibrated: dict[int, str] = {}
        if data.calibrated is not None:
            c = data.calibrated
            self.calibrated = dict(zip(c["feature"].to_list(), c["verdict"].to_list(), strict=True))

    def __call__(self, r: dict[str, Any]) -> list[Cell]:
        """The cells of the feature whose linearity row is `r`."""
        data, j = self.data, int(r["feature"])
        shown = feature_link(j, self.pages, self.prefix) + outlier_mark(data, data.out_slug, j)
        lab = self.labels.get(j, {})
        verdict = r.get("verdict") or r.get("status")
        row: list[Cell] = [
            (shown, j),
            (str(verdict), verdict),
            (num(r["d_seed"]), sort_key(r["d_seed"])),
            (num(r["d_fvu"]), sort_key(r["d_fvu"])),
            (num(r["active_count"]), r["active_count"]),
            (num(r.get("nmse_sparse")), sort_key(r.get("nmse_sparse"))),
            (num(r.get("n_terms")), r.get("n_terms")),
            (str(lab.get("label", "–")), lab.get("label", "")),
            (num(lab.get("confidence"), ".2f"), sort_key(lab.get("confidence"))),
            (formula_html(str(r.get("formula") or "")), None),
        ]
        if data.outliers is not None:
            row.append(outlier_cell(data, data.out_slug, j))
        if data.calibrated is not None:
            row.insert(2, (self.calibrated.get(j, "–"), self.calibrated.get(j, "")))
        if self.featured is not None:
            row.append((html.escape("; ".join(self.featured[j])), None))
        return row
