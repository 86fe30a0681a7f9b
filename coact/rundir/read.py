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
from coact.jacobian.stage import JacobianResult
from coact.linearity.table import LinearityConfig, LinearShare, relabel
from coact.logic.stage import LogicResult
from coact.models.sites import Site
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.summary import RunSummary, SiteSummary
from coact.rundir.files import read_json
from coact.rundir.layout import CodesFiles, RunLayout
from coact.rundir.results import Result, from_dict
from coact.rundir.verify import require
from coact.sae.evaluate import SaeEvaluation, SaeReport
from coact.sae.train import TrainLog

if TYPE_CHECKING:
    from coact.block.graph import LayerTables


def _parquet(path: Path) -> pl.DataFrame | None:
    """A table, None when it is missing; one clear error when it cannot be read."""
    if not path.is_file():
        return None
    try:
        return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CoactError(f"cannot read {path} ({first}); rerun its stage") from None


def output_width(run_dir: str | Path) -> int | None:
    """How many features the run's output site has (its code store's manifest says); None
    for a model run or a run without codes."""
    layout = RunLayout.of(run_dir)
    config = AnalyzeConfig.from_dict(read_json(layout.config) or {})
    if config.layers:
        return None
    manifest = read_json(CodesFiles(layout.codes).manifest) or {}
    entry = dict(manifest.get("sites") or {}).get(Site("mlp_out", config.layer).slug)
    return int(entry["width"]) if isinstance(entry, dict) and "width" in entry else None


def verify_run(layout: RunLayout) -> None:
    """Every finished stage's files are as the stage wrote them (`coact.rundir.verify`);
    the first that is not stops the reader, naming the file and the command to rerun."""
    run = layout.run_dir
    analyze = f"`coact analyze` with {run}'s settings"
    for files, command in (
        (layout.connect, f"`coact connect {run}`"),
        (layout.calibrate, f"`coact calibrate {run}`"),
        (layout.logic, f"`coact logic {run}`"),
        (layout.outliers, f"`coact outliers {run}`"),
        (layout.ablation, f"`coact ablate {run}`"),
        (layout.jacobian, analyze),
        (layout.attention_connect, analyze),
        (layout.attention_calibrate, analyze),
        (layout.positions, analyze),
        (layout.attention_causal, analyze),
        (layout.composition, analyze),
    ):
        require(files, command)


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
    jacobian: JacobianResult | None = None
    jacobian_features: pl.DataFrame | None = None  # jacobian/features.parquet
    agreement: pl.DataFrame | None = None  # jacobian/agreement.parquet
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
    _connections: pl.DataFrame | None = field(default=None, repr=False)

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

    def jacobian_connections(self) -> pl.DataFrame | None:
        """jacobian/connections.parquet (per connection: mean slope and attribution), read
        on first use: only feature pages and the feature browser need it."""
        if self.jacobian is None:
            return None
        if self._connections is None:
            self._connections = _parquet(self.layout.jacobian.connections)
        return self._connections

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
    verify_run(layout)
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


def _load(data: RunData, name: str, result: Result | None, tables: dict[str, Path]) -> None:
    """A stage's result into `data.<name>` and, where it finished (its json is written
    last), its tables into the fields `tables` names."""
    setattr(data, name, result)
    if result is not None:
        for field_name, path in tables.items():
            setattr(data, field_name, _parquet(path))


def _load_mlp(data: RunData) -> None:
    """connect/, calibrate/ and logic/."""
    c, k, g = data.layout.connect, data.layout.calibrate, data.layout.logic
    _load(data, "connect", data.connect, {
        "sweep": c.sweep, "weights": c.weights, "features": c.features,
        "top_tokens": c.top_tokens, "mlp_curve": c.mlp_curve,
    })  # fmt: skip
    _load(data, "calibrate", CalibrateResult.read(k.result), {
        "noise": k.noise, "splices": k.splices, "calibrated": k.linearity, "causal": k.causal,
    })  # fmt: skip
    j = data.layout.jacobian
    _load(data, "jacobian", JacobianResult.read(j.result), {
        "jacobian_features": j.features, "agreement": j.agreement,
    })  # fmt: skip
    _load(data, "logic", LogicResult.read(g.result), {
        "labels": g.features, "truth_tables": g.truth_tables, "clusters": g.clusters,
        "hidden": g.hidden,
    })  # fmt: skip


def _load_evidence(data: RunData) -> None:
    o, a = data.layout.outliers, data.layout.ablation
    _load(data, "outlier_summary", OutliersResult.read(o.result), {"outliers": o.outliers})
    _load(data, "ablation_summary", AblationResult.read(a.result), {"ablation": a.ablation})


def _load_block(data: RunData) -> None:
    """The block stages' results, at the τ attention is read at (block.json's)."""
    layout = data.layout
    a, k = layout.attention_connect, layout.attention_calibrate
    data.block = BlockResult.read(layout.block)
    _load(data, "attention_calibration", CalibrateResult.read(k.result), {
        "attention_splices": k.splices,
    })  # fmt: skip
    _load(data, "attention", ConnectResult.read(a.result), {
        "attention_features": a.features, "attention_weights": a.weights,
        "attention_top_tokens": a.top_tokens,
    })  # fmt: skip
    if data.attention is not None:
        data.attention_share = data.block.attention_share if data.block else data.attention.share
        if data.attention_features is not None and data.block is not None:
            at = LinearityConfig(tau=data.block.tau, form=data.block.form)
            data.attention_features = relabel(data.attention_features, at)
    causal, scored, c = layout.attention_causal, layout.positions, layout.composition
    _load(data, "attention_causal", AttentionCausalResult.read(causal.result), {
        "attention_causal_table": causal.causal,
    })  # fmt: skip
    _load(data, "positions", PositionsResult.read(scored.result), {
        "positions_table": scored.positions,
    })  # fmt: skip
    _load(data, "composition", CompositionResult.read(c.result), {
        "composition_table": c.features, "composition_weights": c.weights,
        "composition_sweep": c.sweep, "decoded": c.decoded,
    })  # fmt: skip


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
