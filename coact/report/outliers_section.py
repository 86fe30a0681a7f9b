"""The layer page's outlier features (possible artefacts): how a feature is flagged, each
site's counts, and the list of flagged features."""

from __future__ import annotations

import html
from collections.abc import Collection
from typing import Any

import polars as pl

from coact.evidence.outliers import OutlierConfig, OutliersResult
from coact.report.markdown import Cell, finite, html_table, md_table, note, num, pct, sort_key
from coact.report.names import feature_link
from coact.report.outlier_marks import OUTLIER, outlier_mark
from coact.rundir.read import RunData

KINDS = ("first_tokens", "first_delimiter", "high_norm")


def outliers_section(data: RunData, pages: Collection[int]) -> list[str]:
    """The flagging rule, each site's counts and the flagged features."""
    out = ["## Outlier features (possible artefacts)", ""]
    summary, table = data.outlier_summary, data.outliers
    if table is None:
        return [*out, note("No outlier check: `coact outliers RUN` runs it."), ""]
    out += _criteria(summary.config if summary else OutlierConfig())
    out += _site_counts(summary)
    flagged = table.filter(pl.col("outlier")).sort(["site", "n_active"], descending=[False, True])
    if not flagged.height:
        return [*out, "No feature is flagged.", ""]
    cells = [_flagged_row(data, r, pages) for r in flagged.iter_rows(named=True)]
    headers = ["site", "feature", "active tokens", "first tokens", "first delimiter"]
    table_html = html_table([*headers, "high norm", "reason"], cells, sortable=True)
    out += [
        f"<details><summary>The {flagged.height:,} flagged features (click to open; sortable)"
        f"</summary>{table_html}</details>",
        "",
    ]
    return out


def _criteria(cfg: OutlierConfig) -> list[str]:
    """The rule a feature is flagged by, with the run's settings."""
    return [
        f"A feature is flagged ({OUTLIER} in every table, the reason in its tooltip) when at "
        f"least {pct(cfg.share, 0)} of the tokens it fires on, with at least "
        f"{cfg.min_active} of them, are one kind of token where models park "
        "attention or norm rather than meaning:",
        "",
        f"- **first tokens**: positions 1 to {cfg.first_positions - 1} of a context (BOS, "
        "position 0, is not stored): attention-sink positions;",
        f"- **first delimiter**: the first newline, period or comma of its context (decided by "
        f"the token's text, {cfg.delimiters!r} with spaces aside);",
        f"- **high norm**: tokens whose activation norm at the site exceeds "
        f"{cfg.norm_factor:g}× the site's median (massive activations), the norm "
        "being that of the SAE's reconstruction from the stored codes.",
        "",
    ]


def _site_counts(summary: OutliersResult | None) -> list[str]:
    """Per site: alive, judged and flagged features, by kind, and each kind's base rate."""
    rows = []
    for slug, s in (summary.sites if summary else {}).items():
        share_of_alive = s.flagged / s.alive if s.alive else None
        rows.append(
            [
                f"`{slug}`",
                num(s.alive),
                num(s.judged),
                f"{num(s.flagged)} ({pct(share_of_alive)})",
                num(s.first_tokens),
                num(s.first_delimiter),
                num(s.high_norm) if s.norm != "unknown" else "unknown",
                " / ".join(pct(s.base_rates.get(kind), 2) for kind in KINDS),
            ]
        )
    if not rows:
        return []
    headers = ["site", "alive features", "judged", "flagged (of alive)", "first tokens"]
    share = "share of all stored tokens that are first / first delimiter / high norm"
    return [md_table([*headers, "first delimiter", "high norm", share], rows), ""]


def _flagged_row(data: RunData, r: dict[str, Any], pages: Collection[int]) -> list[Cell]:
    """One flagged feature: its site, name (linked where it has a page) and shares."""
    j, slug = int(r["feature"]), str(r["site"])
    name = feature_link(j, pages) if slug == data.out_slug else f"in {j}"
    return [
        (html.escape(slug), slug),
        (name + outlier_mark(data, slug, j), j),
        (num(r["n_active"]), r["n_active"]),
        (pct(r["share_first_tokens"], 0), sort_key(r["share_first_tokens"])),
        (pct(finite(r["share_first_delimiter"]), 0), sort_key(r["share_first_delimiter"])),
        (pct(finite(r["share_high_norm"]), 0), sort_key(r["share_high_norm"])),
        (html.escape(str(r["reason"])), r["reason"]),
    ]
