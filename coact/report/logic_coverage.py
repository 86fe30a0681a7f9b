"""The layer page's account of how much of the features the labels explain: coverage of
activation mass, held-out fit, how many inputs 80 % coverage would take, and the
supernodes (groups of features sharing inputs and computation)."""

from __future__ import annotations

import html
from collections.abc import Collection

import polars as pl

from coact.logic.coverage import CoverageSummary
from coact.logic.supernodes import describe_supernode
from coact.report.markdown import Cell, html_table, md_table, num
from coact.report.names import feature_link
from coact.rundir.read import RunData


def coverage_part(data: RunData) -> list[str]:
    """The headline (labelled with ≥ target coverage), medians, and the distribution of the
    inputs a feature needs; what the other features are instead."""
    g = data.logic
    c: CoverageSummary | None = g.coverage if g is not None else None
    if c is None or data.labels is None:
        return []
    pct = f"{c.coverage_target:.0%}"
    alive = data.labels.filter(pl.col("label") != "DEAD")
    rules = dict(alive.filter(pl.col("label") == "UNEXPLAINED").group_by("rule").len().iter_rows())
    verdict = "met" if c.share_explained >= 0.5 else "not met"
    headline = (
        f"**{c.explained:,} of {c.alive:,} alive features ({c.share_explained:.1%})** carry a "
        f"label other than UNEXPLAINED whose inputs cover at least {pct} of their activation "
        f"mass (the target is half: {verdict}). Median coverage "
        f"{num(c.median_coverage, '.2f')}, median held-out AUC of the truth table "
        f"{num(c.median_auc, '.2f')}"
    )
    if c.median_jacobian_share is not None:
        headline += (
            ", median share of the Jacobian's attribution the inputs carry "
            f"{num(c.median_jacobian_share, '.2f')}"
        )
    headline += (
        ". Inputs: the connector's, co-activation's and the Jacobian's candidates with "
        f"lift ≥ {c.min_lift:g}, grown by coverage up to {c.max_inputs} per truth table."
    )
    needed = (
        f"Inputs a greedy search needs to cover {pct} of a feature's activation mass (up to "
        f"{c.coverage_search} candidates): {c.reached:,} features reach it"
    )
    if c.inputs_needed:
        q = c.inputs_needed
        needed += (
            f", median {num(q.get('median'))} (p25 {num(q.get('p25'))}, p75 "
            f"{num(q.get('p75'))}, p90 {num(q.get('p90'))})"
        )
    histogram = c.inputs_needed_histogram
    out = [
        "### How much the labels explain",
        "",
        headline,
        "",
        needed + ".",
        "",
        md_table(list(histogram), [list(histogram.values())]),
        "",
    ]
    if rules:
        parts = ", ".join(f"{n:,} *{r}*" for r, n in sorted(rules.items(), key=lambda x: -x[1]))
        out += [
            f"The UNEXPLAINED features instead: {parts}. *uncovered*: more than half of their "
            "firing happens with none of their truth-table inputs active (their activation "
            "is spread over many inputs, each with a small share); *no rule fits*: their "
            "inputs cover them but rows are mixed (the inputs raise the firing rate without "
            "deciding it).",
            "",
        ]
    return out


def supernodes_part(data: RunData, pages: Collection[int]) -> list[str]:
    """Each supernode: its label, members, shared inputs and how alike its members are."""
    path = data.layout.logic.supernodes
    if data.logic is None or not path.is_file():
        return []
    groups = pl.read_parquet(path)
    out = ["### Supernodes", ""]
    if not groups.height:
        return [*out, "No two labelled features share both inputs and computation.", ""]
    rows: list[list[Cell]] = []
    for r in groups.head(20).iter_rows(named=True):
        members = ", ".join(feature_link(int(o), pages) for o in r["members"])
        rows.append([
            (num(r["size"]), r["size"]),
            (html.escape(describe_supernode(r).split(" = ", 1)[1]), None),
            (members, None),
            (num(r["mean_inputs_jaccard"], ".2f"), r["mean_inputs_jaccard"]),
            (num(r["mean_coactivation"], ".2f"), r["mean_coactivation"]),
        ])  # fmt: skip
    headers = ["features", "shared formula", "members", "input overlap", "co-activation"]
    return [
        *out,
        f"{groups.height:,} groups of features share a label, most of their inputs (Jaccard) "
        "and their firing tokens (Jaccard of the tokens where they fire); the largest (up to 20):",
        "",
        html_table(headers, rows, True),
        "",
    ]
