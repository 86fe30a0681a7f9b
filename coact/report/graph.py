"""`coact graph`: one feature's layer graph written beside a run, as tables and a chart."""

from __future__ import annotations

from pathlib import Path

from coact.block.graph import FeatureGraph
from coact.errors import CoactError
from coact.models.sites import Site
from coact.rundir.layout import GraphFiles


def write_feature_graph(
    run: Path,
    site: str,
    feature: int,
    top: int,
    depth: int,
    direction: str,
    out: Path | None = None,
) -> tuple[FeatureGraph, list[Path]]:
    """`coact graph`: one feature's layer graph from a layer run's weight tables, written
    as its edge and node tables and its chart (SVG, PNG) into `out` (default <run>/graph/)."""
    from coact.block.graph import feature_graph, write_graph
    from coact.report.charts.base import save
    from coact.report.charts.graph import graph_chart
    from coact.rundir.read import load_run

    data = load_run(run)
    tables = data.layer_tables()
    if tables is None:
        raise CoactError(
            f"{run} has no attention or composition results; run "
            f"`coact analyze --layer {data.layer} --block --run-dir {run}` first"
        )
    found = feature_graph(
        tables,
        site,
        feature,
        top=top,
        depth=depth,
        direction=direction,  # type: ignore[arg-type]
    )
    files = GraphFiles(out) if out is not None else data.layout.graph
    paths = write_graph(found, files.path)
    chart, _ = graph_chart(found)
    drawn = save(chart, files.stem(Site.parse(found.site).slug, found.feature))
    return found, [*paths.values(), *drawn]
