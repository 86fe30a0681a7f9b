"""What a run directory holds, read once and typed: every stage is optional, so a run
without calibrate/ or logic/ still gives a report (those sections say they were not run).
The report and the commands that rerun a stage read runs here; the file names come from
`coact.rundir.layout`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from coact.block.attention_causal import AttentionCausalResult
from coact.block.composition import CompositionResult
from coact.block.positions import PositionsResult
from coact.block.stage import BlockResult
from coact.calibrate.stage import CalibrateResult
from coact.connectors.stage import ConnectResult
from coact.errors import CoactError
from coact.evidence.ablation import AblationResult
from coact.evidence.outliers import OutliersResult
from coact.linearity.table import LinearityConfig, LinearShare, relabel
from coact.logic.stage import LogicResult
from coact.models.sites import Site
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.summary import RunSummary, SiteSummary
from coact.rundir.files import read_json
from coact.rundir.layout import CodesFiles, RunLayout
from coact.rundir.results import from_dict
from coact.sae.evaluate import SaeEvaluation, SaeReport
from coact.sae.train import TrainLog

if TYPE_CHECKING:
    from coact.block.graph import LayerTables


def _parquet(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.is_file() else None


@dataclass
class RunData:
    """The run's results and tables; None where a stage did not run (or has not finished)."""

    run_dir: Path
    config: AnalyzeConfig
    layout: RunLayout
    summary: RunSummary | None
    layer: int
    model: str
    in_site: str
    out_site: str
    connect: ConnectResult | None = None
    sweep: pl.DataFrame | None = None
    weights: pl.DataFrame | None = None
    features: pl.DataFrame | None = None
    top_tokens: pl.DataFrame | None = None
    mlp_curve: pl.DataFrame | None = None
    calibrate: CalibrateResult | None = None
    noise: pl.DataFrame | None = None
    splices: pl.DataFrame | None = None
    calibrated: pl.DataFrame | None = None  # calibrate/linearity.parquet
    causal: pl.DataFrame | None = None
    logic: LogicResult | None = None
    labels: pl.DataFrame | None = None
    truth_tables: pl.DataFrame | None = None
    clusters: pl.DataFrame | None = None
    hidden: pl.DataFrame | None = None
    outliers: pl.DataFrame | None = None  # outliers/outliers.parquet: both sites' features
    outlier_summary: OutliersResult | None = None  # outliers/outliers.json
    ablation: pl.DataFrame | None = None  # evidence/ablation.parquet
    ablation_summary: AblationResult | None = None  # evidence/ablation.json
    sae_logs: dict[str, TrainLog] = field(default_factory=dict)
    sae_eval: dict[str, SaeReport] = field(default_factory=dict)
    # block results (`coact analyze --block`): attention/, composition/, block.json
    block: BlockResult | None = None  # block.json: the headline, τ and its form
    attention: ConnectResult | None = None  # attention/connect/connect.json (as fitted)
    attention_share: LinearShare | None = None  # the linear share at attention's τ
    attention_features: pl.DataFrame | None = None  # status at attention's τ
    attention_calibration: CalibrateResult | None = None  # attention/calibrate/
    attention_splices: pl.DataFrame | None = None  # attention/calibrate/splices.parquet
    attention_causal: AttentionCausalResult | None = None  # attention/causal/causal.json
    attention_causal_table: pl.DataFrame | None = None  # per feature: self-only, resampled
    attention_weights: pl.DataFrame | None = None
    attention_top_tokens: pl.DataFrame | None = None
    positions: PositionsResult | None = None  # attention/positions/positions.json
    positions_table: pl.DataFrame | None = None
    composition: CompositionResult | None = None  # composition/composition.json
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
    def has_codes(self) -> bool:
        return CodesFiles(self.layout.codes).manifest.is_file()

    def sites(self) -> dict[str, SiteSummary | SaeReport]:
        """Per site: the SAE's evaluation (summary.json, else sae_eval/*.json)."""
        if self.summary is not None and self.summary.sites:
            return dict(self.summary.sites)
        return dict(self.sae_eval)

    @property
    def has_block(self) -> bool:
        """Attention or composition results (a `--block` run, or a layer of a model run)."""
        return self.attention is not None or self.composition is not None

    @property
    def attn_in_site(self) -> str:
        return self.attention.in_site if self.attention else f"resid_pre[{self.layer}]"

    @property
    def attn_out_site(self) -> str:
        return self.attention.out_site if self.attention else f"attn_out[{self.layer}]"

    @property
    def next_site(self) -> str:
        return self.composition.target if self.composition else f"resid_pre[{self.layer + 1}]"

    def layer_tables(self) -> LayerTables | None:
        """The block's weight tables for `coact.block.graph.feature_graph`; None when the
        run has no attention or composition results."""
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
            return None, self.connect.form if self.connect else "seed"
        return self.calibrate.tau, self.calibrate.form


