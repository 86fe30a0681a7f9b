"""A feature's layer graph in a page (block runs): the chart of the features that feed it
and that it feeds through the block, and its edge and node tables exported beside the pages
so a reader can take them away."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from coact.errors import CoactError
from coact.report.charts.graph import Links, graph_chart
from coact.report.embed import Figures
from coact.rundir.read import RunData

if TYPE_CHECKING:
    from coact.block.graph import Direction, LayerTables

GRAPH_DIR = "graphs"  # under docs/: the layer graphs' edge and node tables


class GraphWriter:
    """Draws the layer graph of a feature (`coact.block.graph.feature_graph`) into a page and
    exports its edge and node tables into docs/graphs/ (copied into the site), so the
    page can link them."""

    def __init__(self, docs: Path, top: int = 3, depth: int = 2) -> None:
        self.dir = docs / GRAPH_DIR
        self.top, self.depth = top, depth

    def section(
        self,
        data: RunData,
        site: str,
        feature: int,
        direction: Direction,
        fig: Figures,
        name: str,
        prefix: str = "",
        links: Links | None = None,
    ) -> list[str]:
        """The chart of one feature's graph and links to its exported tables; `prefix`
        leads from the page to docs/ (e.g. "../" from a feature page); `links`: the page
        each node opens when clicked. A run without block results draws the MLP's own
        connections."""
        from coact.block.graph import feature_graph, write_graph

        tables = data.layer_tables() or mlp_tables(data)
        if tables is None:
            return []
        try:
            graph = feature_graph(
                tables, site, feature, top=self.top, depth=self.depth, direction=direction
            )
        except CoactError as error:
            return [f"No layer graph of `{site}` #{feature}: {error}.", ""]
        paths = write_graph(graph, self.dir)
        chart, caption = graph_chart(graph, links)
        files = " · ".join(
            f"[{what}]({prefix}{GRAPH_DIR}/{paths[key].name})"
            for what, key in (
                ("edge table (CSV)", "csv"),
                ("edge table (parquet)", "edges"),
                ("node table (parquet)", "nodes"),
            )
        )
        return [
            fig.figure(chart, name, caption),
            "",
            f"{graph.edges.height:,} connections among {graph.nodes.height:,} features: {files}.",
            "",
        ]


def mlp_tables(data: RunData) -> LayerTables | None:
    """The MLP connector's weights alone as a layer graph's tables (a run without block
    results); None without a connector."""
    from coact.block.graph import LayerTables

    if data.weights is None:
        return None
    labels = {data.out_site: data.labels} if data.labels is not None else {}
    return LayerTables(data.layer, mlp=data.weights, labels=labels)
