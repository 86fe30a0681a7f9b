"""Charts across the layers of a model run."""

from __future__ import annotations

import altair as alt
import polars as pl

from coact.report.charts.base import SOURCE_COLOURS, chart_title, titled, to_pandas


def layer_shares(frame: pl.DataFrame) -> alt.LayerChart:
    """Per layer and series (MLP linear, attention linear, attention same position): the
    percent of alive features at each layer's own τ (solid, its noise bracket, at least –
    at most, as a band) and at the seed's τ = 0.001 (dashed), which is one threshold for
    every layer."""
    x = alt.X("layer:O", title="block ℓ (layer)")
    names = frame["series"].unique(maintain_order=True).to_list()
    palette = alt.Scale(
        domain=names, range=["#1f77b4", "#ff7f0e", "#d62728", "#2ca02c"][: len(names)]
    )
    y_title = "percent of alive features (%)"
    band = (
        alt.Chart(to_pandas(frame.filter(pl.col("low").is_not_null())))
        .mark_area(opacity=0.12)
        .encode(
            x=x,
            y=alt.Y("low:Q", title=y_title),
            y2="high:Q",
            fill=alt.Fill(
                "series:N", title="share", scale=palette, legend=alt.Legend(symbolOpacity=1)
            ),
            detail="threshold:N",
        )
    )
    y = alt.Y("percent:Q", title=y_title, scale=alt.Scale(domain=[0, 100]))
    colour = alt.Color("series:N", title="share", scale=palette)
    lines = (
        alt.Chart(to_pandas(frame))
        .mark_line()
        .encode(
            x=x,
            y=y,
            color=colour,
            strokeDash=alt.StrokeDash(
                "threshold:N", title="threshold", sort=None,
                scale=alt.Scale(range=[[1, 0], [5, 3]]),
                legend=alt.Legend(symbolType="stroke", symbolStrokeColor="black"),
            ),
        )
    )  # fmt: skip
    points = (
        alt.Chart(to_pandas(frame))
        .mark_point(filled=True, size=40)
        .encode(
            x=x,
            y=y,
            color=colour,
            tooltip=["layer:O", "series:N", "threshold:N",
                     alt.Tooltip("percent:Q", format=".1f"), alt.Tooltip("low:Q", format=".1f"),
                     alt.Tooltip("high:Q", format=".1f"), alt.Tooltip("tau:Q", format=".3g")],
        )
    )  # fmt: skip
    return titled(
        band + lines + points,
        "Linear and same-position shares per layer",
        [
            "solid: at each layer's own τ (calibrated where calibration ran), band: the "
            "share beyond the noise floor (at least – at most);",
            "dashed: at the seed's τ = 0.001 (seed form), one threshold for every layer",
        ],
        460,
        260,
    )


def layer_composition(frame: pl.DataFrame, r2: pl.DataFrame) -> alt.LayerChart:
    """Per layer, the next stream's variance share per source (stacked bars; least squares
    on training tokens) and the sparse fit's held-out R² (black ticks)."""
    sources = frame["source"].unique(maintain_order=True).to_list()
    x = alt.X("layer:O", title="block ℓ (layer)")
    bars = (
        alt.Chart(to_pandas(frame))
        .mark_bar()
        .encode(
            x=x,
            y=alt.Y("share:Q", title="share of resid_pre[ℓ+1] feature variance (mean)"),
            color=alt.Color(
                "source:N",
                title="source",
                sort=sources,
                scale=alt.Scale(domain=sources, range=SOURCE_COLOURS[: len(sources)]),
            ),
            order=alt.Order("rank:Q"),
            tooltip=["layer:O", "source:N", alt.Tooltip("share:Q", format=".3f")],
        )
    )
    ticks = (
        alt.Chart(to_pandas(r2))
        .mark_tick(color="black", thickness=2, size=30)
        .encode(x=x, y="r2:Q", tooltip=["layer:O", alt.Tooltip("r2:Q", format=".3f")])
    )
    return titled(
        bars + ticks,
        "Residual composition per layer: which source the next stream's features come from",
        "bars: mean variance share per source (least squares, training tokens; they add "
        "up to its R²); black tick: the sparse fit's held-out R²",
        460,
        260,
    )


def layer_decoded(frame: pl.DataFrame) -> alt.Chart:
    """Per layer, the decoded checks' FVU against the true next stream."""
    return (
        alt.Chart(to_pandas(frame))
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="block ℓ (layer)"),
            y=alt.Y("fvu:Q", title="FVU of resid_pre[ℓ+1] (fraction of variance unexplained)"),
            color=alt.Color("check:N", title="check", sort=None),
            tooltip=["layer:O", "check:N", alt.Tooltip("fvu:Q", format=".4g")],
        )
        .properties(
            width=460,
            height=260,
            title=chart_title(
                "Decoded checks per layer: how much of the next stream each reading gives back",
                "raw activations of the evaluation contexts; lower is better, the target SAE's "
                "own reconstruction is the floor for the decoded composition",
            ),
        )
    )
