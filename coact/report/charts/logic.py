"""Charts of the logic labels: counts per label, co-activation scatter, truth tables and
co-activation modes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import altair as alt
import polars as pl

from coact.report.charts.base import chart_title, titled, to_pandas


def label_counts(
    counts: Mapping[str, int], hidden: Mapping[str, int] | None, n_tokens: int | None
) -> alt.LayerChart:
    """Features per logic label (and sae-connector hidden latents), symlog axis."""
    rows = [{"label": k, "targets": "output features", "count": int(v)} for k, v in counts.items()]
    if hidden:
        rows += [
            {"label": k, "targets": "hidden latents", "count": int(v)} for k, v in hidden.items()
        ]
    frame = to_pandas(pl.DataFrame(rows))
    base = alt.Chart(frame).encode(
        y=alt.Y("label:N", title="logic label", sort=list(counts)),
        yOffset=alt.YOffset("targets:N"),
        x=alt.X("count:Q", title="features (count, symlog axis)", scale=alt.Scale(type="symlog")),
    )
    bars = base.mark_bar().encode(
        color=alt.Color("targets:N", title="targets"), tooltip=["label:N", "targets:N", "count:Q"]
    )
    text = base.mark_text(align="left", dx=3).encode(text="count:Q")
    seen = f"{n_tokens:,} tokens" if n_tokens else "the stored tokens"
    return titled(
        bars + text,
        "Logic labels: which computation explains each feature",
        f"labels from co-activation counts over {seen}",
        420,
    )


def coactivation(
    data: pl.DataFrame, inputs: list[int], target: int, title: str
) -> alt.TopLevelMixin:
    """Input activations against each other on tokens where any input or the target fires,
    coloured by the target's activation: a grid of pairs for three or four inputs."""
    names = [f"in {i}" for i in inputs]
    out = f"out {target}"
    frame = data.to_pandas()
    color = alt.Color(f"{out}:Q", title=f"{out} activation", scale=alt.Scale(scheme="viridis"))
    subtitle = f"{len(frame):,} tokens where an input or the target is active (code units)"
    if len(names) <= 2:  # one input: against the target itself; two: against each other
        y_name = names[1] if len(names) == 2 else out
        chart = _scatter(frame, names[0], y_name, color, 14)
        return chart.properties(width=320, height=260, title=chart_title(title, subtitle))
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    panels = [_scatter(frame, a, b, color, 10).properties(width=180, height=160) for a, b in pairs]
    rows = [alt.hconcat(*panels[i : i + 3]) for i in range(0, len(panels), 3)]
    return alt.vconcat(*rows).properties(title=chart_title(title, subtitle))


def _scatter(frame: Any, x: str, y: str, color: alt.Color, size: int) -> alt.Chart:
    """Activation of `x` against `y`, one dot per token, coloured by the target."""
    return (
        alt.Chart(frame)
        .mark_circle(size=size, opacity=0.6)
        .encode(
            x=alt.X(f"{x}:Q", title=f"{x} activation"),
            y=alt.Y(f"{y}:Q", title=f"{y} activation"),
            color=color,
        )
    )


def truth_table(table: pl.DataFrame, title: str) -> alt.LayerChart:
    """P(target active) per input pattern as a heat map, with each row's token count."""
    frame = table.with_columns(
        pl.format("{} ({} tokens)", pl.col("pattern"), pl.col("count")).alias("row")
    ).to_pandas()
    base = alt.Chart(frame).encode(
        y=alt.Y("row:N", title="inputs active (bit j = input j), tokens", sort=None)
    )
    heat = (
        base.mark_rect()
        .encode(
            x=alt.X("quantity:N", title=None, axis=alt.Axis(labels=False, ticks=False)),
            color=alt.Color("p_active:Q", title="P(target active)", scale=alt.Scale(domain=[0, 1])),
        )
        .transform_calculate(quantity="'P(target active)'")
    )
    text = (
        base.mark_text()
        .encode(x=alt.X("quantity:N"), text=alt.Text("p_active:Q", format=".2f"))
        .transform_calculate(quantity="'P(target active)'")
    )
    tokens = int(table["count"].sum()) if table.height else 0
    return titled(
        heat + text,
        title,
        f"truth table over {tokens:,} tokens; rows with fewer than the "
        "minimum tokens are unobserved",
        160,
    )


def cluster_summary(clusters: pl.DataFrame, title: str) -> alt.TopLevelMixin:
    """Each co-activation mode's centroid per input (heat map), with its share of tokens
    and the target's mean: where the target fires, and where its inputs fire but it does not."""
    rows = []
    for r in clusters.filter(pl.col("cluster") >= 0).iter_rows(named=True):
        name = (
            f"{r['kind']} #{r['cluster']}: {100 * r['share']:.0f}% of tokens, "
            f"target {r['target_mean']:.2f}"
        )
        for i, value in zip(r["inputs"], r["centroid"], strict=True):
            rows.append({"mode": name, "input": f"in {i}", "centroid": value})
    frame = pl.DataFrame(
        rows, schema={"mode": pl.String, "input": pl.String, "centroid": pl.Float64}
    )
    base = alt.Chart(frame.to_pandas()).encode(
        x=alt.X("input:N", title="input feature", axis=alt.Axis(labelAngle=0)),
        y=alt.Y(
            "mode:N",
            title="co-activation mode (HDBSCAN)",
            sort=None,
            axis=alt.Axis(labelLimit=400),
        ),
    )
    heat = base.mark_rect().encode(
        color=alt.Color("centroid:Q", title="mean activation (code units)")
    )
    text = base.mark_text().encode(text=alt.Text("centroid:Q", format=".2f"))
    tokens = int(clusters["size"].sum()) if clusters.height else 0
    return titled(
        heat + text,
        title,
        f"modes found among {tokens:,} sampled tokens (noise points left out)",
        220,
    )
