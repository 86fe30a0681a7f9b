"""The layer graph of one feature: nodes in columns by site, edges by weight and path."""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate, pairwise
from typing import Any

import altair as alt
import polars as pl

from coact.block.graph import FeatureGraph
from coact.models.sites import Site

SIGN_COLOURS = alt.Scale(domain=["adds (w > 0)", "subtracts (w < 0)"], range=["#1f77b4", "#d62728"])


PATH_DASHES = alt.Scale(
    domain=["skip", "attention", "mlp", "composition"],
    range=[[6, 3], [1, 0], [1, 0], [2, 2]],
)


WEIGHTS = {"weight_refit": "least-squares refit on the L1 support", "weight": "L1 weights"}


_ROW = 26  # pixels per node in the fullest column


def _column(site: Site, layer: int) -> float:
    """resid_pre[ℓ] | attn_out[ℓ], mlp_resid[ℓ] | mlp_out[ℓ] | resid_pre[ℓ+1]."""
    if site.kind == "resid_pre":
        return 0.0 if site.layer == layer else 3.0
    return 2.0 if site.kind == "mlp_out" else 1.0


def _site_rank(site: Site) -> int:
    """Inside the middle column: attention above, the MLP's input below."""
    return {"attn_out": 0, "resid_mid": 1, "mlp_resid": 2}.get(site.kind, 0)


def _layout(graph: FeatureGraph) -> pl.DataFrame:
    """x, y of every node: its site's column; evenly spaced from the top, a gap between
    the sites that share a column, ordered by hop then feature."""
    rows: list[dict[str, Any]] = []
    for node in graph.nodes.iter_rows(named=True):
        site = Site.parse(node["site"])
        label = f"{site}#{node['feature']}" + (f" ({node['label']})" if node["label"] else "")
        rows.append({**node, "x": _column(site, graph.layer), "rank": _site_rank(site),
                     "text": label})  # fmt: skip
    frame = pl.DataFrame(rows).sort(["x", "rank", "depth", "feature"])
    slots = []
    for _, column in frame.group_by("x", maintain_order=True):
        ranks = column["rank"].to_list()
        gaps = list(accumulate([0] + [int(a != b) for a, b in pairwise(ranks)]))
        slot = [i + gap for i, gap in enumerate(gaps)]
        slots.append(column.with_columns(pl.Series("slot", slot), pl.lit(max(slot) + 1).alias("n")))
    placed = pl.concat(slots)
    return placed.with_columns((1 - (pl.col("slot") + 0.5) / pl.col("n")).alias("y"))


Links = Callable[[str, int], str | None]  # (site, feature) → the page a node links to


def graph_chart(graph: FeatureGraph, links: Links | None = None) -> tuple[alt.LayerChart, str]:
    """(chart, caption): the graph of `feature_graph`, and the one line saying how to read
    it. Renders headlessly (vl-convert) to SVG or PNG. `links`: where a click on a node
    leads (its page), None for a node without one."""
    nodes = _layout(graph)
    hrefs = [
        links(str(s), int(f)) if links else None
        for s, f in nodes.select("site", "feature").iter_rows()
    ]
    nodes = nodes.with_columns(pl.Series("href", hrefs, dtype=pl.String))
    x, y = _axes(graph.layer)
    lines = _edge_lines(graph, nodes, x, y)
    dots = (
        alt.Chart(nodes.to_pandas())
        .mark_circle(stroke="black")
        .encode(
            x=x,
            y=y,
            size=alt.condition("datum.chosen", alt.value(260), alt.value(90)),
            color=alt.condition("datum.chosen", alt.value("#ff7f0e"), alt.value("#555555")),
            strokeWidth=alt.condition("datum.chosen", alt.value(1.5), alt.value(0)),
            tooltip=["site:N", "feature:Q", "label:N", "depth:Q", "href:N"],
            href="href:N",
        )
    )
    labels = (
        alt.Chart(nodes.to_pandas())
        .mark_text(align="left", dx=9, fontSize=10)
        .encode(
            x=x,
            y=y,
            text="text:N",
            href="href:N",
            color=alt.condition("datum.href", alt.value("#1565c0"), alt.value("#333333")),
        )
    )
    tallest = max(nodes.group_by("x").len()["len"].to_list(), default=1)
    chart = (lines + dots + labels).properties(
        width=820, height=max(240, _ROW * (tallest + 1)), title=_title(graph)
    )
    return chart, _caption(graph)


