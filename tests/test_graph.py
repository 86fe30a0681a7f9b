"""The layer graph: hand-made weight tables whose edges, hops and top-k are known; the
figure renders headlessly with a title and a caption."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import vl_convert

from coact.block.graph import LayerTables, feature_graph, write_graph
from coact.errors import CoactError
from coact.report.charts.base import spec_title, untitled_axes
from coact.report.charts.graph import graph_chart


def _connect(rows: list[tuple[int, int, float, float]]) -> pl.DataFrame:
    """connect's weights.parquet: (output, input, weight_refit, standardised); the L1
    weight is half the refit (shrunk), so the tests see which column is drawn."""
    out, inp, refit, std = zip(*rows, strict=True)
    return pl.DataFrame(
        {"output": out, "input": inp, "weight": [w / 2 for w in refit], "weight_refit": refit,
         "standardised": std, "large": [s >= 0.05 for s in std]},
        schema_overrides={"output": pl.Int64, "input": pl.Int64},
    )  # fmt: skip


def _composition(rows: list[tuple[str, int, int, float, float]]) -> pl.DataFrame:
    """composition_weights.parquet: (source_site, in, out, weight_refit, standardised)."""
    site, inp, out, refit, std = zip(*rows, strict=True)
    return pl.DataFrame(
        {"target_site": ["resid_pre[2]"] * len(rows), "out_feature": out, "source_site": site,
         "in_feature": inp, "weight": [w / 2 for w in refit], "weight_refit": refit,
         "standardised": std, "large": [s >= 0.05 for s in std]},
        schema_overrides={"out_feature": pl.Int64, "in_feature": pl.Int64},
    )  # fmt: skip


COMPOSITION = _composition(
    [
        ("resid_pre[1]", 0, 0, 1.0, 0.5),  # skip
        ("attn_out[1]", 2, 0, 0.8, 0.4),
        ("mlp_out[1]", 3, 0, -0.6, 0.3),
        ("resid_pre[1]", 7, 0, 0.2, 0.1),
        ("mlp_out[1]", 4, 0, 0.1, 0.05),
        ("resid_pre[1]", 1, 1, 1.0, 0.9),
    ]
)
ATTENTION = _connect([(2, 5, 0.9, 0.9), (2, 6, 0.2, 0.2), (2, 9, -0.1, 0.1), (3, 1, 1.0, 1.0)])
MLP = _connect([(3, 10, 0.7, 0.7), (3, 11, -0.5, 0.5), (3, 12, 0.05, 0.05), (4, 13, 1.0, 1.0)])
LABELS = pl.DataFrame({"output": [3, 4], "label": ["AND", "OR"], "confidence": [0.9, 0.6]})
TABLES = LayerTables(
    1, COMPOSITION, MLP, ATTENTION, labels={"mlp_out[1]": LABELS}
)  # fmt: skip


def _edges(graph) -> set[tuple[str, int, str, int, str, int]]:
    return {
        (r["source_site"], r["source_feature"], r["target_site"], r["target_feature"], r["path"],
         r["depth"])
        for r in graph.edges.iter_rows(named=True)
    }  # fmt: skip


def test_top_k_per_node_two_hops_back() -> None:
    graph = feature_graph(TABLES, "resid_pre[2]", 0, top=2, depth=2)
    assert _edges(graph) == {
        ("resid_pre[1]", 0, "resid_pre[2]", 0, "skip", 1),
        ("attn_out[1]", 2, "resid_pre[2]", 0, "composition", 1),
        ("resid_pre[1]", 5, "attn_out[1]", 2, "attention", 2),
        ("resid_pre[1]", 6, "attn_out[1]", 2, "attention", 2),
    }
    nodes = graph.nodes
    assert nodes.filter(pl.col("chosen")).rows() == [("resid_pre[2]", 0, None, None, 0, True)]
    assert {(r[0], r[1]): r[4] for r in nodes.rows()} == {
        ("resid_pre[2]", 0): 0, ("resid_pre[1]", 0): 1, ("attn_out[1]", 2): 1,
        ("resid_pre[1]", 5): 2, ("resid_pre[1]", 6): 2,
    }  # fmt: skip
    # The drawn weight is the refit, not the shrunk L1 weight.
    skip = graph.edges.filter(pl.col("path") == "skip")
    assert skip["weight"].to_list() == [1.0] and skip["standardised"].to_list() == [0.5]


def test_three_per_node_reaches_the_mlp_and_its_label() -> None:
    graph = feature_graph(TABLES, "resid_pre.2", 0, top=3, depth=2)
    depth_one = {e[:2] for e in _edges(graph) if e[5] == 1}
    assert depth_one == {("resid_pre[1]", 0), ("attn_out[1]", 2), ("mlp_out[1]", 3)}
    into_mlp = {e[1] for e in _edges(graph) if e[4] == "mlp"}
    assert into_mlp == {10, 11, 12}
    assert {e[1] for e in _edges(graph) if e[4] == "attention"} == {5, 6, 9}
    assert graph.edges.height == 3 + 3 + 3
    labelled = graph.nodes.filter(pl.col("label").is_not_null())
    assert labelled.select("site", "feature", "label", "confidence").rows() == [
        ("mlp_out[1]", 3, "AND", 0.9)
    ]
    # One hop: only the writers of the chosen feature.
    one = feature_graph(TABLES, "resid_pre[2]", 0, top=3, depth=1)
    assert {e[5] for e in _edges(one)} == {1} and one.edges.height == 3


def test_forward_and_both_directions() -> None:
    forward = feature_graph(TABLES, "mlp_resid[1]", 11, direction="out", depth=2)
    assert _edges(forward) == {
        ("mlp_resid[1]", 11, "mlp_out[1]", 3, "mlp", 1),
        ("mlp_out[1]", 3, "resid_pre[2]", 0, "composition", 2),
    }
    both = feature_graph(TABLES, "mlp_out[1]", 3, direction="both", depth=1, top=1)
    assert _edges(both) == {
        ("mlp_resid[1]", 10, "mlp_out[1]", 3, "mlp", 1),
        ("mlp_out[1]", 3, "resid_pre[2]", 0, "composition", 1),
    }
    # A feature with nothing feeding it is a graph of one node.
    alone = feature_graph(TABLES, "resid_pre[1]", 0)
    assert alone.edges.height == 0 and alone.nodes.height == 1


def test_l1_weights_on_request_and_missing_tables() -> None:
    l1 = LayerTables(1, composition=COMPOSITION, weight="weight")
    graph = feature_graph(l1, "resid_pre[2]", 0, top=1, depth=2)
    assert graph.edges["weight"].to_list() == [0.5] and graph.weight == "weight"
    with pytest.raises(CoactError, match="not a site of block 1"):
        feature_graph(TABLES, "mlp_out[2]", 0)
    with pytest.raises(CoactError, match="no weight tables"):
        feature_graph(LayerTables(1), "resid_pre[2]", 0)


def test_read_and_write_round_trip(tmp_path: Path) -> None:
    dirs = {name: tmp_path / name for name in ("composition", "mlp", "attention", "logic")}
    for d in dirs.values():
        d.mkdir()
    COMPOSITION.write_parquet(dirs["composition"] / "composition_weights.parquet")
    MLP.write_parquet(dirs["mlp"] / "weights.parquet")
    ATTENTION.write_parquet(dirs["attention"] / "weights.parquet")
    LABELS.write_parquet(dirs["logic"] / "features.parquet")
    tables = LayerTables.read(
        1, composition_dir=dirs["composition"], mlp_dir=dirs["mlp"],
        attention_dir=dirs["attention"], logic_dirs={"mlp_out.1": dirs["logic"]},
    )  # fmt: skip
    graph = feature_graph(tables, "resid_pre[2]", 0, top=3)
    assert _edges(graph) == _edges(feature_graph(TABLES, "resid_pre[2]", 0, top=3))
    paths = write_graph(graph, tmp_path / "out")
    assert paths["edges"].name == "graph_resid_pre.2_0_edges.parquet"
    assert pl.read_parquet(paths["edges"]).equals(graph.edges)
    assert pl.read_parquet(paths["nodes"]).equals(graph.nodes)
    with pytest.raises(CoactError, match="no weight table at"):
        LayerTables.read(1, mlp_dir=tmp_path / "nowhere")


def test_figure_renders_to_svg_with_title_and_caption(tmp_path: Path) -> None:
    graph = feature_graph(TABLES, "resid_pre[2]", 0, top=3, depth=2)
    chart, caption = graph_chart(graph)
    spec = chart.to_dict()
    assert spec_title(spec) == "Layer graph of resid_pre[2]#0"
    assert caption.startswith("Read: ") and len(caption) > 80
    assert untitled_axes(spec) == []
    chart.save(str(tmp_path / "graph.svg"))
    svg = (tmp_path / "graph.svg").read_text()
    assert svg.startswith("<svg") and "Layer graph of resid_pre[2]#0" in svg
    assert "mlp_out[1]#3 (AND)" in svg and "weight sign" in svg
    assert len(vl_convert.vegalite_to_png(spec)) > 1000
