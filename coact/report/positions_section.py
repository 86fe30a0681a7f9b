"""The layer page's table of the attention features that need earlier positions most (the
position score), each with its gain, verdict, carrier, causal counterpart and top tokens;
the features with a page of their own are linked."""

from __future__ import annotations

from typing import Any

from coact.models.sites import Site
from coact.report.charts import base as base_charts
from coact.report.charts import block as block_charts
from coact.report.embed import Figures
from coact.report.evidence import TokenText
from coact.report.markdown import Cell, html_table, num, sort_key
from coact.report.names import attention_link
from coact.report.outlier_marks import outlier_cell, outlier_mark
from coact.rundir.read import RunData

CARRIERS = {"previous": "previous token", "decayed": "further back (decayed)"}
HEADERS = (
    "verdict",
    "carrier",
    "previous token alone (/ variance)",
    "decayed context alone (/ variance)",
    "active tokens",
    "FVU with earlier tokens resampled",
    "same-position linear verdict",
    "top tokens",
)


def positions_part(
    data: RunData, fig: Figures, token_text: TokenText, tau: float, form: str
) -> list[str]:
    """The chart of every feature's gain against τ and the table of the ten that gain most."""
    from coact.report.select import position_ranking

    p, table = data.positions, data.positions_table
    assert p is not None and table is not None
    out = [
        "### Which attention features need earlier positions",
        "",
        fig.figure(
            block_charts.position_gains(table, form, tau, p.tokens_heldout),
            "position-gains",
            "Read: features right of τ gain from earlier positions (attention moves "
            "information to them); those left of 0 gain nothing, the wider fit only overfits.",
        ),
    ]
    top = position_ranking(data, form).head(10)
    row = _Rows(data, fig, token_text, base_charts.GAIN_COLUMN.get(form, "gain_seed"))
    rows = [row(r) for r in top.iter_rows(named=True)]
    headers = ["feature", f"gain ({form} form, 95% interval)", *HEADERS]
    if data.outliers is not None:
        headers.append("artefact?")
    out += [
        "",
        f"The {top.height} attention features (of `{data.attn_out_site}`) whose fit gains most "
        f"from earlier positions ({', '.join(p.summaries)}; decay {p.decay}, window "
        f"{p.window} tokens). Carrier: the summary that alone recovers more of the "
        "gain, for features that need context. Sortable; a linked feature has a page.",
        "",
        html_table(headers, rows, sortable=True),
        "",
    ]
    return out


class _Rows:
    """One row of the position table per feature: what the row needs from the other
    tables (same-position verdicts, resampled FVU) is read once."""

    def __init__(self, data: RunData, fig: Figures, token_text: TokenText, column: str) -> None:
        self.data, self.fig, self.token_text, self.column = data, fig, token_text, column
        self.slug = Site.parse(data.attn_out_site).slug
        self.verdicts: dict[int, str] = {}
        if data.attention_features is not None:
            f = data.attention_features
            self.verdicts = dict(zip(f["feature"].to_list(), f["verdict"].to_list(), strict=True))
        self.resampled: dict[int, float] = {}
        if data.attention_causal_table is not None:
            t = data.attention_causal_table
            self.resampled = dict(
                zip(t["feature"].to_list(), t["resample_fvu"].to_list(), strict=True)
            )

    def __call__(self, r: dict[str, Any]) -> list[Cell]:
        """The cells of the feature whose position-score row is `r`."""
        data, slug, column = self.data, self.slug, self.column
        j = int(r["feature"])
        previous, decayed = r.get("gain_previous_alone_fvu"), r.get("gain_decayed_alone_fvu")
        cells: list[Cell] = [
            (attention_link(self.fig, j, f"attn {j}") + outlier_mark(data, slug, j), j),
            (
                f"{num(r[column])} [{num(r[column + '_low'])}, {num(r[column + '_high'])}]",
                sort_key(r[column]),
            ),
            (str(r["verdict"]), r["verdict"]),
            (CARRIERS.get(str(r["carrier"]), "–"), r["carrier"] or ""),
            (num(previous), sort_key(previous)),
            (num(decayed), sort_key(decayed)),
            (num(r["active_count"]), r["active_count"]),
            (num(self.resampled.get(j)), sort_key(self.resampled.get(j))),
            (self.verdicts.get(j, "–"), self.verdicts.get(j, "")),
            (self.token_text(slug, j), None),
        ]
        if data.outliers is not None:
            cells.append(outlier_cell(data, slug, j))
        return cells
