"""The layer graph of one feature: which features feed it, across the whole block.

Three stages each fit one kind of connection of block ℓ, and together they cover it:

    attention    attn_out[ℓ]     ← resid_pre[ℓ]   (a connect run on that pair)
    mlp          mlp_out[ℓ]      ← mlp_resid[ℓ]   (the connect run of the MLP)
    skip         resid_pre[ℓ+1]  ← resid_pre[ℓ]   (composition: the residual carried over)
    composition  resid_pre[ℓ+1]  ← attn_out[ℓ], mlp_out[ℓ]   (composition: what is written)

`feature_graph` walks these edges back from a chosen feature (or forward, or both), keeping
the strongest few per node, so a researcher sees e.g. a next-layer feature, the attention
and MLP features that write it, and the features those read. Strength is the standardised
weight |w|·sd(in)/sd(out) where the tables carry it (weights of different sites' codes
are not comparable raw), else |w|.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl

from coact.errors import CoactError
from coact.models.sites import Site, SiteKind
from coact.rundir.files import atomic_write
from coact.rundir.layout import (
    CompositionFiles,
    ConnectFiles,
    GraphFiles,
    LogicFiles,
    StageFiles,
)

EdgePath = Literal["skip", "attention", "mlp", "composition"]
PATHS: tuple[EdgePath, ...] = ("skip", "attention", "mlp", "composition")
Direction = Literal["in", "out", "both"]
RESIDUAL_KINDS = ("resid_pre", "resid_mid", "mlp_resid")
EDGE_SCHEMA = {
    "source_site": pl.String,
    "source_feature": pl.Int64,
    "target_site": pl.String,
    "target_feature": pl.Int64,
    "weight": pl.Float64,
    "standardised": pl.Float64,
    "path": pl.String,
}
NODE_SCHEMA = {
    "site": pl.String,
    "feature": pl.Int64,
    "label": pl.String,
    "confidence": pl.Float64,
    "depth": pl.Int64,
    "chosen": pl.Boolean,
}


def _site(text: str | Site) -> str:
    return str(text if isinstance(text, Site) else Site.parse(text))


@dataclass(frozen=True, eq=False)
class LayerTables:
    """The weight tables of block `layer` the graph is drawn from (any may be missing).

    `composition`: composition_weights.parquet; `mlp`, `attention`: connect's
    weights.parquet of mlp_resid[ℓ] → mlp_out[ℓ] and resid_pre[ℓ] → attn_out[ℓ];
    `labels`: per site, a logic features.parquet (its `output` and `label` columns) for the
    features it labels. `weight`: the column drawn, the least-squares refit on the L1
    support by default (what formulas show), or the L1 `weight`."""

    layer: int
    composition: pl.DataFrame | None = None
    mlp: pl.DataFrame | None = None
    attention: pl.DataFrame | None = None
    labels: Mapping[str, pl.DataFrame] = field(default_factory=dict)
    weight: Literal["weight_refit", "weight"] = "weight_refit"

    @classmethod
    def read(
        cls,
        layer: int,
        *,
        composition_dir: str | Path | None = None,
        mlp_dir: str | Path | None = None,
        attention_dir: str | Path | None = None,
        logic_dirs: Mapping[str, str | Path] | None = None,
        weight: Literal["weight_refit", "weight"] = "weight_refit",
    ) -> LayerTables:
        """From the stages' directories: <composition_dir>/composition_weights.parquet,
        <mlp_dir>/weights.parquet, <attention_dir>/weights.parquet and, per labelled site,
        <logic_dir>/features.parquet."""

        def load(path: Path | None) -> pl.DataFrame | None:
            if path is None:
                return None
            if not path.is_file():
                raise CoactError(f"no weight table at {path}; run that stage first")
            return pl.read_parquet(path)

        def inside(directory: str | Path | None, files: type[StageFiles]) -> Any:
            return None if directory is None else files(Path(directory))

        labels = {
            site: frame
            for site, d in (logic_dirs or {}).items()
            if (frame := load(LogicFiles(Path(d)).features)) is not None
        }
        composed = inside(composition_dir, CompositionFiles)
        mlp, attention = inside(mlp_dir, ConnectFiles), inside(attention_dir, ConnectFiles)
        return cls(
            layer,
            load(composed.weights if composed else None),
            load(mlp.weights if mlp else None),
            load(attention.weights if attention else None),
            labels,
            weight,
        )

    def sites(self) -> tuple[Site, ...]:
        """The block's sites in reading order: input, attention, MLP input, MLP, output."""
        ell = self.layer
        return (Site("resid_pre", ell), Site("attn_out", ell), Site("mlp_resid", ell),
                Site("mlp_out", ell), Site("resid_pre", ell + 1))  # fmt: skip

    def edges(self) -> pl.DataFrame:
        """Every connection of the block, one schema (EDGE_SCHEMA), one row per edge."""
        parts = []
        if self.attention is not None:
            parts.append(self._connect(self.attention, ("resid_pre", "attn_out"), "attention"))
        if self.mlp is not None:
            parts.append(self._connect(self.mlp, ("mlp_resid", "mlp_out"), "mlp"))
        if self.composition is not None:
            parts.append(self._composition(self.composition))
        if not parts:
            raise CoactError("no weight tables to draw a graph from")
        return pl.concat(parts, how="vertical")

    def _column(self, frame: pl.DataFrame) -> pl.Expr:
        name = self.weight if self.weight in frame.columns else "weight"
        if name not in frame.columns:
            raise CoactError(f"a weight table has no {self.weight!r} or 'weight' column")
        return pl.col(name).cast(pl.Float64).alias("weight")

    def _standardised(self, frame: pl.DataFrame) -> pl.Expr:
        if "standardised" in frame.columns:
            return pl.col("standardised").cast(pl.Float64)
        return pl.lit(None, dtype=pl.Float64).alias("standardised")

    def _connect(
        self, frame: pl.DataFrame, kinds: tuple[SiteKind, SiteKind], path: EdgePath
    ) -> pl.DataFrame:
        source, target = (Site(kind, self.layer) for kind in kinds)
        return frame.select(
            pl.lit(str(source)).alias("source_site"),
            pl.col("input").cast(pl.Int64).alias("source_feature"),
            pl.lit(str(target)).alias("target_site"),
            pl.col("output").cast(pl.Int64).alias("target_feature"),
            self._column(frame),
            self._standardised(frame),
            pl.lit(path).alias("path"),
        )

    def _composition(self, frame: pl.DataFrame) -> pl.DataFrame:
        names = {s: _site(s) for s in frame["source_site"].unique().to_list()}
        targets = {s: _site(s) for s in frame["target_site"].unique().to_list()}
        skip = [s for s, site in names.items() if Site.parse(site).kind in RESIDUAL_KINDS]
        return frame.select(
            pl.col("source_site").replace_strict(names, return_dtype=pl.String),
            pl.col("in_feature").cast(pl.Int64).alias("source_feature"),
            pl.col("target_site").replace_strict(targets, return_dtype=pl.String),
            pl.col("out_feature").cast(pl.Int64).alias("target_feature"),
            self._column(frame),
            self._standardised(frame),
            pl.when(pl.col("source_site").is_in(skip))
            .then(pl.lit("skip"))
            .otherwise(pl.lit("composition"))
            .alias("path"),
        )

    def label_table(self) -> pl.DataFrame:
        """(site, feature, label, confidence) of every labelled feature."""
        parts = [
            frame.select(
                pl.lit(_site(site)).alias("site"),
                pl.col("output").cast(pl.Int64).alias("feature"),
                pl.col("label").cast(pl.String),
                (pl.col("confidence") if "confidence" in frame.columns else pl.lit(None))
                .cast(pl.Float64)
                .alias("confidence"),
            )
            for site, frame in self.labels.items()
        ]
        empty = pl.DataFrame(schema={k: NODE_SCHEMA[k] for k in ("site", "feature", "label",
                                                                 "confidence")})  # fmt: skip
        return pl.concat([empty, *parts], how="vertical") if parts else empty