def _axes(layer: int) -> tuple[alt.X, alt.Y]:
    """x: the block's sites in the order the residual stream passes them; y: free."""
    names = [
        f"resid_pre[{layer}]",
        f"attn_out[{layer}] · mlp_resid[{layer}]",
        f"mlp_out[{layer}]",
        f"resid_pre[{layer + 1}]",
    ]
    x_axis = alt.Axis(
        values=[0, 1, 2, 3],
        labelExpr=f"{names}[datum.value]",
        orient="top",
        grid=False,
        domain=False,
        ticks=False,
        labelFontWeight="bold",
    )
    x_title = f"site in block {layer}, in the order the residual stream passes them"
    x_scale = alt.Scale(domain=[-0.15, 3.9], nice=False)
    x = alt.X("x:Q", scale=x_scale, axis=x_axis, title=x_title)
    return x, alt.Y("y:Q", scale=alt.Scale(domain=[0, 1], nice=False), axis=None)


def _edge_lines(graph: FeatureGraph, nodes: pl.DataFrame, x: alt.X, y: alt.Y) -> alt.Chart:
    """One rule per connection, coloured by sign, as wide as its strength, dashed by path."""
    where = nodes.select("site", "feature", "x", "y")
    edges = (
        graph.edges.join(
            where.rename({"site": "source_site", "feature": "source_feature"}),
            on=["source_site", "source_feature"],
        )
        .join(
            where.rename(
                {"site": "target_site", "feature": "target_feature", "x": "x2", "y": "y2"}
            ),
            on=["target_site", "target_feature"],
        )
        .with_columns(
            pl.when(pl.col("weight") >= 0)
            .then(pl.lit("adds (w > 0)"))
            .otherwise(pl.lit("subtracts (w < 0)"))
            .alias("sign"),
            pl.coalesce(pl.col("standardised").abs(), pl.col("weight").abs()).alias("strength"),
            (pl.col("source_site") + "#" + pl.col("source_feature").cast(pl.String)).alias("from"),
            (pl.col("target_site") + "#" + pl.col("target_feature").cast(pl.String)).alias("to"),
        )
    )
    standardised = graph.edges["standardised"].null_count() < graph.edges.height
    strength = "strength: |w|·sd(in)/sd(out)" if standardised else "strength: |weight| (code units)"
    tooltip = [
        "from:N", "to:N", "path:N", alt.Tooltip("weight:Q", format=".3f"),
        alt.Tooltip("strength:Q", format=".3f"), "depth:Q",
    ]  # fmt: skip
    return (
        alt.Chart(edges.to_pandas())
        .mark_rule(opacity=0.8)
        .encode(
            x=x,
            y=y,
            x2="x2:Q",
            y2="y2:Q",
            color=alt.Color("sign:N", scale=SIGN_COLOURS, title="weight sign"),
            strokeWidth=alt.StrokeWidth(
                "strength:Q", scale=alt.Scale(range=[0.75, 7]), title=strength
            ),
            strokeDash=alt.StrokeDash("path:N", scale=PATH_DASHES, title="path"),
            tooltip=tooltip,
        )
    )


def _title(graph: FeatureGraph) -> alt.TitleParams:
    hops = "hop" if graph.depth == 1 else "hops"
    walk = {"in": "feed it", "out": "it feeds", "both": "feed it and that it feeds"}
    return alt.TitleParams(
        f"Layer graph of {graph.site}#{graph.feature}",
        subtitle=[
            f"the features that {walk[graph.direction]}: the {graph.top} strongest per node, "
            f"up to {graph.depth} {hops}; {graph.edges.height} connections, "
            f"{graph.nodes.height} features",
            f"lines: connector weights ({WEIGHTS.get(graph.weight, graph.weight)}); orange: "
            "the chosen feature; labels from the logic stage where given",
        ],
        anchor="start",
    )


def _caption(graph: FeatureGraph) -> str:
    layer = graph.layer
    follow = {
        "in": "follow the lines from the chosen (orange) feature back through the block",
        "out": "follow the lines from the chosen (orange) feature forward through the block",
        "both": "lines left of the chosen (orange) feature feed it, lines right of it carry it on",
    }
    return (
        f"Read: {follow[graph.direction]}; a "
        "thick line is a strong connection, blue adds and red subtracts; dashed long lines "
        f"are the skip path (resid_pre[{layer}] carried into resid_pre[{layer + 1}]), solid "
        "ones the attention and MLP connectors, dotted ones what attention and the MLP write "
        f"into resid_pre[{layer + 1}]. Only the {graph.top} strongest connections of each node "
        "are drawn, so a missing line means a weaker or absent connection, not no effect."
    )
