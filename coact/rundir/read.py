"""What a run directory holds, read once for the report: every stage is optional, so a run
without calibrate/ or logic/ still gives a report (those sections say they were not run)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from coact.errors import CoactError
from coact.linearity.table import LinearityConfig, relabel
from coact.models.sites import Site
from coact.rundir.layout import RunLayout


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CoactError(f"corrupt {path}: {error}") from None


def _parquet(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.is_file() else None


@dataclass
class RunData:
    """The run's tables; None where a stage did not run (or has not finished)."""

    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    layer: int
    model: str
    in_site: str
    out_site: str
    connect: dict[str, Any] | None = None
    sweep: pl.DataFrame | None = None
    weights: pl.DataFrame | None = None
    features: pl.DataFrame | None = None
    top_tokens: pl.DataFrame | None = None
    mlp_curve: pl.DataFrame | None = None
    calibrate: dict[str, Any] | None = None
    noise: pl.DataFrame | None = None
    splices: pl.DataFrame | None = None
    calibrated: pl.DataFrame | None = None  # calibrate/linearity.parquet
    causal: pl.DataFrame | None = None
    logic: dict[str, Any] | None = None
    labels: pl.DataFrame | None = None
    truth_tables: pl.DataFrame | None = None
    clusters: pl.DataFrame | None = None
    hidden: pl.DataFrame | None = None
    outliers: pl.DataFrame | None = None  # outliers/outliers.parquet: both sites' features
    outlier_summary: dict[str, Any] | None = None  # outliers/outliers.json
    ablation: pl.DataFrame | None = None  # evidence/ablation.parquet
    ablation_summary: dict[str, Any] | None = None  # evidence/ablation.json
    sae_logs: dict[str, dict[str, Any]] = field(default_factory=dict)
    sae_eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    # block results (`coact analyze --block`): attention/, composition/, block.json
    block: dict[str, Any] | None = None  # block.json: the headline, τ and its form
    attention: dict[str, Any] | None = None  # connect.json, shares at attention's τ
    attention_features: pl.DataFrame | None = None  # status at attention's τ
    attention_calibration: dict[str, Any] | None = None  # attention/calibrate/calibrate.json
    attention_splices: pl.DataFrame | None = None  # attention/calibrate/splices.parquet
    attention_causal: dict[str, Any] | None = None  # attention/causal/causal.json
    attention_causal_table: pl.DataFrame | None = None  # per feature: self-only, resampled
    attention_weights: pl.DataFrame | None = None
    attention_top_tokens: pl.DataFrame | None = None
    positions: dict[str, Any] | None = None  # attention/positions/positions.json
    positions_table: pl.DataFrame | None = None
    composition: dict[str, Any] | None = None  # composition/composition.json
    composition_table: pl.DataFrame | None = None
    composition_weights: pl.DataFrame | None = None
    composition_sweep: pl.DataFrame | None = None
    decoded: pl.DataFrame | None = None  # composition/decoded.parquet
    _flags: dict[tuple[str, int], str] | None = field(default=None, repr=False)
    _tables: Any = field(default=None, repr=False)

    def outlier_reason(self, slug: str, feature: int) -> str | None:
        """Why a feature of site `slug` is flagged as an outlier; None when it is not (or
        the run has no outlier table)."""
        if self._flags is None:
            self._flags = {}
            if self.outliers is not None and self.outliers.height:
                flagged = self.outliers.filter(pl.col("outlier"))
                for site, j, reason in flagged.select("site", "feature", "reason").iter_rows():
                    self._flags[(str(site), int(j))] = str(reason)
        return self._flags.get((slug, int(feature)))

    @property
    def in_slug(self) -> str:
        return Site.parse(self.in_site).slug

    @property
    def out_slug(self) -> str:
        return Site.parse(self.out_site).slug

    @property
    def layout(self) -> RunLayout:
        return RunLayout.of(self.run_dir, self.config)

    @property
    def has_codes(self) -> bool:
        return (self.layout.codes / "manifest.json").is_file()

    def sites(self) -> dict[str, dict[str, Any]]:
        """Per site: the SAE's evaluation (summary.json, else sae_eval/*.json)."""
        if self.summary and self.summary.get("sites"):
            return dict(self.summary["sites"])
        return dict(self.sae_eval)

    @property
    def has_block(self) -> bool:
        """Attention or composition results (a `--block` run, or a layer of a model run)."""
        return self.attention is not None or self.composition is not None

    @property
    def attn_in_site(self) -> str:
        return str((self.attention or {}).get("in_site") or f"resid_pre[{self.layer}]")

    @property
    def attn_out_site(self) -> str:
        return str((self.attention or {}).get("out_site") or f"attn_out[{self.layer}]")

    @property
    def next_site(self) -> str:
        return str((self.composition or {}).get("target") or f"resid_pre[{self.layer + 1}]")

    def layer_tables(self) -> Any:
        """The block's weight tables for `coact.block.graph.feature_graph` (a LayerTables of the
        tables read here); None when the run has no attention or composition results."""
        if not self.has_block:
            return None
        if self._tables is None:
            from coact.block.graph import LayerTables

            self._tables = LayerTables(
                self.layer,
                composition=self.composition_weights,
                mlp=self.weights,
                attention=self.attention_weights,
                labels={self.out_site: self.labels} if self.labels is not None else {},
            )
        return self._tables

    def tau(self) -> tuple[float | None, str]:
        """The calibrated τ and its form (None when calibration did not run)."""
        if self.calibrate is None:
            return None, str((self.connect or {}).get("form", "seed"))
        return float(self.calibrate["tau"]), str(self.calibrate.get("form", "seed"))