@dataclass(frozen=True, eq=False)
class FeatureGraph:
    """Edges (EDGE_SCHEMA plus `depth`, the hop at which each was kept) and nodes
    (NODE_SCHEMA) around one chosen feature of block `layer`."""

    site: str
    feature: int
    layer: int
    top: int
    depth: int
    direction: Direction
    weight: str  # the weight column drawn
    edges: pl.DataFrame
    nodes: pl.DataFrame


def feature_graph(
    tables: LayerTables,
    site: str | Site,
    feature: int,
    *,
    top: int = 3,
    depth: int = 2,
    direction: Direction = "in",
) -> FeatureGraph:
    """The connections around `site`#`feature`: from it, `depth` hops back along the edges
    that feed each node ("in"), forward along those it feeds ("out") or both, keeping the
    `top` strongest per node and hop. Labels come from `tables.labels` where given."""
    if top < 1 or depth < 1:
        raise CoactError(f"top and depth must be ≥ 1, got top={top}, depth={depth}")
    if direction not in ("in", "out", "both"):
        raise CoactError(f"direction must be in, out or both, got {direction!r}")
    start = _site(site)
    if start not in {str(s) for s in tables.sites()}:
        raise CoactError(
            f"{start} is not a site of block {tables.layer}; use one of "
            f"{', '.join(str(s) for s in tables.sites())}"
        )
    edges = tables.edges().with_columns(
        pl.coalesce(pl.col("standardised").abs(), pl.col("weight").abs()).alias("_strength")
    )
    seen: dict[tuple[str, int], int] = {(start, int(feature)): 0}
    frontier = [(start, int(feature))]
    kept = []
    sides = {"in": [("target", "source")], "out": [("source", "target")]}
    sides["both"] = sides["in"] + sides["out"]
    for hop in range(1, depth + 1):
        if not frontier:
            break
        here = pl.DataFrame(frontier, schema=[("site", pl.String), ("feature", pl.Int64)],
                            orient="row")  # fmt: skip
        reached: list[tuple[str, int]] = []
        for anchor, other in sides[direction]:
            chosen = (
                edges.join(
                    here,
                    left_on=[f"{anchor}_site", f"{anchor}_feature"],
                    right_on=["site", "feature"],
                    how="semi",
                )
                .sort(
                    ["_strength", f"{other}_site", f"{other}_feature"],
                    descending=[True, False, False],
                )
                .group_by([f"{anchor}_site", f"{anchor}_feature"], maintain_order=True)
                .head(top)
                .with_columns(pl.lit(hop, dtype=pl.Int64).alias("depth"))
            )
            kept.append(chosen)
            reached += list(zip(chosen[f"{other}_site"], chosen[f"{other}_feature"], strict=True))
        frontier = []
        for node in reached:
            if node not in seen:
                seen[node] = hop
                frontier.append(node)
    columns = [*EDGE_SCHEMA, "depth"]
    empty = pl.DataFrame(schema={**EDGE_SCHEMA, "depth": pl.Int64})
    found = pl.concat([empty, *(k.select(columns) for k in kept)], how="vertical")
    found = found.unique(subset=[*columns[:4], "path"], keep="first", maintain_order=True)
    nodes = pl.DataFrame(
        {
            "site": [s for s, _ in seen],
            "feature": [f for _, f in seen],
            "depth": list(seen.values()),
            "chosen": [i == 0 for i in range(len(seen))],
        },
        schema={k: NODE_SCHEMA[k] for k in ("site", "feature", "depth", "chosen")},
    )
    nodes = nodes.join(tables.label_table(), on=["site", "feature"], how="left").select(
        list(NODE_SCHEMA)
    )
    return FeatureGraph(
        start, int(feature), tables.layer, top, depth, direction, tables.weight, found, nodes
    )


def write_graph(graph: FeatureGraph, out_dir: str | Path) -> dict[str, Path]:
    """The graph's edge table (parquet and CSV) and node table, named by its feature
    (`coact.rundir.layout.GraphFiles`)."""
    files = GraphFiles(Path(out_dir))
    files.path.mkdir(parents=True, exist_ok=True)
    slug = Site.parse(graph.site).slug
    paths = {
        "edges": files.edges(slug, graph.feature),
        "nodes": files.nodes(slug, graph.feature),
        "csv": files.edges_csv(slug, graph.feature),
    }
    atomic_write(paths["edges"], graph.edges.write_parquet)
    atomic_write(paths["nodes"], graph.nodes.write_parquet)
    atomic_write(paths["csv"], graph.edges.write_csv)
    return paths