def load_run(run_dir: str | Path) -> RunData:
    """Read every table a run has; a missing stage is None, a missing run is an error."""
    run = Path(run_dir)
    raw = read_json(RunLayout.of(run, {}).config)
    if raw is None:
        raise CoactError(f"{run} is not a run directory (no config.json); run `coact analyze`")
    layout = RunLayout.of(run, raw)
    config = AnalyzeConfig.from_dict(raw)
    summary = RunSummary.read(layout.summary)
    connect = ConnectResult.read(layout.connect.result)
    data = RunData(
        run_dir=run,
        config=config,
        layout=layout,
        summary=summary,
        layer=config.layer,
        model=summary.model if summary else config.model,
        in_site=connect.in_site if connect else f"mlp_resid[{config.layer}]",
        out_site=connect.out_site if connect else f"mlp_out[{config.layer}]",
        connect=connect,
    )
    _load_mlp(data)
    _load_evidence(data)
    _load_block(data)
    _load_saes(data)
    return data


def _load_mlp(data: RunData) -> None:
    """connect/, calibrate/ and logic/: each stage's json is written last, so its tables
    are read only where it finished."""
    layout = data.layout
    if data.connect is not None:
        c = layout.connect
        data.sweep, data.weights = _parquet(c.sweep), _parquet(c.weights)
        data.features, data.top_tokens = _parquet(c.features), _parquet(c.top_tokens)
        data.mlp_curve = _parquet(c.mlp_curve)
    data.calibrate = CalibrateResult.read(layout.calibrate.result)
    if data.calibrate is not None:
        k = layout.calibrate
        data.noise, data.splices = _parquet(k.noise), _parquet(k.splices)
        data.calibrated, data.causal = _parquet(k.linearity), _parquet(k.causal)
    data.logic = LogicResult.read(layout.logic.result)
    if data.logic is not None:
        g = layout.logic
        data.labels, data.truth_tables = _parquet(g.features), _parquet(g.truth_tables)
        data.clusters, data.hidden = _parquet(g.clusters), _parquet(g.hidden)


def _load_evidence(data: RunData) -> None:
    layout = data.layout
    data.outlier_summary = OutliersResult.read(layout.outliers.result)
    if data.outlier_summary is not None:
        data.outliers = _parquet(layout.outliers.outliers)
    data.ablation_summary = AblationResult.read(layout.ablation.result)
    if data.ablation_summary is not None:
        data.ablation = _parquet(layout.ablation.ablation)


def _load_block(data: RunData) -> None:
    """The block stages' results, at the τ attention is read at (block.json's)."""
    layout = data.layout
    data.block = BlockResult.read(layout.block)
    data.attention = ConnectResult.read(layout.attention_connect.result)
    data.attention_calibration = CalibrateResult.read(layout.attention_calibrate.result)
    if data.attention_calibration is not None:
        data.attention_splices = _parquet(layout.attention_calibrate.splices)
    if data.attention is not None:
        a = layout.attention_connect
        data.attention_share = data.block.attention_share if data.block else data.attention.share
        data.attention_features = _parquet(a.features)
        if data.attention_features is not None and data.block is not None:
            at = LinearityConfig(tau=data.block.tau, form=data.block.form)
            data.attention_features = relabel(data.attention_features, at)
        data.attention_weights = _parquet(a.weights)
        data.attention_top_tokens = _parquet(a.top_tokens)
    data.attention_causal = AttentionCausalResult.read(layout.attention_causal.result)
    if data.attention_causal is not None:
        data.attention_causal_table = _parquet(layout.attention_causal.causal)
    data.positions = PositionsResult.read(layout.positions.result)
    if data.positions is not None:
        data.positions_table = _parquet(layout.positions.positions)
    data.composition = CompositionResult.read(layout.composition.result)
    if data.composition is not None:
        c = layout.composition
        data.composition_table, data.composition_weights = _parquet(c.features), _parquet(c.weights)
        data.composition_sweep, data.decoded = _parquet(c.sweep), _parquet(c.decoded)


def _load_saes(data: RunData) -> None:
    """Each SAE's training curve and saved evaluation, where they are on this machine."""
    for site in (data.in_site, data.out_site):
        slug = Site.parse(site).slug
        log = read_json(data.layout.train_log(slug))
        if log is not None:
            data.sae_logs[site] = from_dict(TrainLog, log)
        evaluation = SaeEvaluation.read(data.layout.sae_evaluation(slug))
        if evaluation is not None:
            data.sae_eval[site] = evaluation.report