def load_run(run_dir: str | Path) -> RunData:
    """Read every table a run has; a missing stage is None, a missing run is an error."""
    run = Path(run_dir)
    config = _json(run / "config.json")
    if config is None:
        raise CoactError(f"{run} is not a run directory (no config.json); run `coact analyze`")
    summary = _json(run / "summary.json")
    layer = int(config.get("layer", 0))
    connect = _json(run / "connect" / "connect.json")
    in_site = str((connect or {}).get("in_site") or f"mlp_resid[{layer}]")
    out_site = str((connect or {}).get("out_site") or f"mlp_out[{layer}]")
    data = RunData(
        run_dir=run,
        config=config,
        summary=summary,
        layer=layer,
        model=str((summary or {}).get("model") or config.get("model", "?")),
        in_site=in_site,
        out_site=out_site,
        connect=connect,
    )
    if connect is not None:  # connect.json is written last: the tables are whole
        c = run / "connect"
        data.sweep = _parquet(c / "sweep.parquet")
        data.weights = _parquet(c / "weights.parquet")
        data.features = _parquet(c / "features.parquet")
        data.top_tokens = _parquet(c / "top_tokens.parquet")
        data.mlp_curve = _parquet(c / "mlp_curve.parquet")
    data.calibrate = _json(run / "calibrate" / "calibrate.json")
    if data.calibrate is not None:
        c = run / "calibrate"
        data.noise = _parquet(c / "noise.parquet")
        data.splices = _parquet(c / "splices.parquet")
        data.calibrated = _parquet(c / "linearity.parquet")
        data.causal = _parquet(c / "causal.parquet")
    data.logic = _json(run / "logic" / "logic.json")
    if data.logic is not None:
        c = run / "logic"
        data.labels = _parquet(c / "features.parquet")
        data.truth_tables = _parquet(c / "truth_tables.parquet")
        data.clusters = _parquet(c / "clusters.parquet")
        data.hidden = _parquet(c / "hidden.parquet")
    data.outlier_summary = _json(run / "outliers" / "outliers.json")
    if data.outlier_summary is not None:
        data.outliers = _parquet(run / "outliers" / "outliers.parquet")
    data.ablation_summary = _json(run / "evidence" / "ablation.json")
    if data.ablation_summary is not None:
        data.ablation = _parquet(run / "evidence" / "ablation.parquet")
    _load_block(data)
    for site in (in_site, out_site):
        slug = Site.parse(site).slug
        log = _json(data.layout.sae / slug / "train_log.json")
        if log is not None:
            data.sae_logs[site] = log
        evaluation = _json(data.layout.sae_eval / f"{slug}.json")
        if evaluation is not None and "report" in evaluation:
            data.sae_eval[site] = dict(evaluation["report"])
    return data


def _load_block(data: RunData) -> None:
    """The block stages' results; each stage's json is written last, so a table is read
    only where its stage finished."""
    run = data.run_dir
    data.block = _json(run / "block.json")
    attention = run / "attention" / "connect"
    data.attention = _json(attention / "connect.json")
    data.attention_calibration = _json(run / "attention" / "calibrate" / "calibrate.json")
    if data.attention_calibration is not None:
        data.attention_splices = _parquet(run / "attention" / "calibrate" / "splices.parquet")
    if data.attention is not None:
        # block.json holds the shares at the τ attention is read at; connect.json's are at
        # the τ it was fitted with
        data.attention.update((data.block or {}).get("attention") or {})
        data.attention_features = _parquet(attention / "features.parquet")
        if data.attention_features is not None and "tau" in data.attention:
            at = LinearityConfig(tau=float(data.attention["tau"]), form=data.attention["form"])
            data.attention_features = relabel(data.attention_features, at)
        data.attention_weights = _parquet(attention / "weights.parquet")
        data.attention_top_tokens = _parquet(attention / "top_tokens.parquet")
    data.attention_causal = _json(run / "attention" / "causal" / "causal.json")
    if data.attention_causal is not None:
        data.attention_causal_table = _parquet(run / "attention" / "causal" / "causal.parquet")
    positions = run / "attention" / "positions"
    data.positions = _json(positions / "positions.json")
    if data.positions is not None:
        data.positions_table = _parquet(positions / "positions.parquet")
    composition = run / "composition"
    data.composition = _json(composition / "composition.json")
    if data.composition is not None:
        data.composition_table = _parquet(composition / "composition.parquet")
        data.composition_weights = _parquet(composition / "composition_weights.parquet")
        data.composition_sweep = _parquet(composition / "composition_sweep.parquet")
        data.decoded = _parquet(composition / "decoded.parquet")
