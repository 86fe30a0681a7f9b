"""What each input adds to an output feature where both fire: from the sparse connector
(refitted weight × the input's code) and, once the jacobian stage ran, from the block's
own Jacobian (its mean J·code); drawn small beside a feature's formula."""

from __future__ import annotations

import altair as alt
import numpy as np
import polars as pl

from coact.report.charts.base import chart_title, to_pandas
from coact.report.evidence import Evidence
from coact.rundir.read import RunData

SCHEMA = {"input": pl.Int64, "source": pl.String, "contribution": pl.Float64, "tokens": pl.Int64}
TOOLTIP = ["feature:N", "source:N", alt.Tooltip("contribution:Q", format=".3g"), "tokens:Q"]
SOURCES = alt.Scale(domain=["connector", "Jacobian"], range=["#1f77b4", "#9467bd"])


def input_contributions(
    data: RunData, evidence: Evidence | None, j: int, k: int = 6
) -> pl.DataFrame:
    """Per input of output j (the connector's k largest |refitted weight|, and the
    Jacobian's k largest total attribution) and source: the mean contribution to out j on
    the tokens where both fire (code units), and on how many tokens."""
    rows: list[dict[str, object]] = []
    if data.weights is not None and evidence is not None:
        w = data.weights.filter(pl.col("output") == j)
        w = w.sort(pl.col("weight_refit").abs(), descending=True).head(k)
        out_rows, _ = evidence.column(data.out_slug, j)
        for i, weight in w.select("input", "weight_refit").iter_rows():
            in_rows, values = evidence.column(data.in_slug, int(i))
            both = np.isin(in_rows, out_rows, assume_unique=True)
            if both.any():
                mean = float(weight) * float(values[both].mean())
                rows.append({"input": int(i), "source": "connector", "contribution": mean,
                             "tokens": int(both.sum())})  # fmt: skip
    connections = data.jacobian_connections()
    if connections is not None:
        c = connections.filter(pl.col("output") == j)
        total = (pl.col("attribution_mean") * pl.col("n_tokens")).abs()
        c = c.sort(total, descending=True).head(k)
        for i, mean, n in c.select("input", "attribution_mean", "n_tokens").iter_rows():
            rows.append({"input": int(i), "source": "Jacobian", "contribution": float(mean),
                         "tokens": int(n)})  # fmt: skip
    return pl.DataFrame(rows, schema=SCHEMA)


def contributions_chart(table: pl.DataFrame, name: str) -> alt.Chart:
    """Small grouped bars: one row per input, a bar per source."""
    order = (
        table.group_by("input")
        .agg(pl.col("contribution").abs().max().alias("size"))
        .sort(["size", "input"], descending=[True, False])["input"]
        .to_list()
    )
    frame = table.with_columns(pl.format("in {}", pl.col("input")).alias("feature"))
    sources = " and ".join(s for s in ("connector", "Jacobian") if s in set(table["source"]))
    return (
        alt.Chart(to_pandas(frame))
        .mark_bar()
        .encode(
            y=alt.Y("feature:N", sort=[f"in {i}" for i in order], title="input"),
            yOffset=alt.YOffset("source:N"),
            x=alt.X("contribution:Q", title=f"mean contribution to {name} (code units)"),
            color=alt.Color(
                "source:N", scale=SOURCES, title="from", legend=alt.Legend(orient="bottom")
            ),
            tooltip=TOOLTIP,
        )
        .properties(
            width=220,
            height=max(80, 22 * len(order)),
            title=chart_title(
                f"What its inputs add to {name}",
                [f"where both fire; from the {sources}"],
            ),
        )
    )
