"""The layer page's logic labels: how many features each computation explains and the most
confident features of each label; and how a label reads as a formula (`in 3 AND NOT in 9`),
which the feature pages write too."""

from __future__ import annotations

import html
from collections.abc import Collection, Mapping
from typing import Any

import polars as pl

from coact.report.charts import logic as logic_charts
from coact.report.embed import Figures
from coact.report.logic_coverage import coverage_part, supernodes_part
from coact.report.markdown import Cell, html_table, note, num
from coact.report.names import feature_link
from coact.report.outlier_marks import flag_inputs, outlier_mark
from coact.rundir.read import RunData

LABEL_ORDER = ("WEIGHTED-SUM", "OR", "AND", "A-AND-NOT-B", "NONLINEAR", "UNEXPLAINED", "DEAD")


def describe_label(row: Mapping[str, Any]) -> str:
    """`in 12 OR in 40`, `in 3 AND NOT in 9`, … (the label's reading of a feature)."""
    inputs = [f"in {i}" for i in row.get("inputs") or []]
    label = row["label"]
    if label in ("OR", "AND", "WEIGHTED-SUM"):
        return {"OR": " OR ", "AND": " AND ", "WEIGHTED-SUM": " + "}[label].join(inputs) or label
    if label == "A-AND-NOT-B":
        negated = row.get("negated")
        rest = [f"in {i}" for i in row.get("inputs") or [] if i != negated]
        return " AND ".join(rest) + (f" AND NOT in {negated}" if negated is not None else "")
    if label == "NONLINEAR" and row.get("kind"):
        return f"NONLINEAR, {row['kind']} (inputs: {', '.join(inputs) or 'none'})"
    return f"{label} (inputs: {', '.join(inputs) or 'none'})"


def logic_section(data: RunData, fig: Figures, pages: Collection[int]) -> list[str]:
    """The label counts and, per label, its three most confident features."""
    out = ["## Logic labels", ""]
    g = data.logic
    if g is None or data.labels is None:
        return [*out, note("Features were not labelled: `coact logic RUN` labels them."), ""]
    out.append(
        fig.figure(
            logic_charts.label_counts(g.counts, g.hidden_counts, g.tokens),
            "label-counts",
            "Read: how many features each computation explains; UNEXPLAINED features fire "
            "mostly without their inputs or follow no clean rule.",
        )
    )
    labels = data.labels.filter(pl.col("label") != "DEAD")
    rows: list[list[Cell]] = []
    for label in LABEL_ORDER:
        best = labels.filter(pl.col("label") == label).sort(
            ["confidence", "n_active"], descending=True
        )
        for r in best.head(3).iter_rows(named=True):
            j = int(r["output"])
            rows.append(
                [
                    (label, label),
                    (feature_link(j, pages) + outlier_mark(data, data.out_slug, j), j),
                    (flag_inputs(data, html.escape(describe_label(r)), r.get("inputs")), None),
                    (num(r["confidence"], ".2f"), r["confidence"]),
                    (num(r["n_active"]), r["n_active"]),
                ]
            )
    headers = ["label", "feature", "computation", "confidence", "active tokens"]
    out += [
        "",
        "The most confident features of each label:",
        "",
        html_table(headers, rows, True),
        "",
    ]
    return out + coverage_part(data) + supernodes_part(data, pages)
