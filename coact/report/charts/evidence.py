"""Charts of a feature's evidence: its activation histogram and the context ablation."""

from __future__ import annotations

import altair as alt
import numpy as np
import polars as pl

from coact.report.charts.base import chart_title, shown_token, to_pandas


def activation_histogram(
    values: np.ndarray, name: str, n_tokens: int, width: int = 420, height: int = 200
) -> alt.Chart:
    """Histogram of a feature's non-zero activations (count axis symlog)."""
    values = np.asarray(values, dtype=float)
    rows: list[dict[str, float]] = []
    if len(values):
        hi = float(values.max())
        edges = np.linspace(0.0, hi if hi > 0 else 1.0, 31)
        counts, _ = np.histogram(values, bins=edges)
        rows = [
            {"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": float(c)}
            for i, c in enumerate(counts)
        ]
    frame = pl.DataFrame(rows, schema={"lo": pl.Float64, "hi": pl.Float64, "count": pl.Float64})
    share = 100.0 * len(values) / max(n_tokens, 1)
    return (
        alt.Chart(to_pandas(frame))
        .mark_rect(color="#ff7f0e")
        .encode(
            x=alt.X("lo:Q", title=f"{name} activation (code units)"),
            x2="hi:Q",
            y=alt.Y("count:Q", title="tokens (count, symlog axis)", scale=alt.Scale(type="symlog")),
            tooltip=["lo:Q", "hi:Q", "count:Q"],
        )
        .properties(
            width=width,
            height=height,
            title=chart_title(
                f"How strongly {name} fires",
                f"{len(values):,} active of {n_tokens:,} stored tokens ({share:.2f}%); "
                "inactive tokens (0) not shown"
                if width >= 300
                else [f"{len(values):,} of {n_tokens:,} tokens ({share:.2f}%);", "zeros not shown"],
            ),
        )
    )


def ablation_drops(table: pl.DataFrame, name: str, filler: str | None) -> alt.VConcatChart:
    """A heatmap per ablation mode, one above the other: one row per top context, one
    column per preceding token (its text in the cell), colour the share of the activation
    lost without it."""
    contexts = table.select("rank", "context", "position", "token", "clean").unique("rank")
    labels = {
        int(r["rank"]): f"{r['rank']}: …{shown_token(r['token'], 12)} ({r['clean']:.3g})"
        for r in contexts.iter_rows(named=True)
    }
    order = [labels[k] for k in sorted(labels)]
    frame = table.with_columns(
        pl.col("rank").replace_strict(labels, return_dtype=pl.String).alias("row"),
        pl.format("−{}", pl.col("ablated_offset")).alias("before"),
        pl.col("ablated_token")
        .map_elements(lambda t: shown_token(t, 8), return_dtype=pl.String)
        .fill_null("?")
        .alias("text"),
        pl.col("drop_fraction").clip(-1.0, 1.0).alias("shown_fraction"),
        (100 * pl.col("drop_fraction")).round(1).alias("drop %"),
    ).select(
        "mode", "row", "before", "ablated_offset", "text", "shown_fraction", "drop %",
        "drop", "clean", "ablated",
    )  # fmt: skip
    window = int(table["ablated_offset"].to_numpy().max()) if table.height else 0
    columns = [f"−{k}" for k in range(window, 0, -1)]
    how = {
        "remove": "removed (later tokens shift left)",
        "replace": f"replaced by '{shown_token(filler)}'" if filler else "replaced by a filler",
    }
    charts = []
    for mode in [m for m in ("remove", "replace") if m in set(frame["mode"])]:
        part = to_pandas(frame.filter(pl.col("mode") == mode))
        base = alt.Chart(part).encode(
            x=alt.X(
                "before:O",
                sort=columns,
                title="preceding token (tokens before the activating one)",
            ),
            y=alt.Y("row:N", sort=order, title="top context"),
        )
        cells = base.mark_rect().encode(
            color=alt.Color(
                "shown_fraction:Q",
                title="activation lost (share of clean)",
                scale=alt.Scale(domain=[-1, 1], scheme="redblue", reverse=True),
            ),
            tooltip=["row:N", "before:O", "text:N", "drop %:Q", "drop:Q", "clean:Q", "ablated:Q"],
        )
        text = base.mark_text(fontSize=10).encode(
            text="text:N",
            color=alt.condition(
                "abs(datum.shown_fraction) > 0.6", alt.value("white"), alt.value("black")
            ),
        )
        charts.append(
            (cells + text).properties(
                width=50 * max(window, 1), height=22 * len(order), title=f"token {how[mode]}"
            )
        )
    return alt.vconcat(*charts).properties(
        title=chart_title(
            f"{name}: how much of the activation each preceding token carries",
            [
                f"{len(order)} top contexts (rank: …activating token (clean activation, code "
                f"units)); each of the {window} tokens before the activating one ablated alone,",
                "the model rerun up to the site; red: the activation falls without the token, "
                "blue: it rises; ␣ is a space, ↵ a newline",
            ],
        )
    )
