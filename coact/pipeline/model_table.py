"""A model run's layers side by side (`layers.parquet`): which layers finished with the
run's settings, and one row of headline figures per layer, read from each layer's
summary.json and tables. The pipeline writes it after every layer; the model report reads
it (and completes it with layers another process finished)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from coact.block.stage import BlockResult
from coact.connectors.stage import ConnectResult
from coact.linearity.table import SEED_TAU
from coact.models.sites import Site
from coact.pipeline.summary import RunSummary
from coact.rundir.files import read_json
from coact.rundir.layout import RunLayout, read_run_config
from coact.transcoder.stage import TranscoderResult

LAYER_OWN_KEYS = ("layer", "layers", "run_dir", "shared_dir")  # what a layer's config sets
# layers.parquet's leading columns, in order; the composition's per-source columns follow
COLUMNS = (
    "layer", "mlp_tau", "attention_tau", "form", "mlp_percent_linear",
    "attention_percent_linear", "attention_percent_same_position",
    "attention_percent_context_free", "attention_percent_self_only",
    "mlp_percent_linear_seed_tau", "attention_percent_linear_seed_tau",
    "attention_percent_same_position_seed_tau", "mlp_nmse_linear", "mlp_nmse_mlp",
    "mlp_percent_mlp_gain", "attention_nmse_linear", "attention_nmse_mlp",
    "attention_percent_mlp_gain", "attention_nmse_same_position", "attention_nmse_with_context",
    "composition_r2_sparse", "composition_r2_ls",
)  # fmt: skip


def finished_layers(model_dir: str | Path) -> dict[int, RunSummary]:
    """The summary of every layer of a model run that finished with the run's own
    settings, by layer: a layer stopped part-way has none, and one left by a run with other
    settings is not this run's. Layers finished by another process (or an earlier run of
    the same settings) count too, which layers.parquet, written by one process, can miss."""
    model = RunLayout.of(model_dir)
    config = read_run_config(model.run_dir)
    settings = {k: v for k, v in config.items() if k not in LAYER_OWN_KEYS}
    found: dict[int, RunSummary] = {}
    for layer in config.get("layers") or []:
        layer_run = RunLayout.of(model.layer_dir(int(layer)))
        own = read_json(layer_run.config)
        if own is None or not layer_run.summary.is_file():
            continue
        if {k: v for k, v in own.items() if k not in LAYER_OWN_KEYS} == settings:
            summary = RunSummary.read(layer_run.summary)
            if summary is not None:
                found[int(layer)] = summary
    return found


def layers_table(per_layer: dict[int, RunSummary]) -> pl.DataFrame:
    """One row per layer: the MLP's and attention's linear shares and attention's
    same-position share, each at its own site's calibrated τ and at the seed's τ (calibrated
    τ differ between sites and layers, so only the seed's compares them on one threshold),
    and the composition's fit, source shares and decoded checks."""
    return pl.DataFrame([_row(layer, s) for layer, s in sorted(per_layer.items())])


def _row(layer: int, s: RunSummary) -> dict[str, object]:
    run = RunLayout.of(s.run_dir)
    calibrated = s.calibrate
    mlp = calibrated.linear_calibrated if calibrated else s.connect.share if s.connect else None
    row = {
        "layer": layer,
        "mlp_tau": calibrated.tau if calibrated else None,
        **_attention(s.block),
        "mlp_percent_linear": mlp.percent_linear if mlp else None,
        "mlp_percent_linear_seed_tau": _share_at_seed_tau(run.connect.features, "d_seed"),
        "attention_percent_linear_seed_tau": _share_at_seed_tau(
            run.attention_connect.features, "d_seed"
        ),
        "attention_percent_same_position_seed_tau": _share_at_seed_tau(
            run.positions.positions, "gain_seed"
        ),
        **_fit_quality("mlp", s.connect),
        **_fit_quality("attention", s.block.attention if s.block else None),
        **_composition(s.block),
        **_transcoder(s.transcoder),
    }
    return {k: row[k] for k in (*COLUMNS, *sorted(set(row) - set(COLUMNS), key=list(row).index))}


def _attention(block: BlockResult | None) -> dict[str, object]:
    """Attention's τ, its linear, same-position, context-free and self-only shares, and
    the position fits' held-out NMSE."""
    attention = block.attention_share if block else None
    positions = block.positions if block else None
    causal = block.attention_causal if block else None
    return {
        "attention_tau": block.tau if block else None,
        "form": block.form if block else None,
        "attention_percent_linear": attention.percent_linear if attention else None,
        "attention_percent_same_position": (
            positions.share.percent_same_position if positions else None
        ),
        "attention_percent_context_free": causal.resample.percent_context_free if causal else None,
        "attention_percent_self_only": causal.self_only.percent_self_only if causal else None,
        "attention_nmse_same_position": positions.heldout_nmse_same if positions else None,
        "attention_nmse_with_context": positions.heldout_nmse_context if positions else None,
    }


def _composition(block: BlockResult | None) -> dict[str, object]:
    """The composition's held-out R², each source's variance share and the decoded FVUs."""
    composed = block.composition if block else None
    if composed is None:
        return {"composition_r2_sparse": None, "composition_r2_ls": None}
    shares = {Site.parse(site).kind: v for site, v in composed.variance_share_ls.items()}
    decoded = (block.decoded_fvu if block else None) or {}
    return {
        "composition_r2_sparse": composed.r2_sparse,
        "composition_r2_ls": composed.r2_ls,
        **{f"composition_share_{k}": v for k, v in shares.items()},
        **{f"decoded_fvu_{k}": v for k, v in decoded.items()},
    }


def _transcoder(sheet: TranscoderResult | None) -> dict[str, float]:
    """With the transcoder stage: FVU of the MLP output and CE recovered for the skip
    transcoder and the SAE route (linear and mlp connector), at the same L0; with logic, the
    share of each route's alive features its labels explain."""
    if sheet is None:
        return {}
    figures = {
        f"{route}_{figure}": getattr(sheet.rows[route], figure)
        for route in ("transcoder", "sae_linear", "sae_mlp")
        if route in sheet.rows
        for figure in ("fvu", "ce_recovered")
    }
    covered = {"transcoder": sheet.coverage_transcoder, "sae": sheet.coverage_sae}
    return figures | {
        f"{route}_labels_explained": coverage.share_explained
        for route, coverage in covered.items()
        if coverage is not None
    }


def _fit_quality(name: str, fitted: ConnectResult | None) -> dict[str, float | None]:
    """How much the connectors explain, and how often the mlp beats least squares beyond
    d's noise floor: a linear share means little where neither fits or the mlp never wins."""
    if fitted is None:
        return dict.fromkeys(f"{name}_{k}" for k in ("nmse_linear", "nmse_mlp", "percent_mlp_gain"))
    alive, gain = fitted.share.alive, fitted.share.mlp_gain_beyond_noise
    return {
        f"{name}_nmse_linear": fitted.heldout_nmse_linear,
        f"{name}_nmse_mlp": fitted.heldout_nmse_mlp,
        f"{name}_percent_mlp_gain": 100.0 * gain / alive if alive and gain is not None else None,
    }


def _share_at_seed_tau(table: Path, column: str) -> float | None:
    """Percent of alive features whose `column` (d or the position gain, seed form) is at
    most the seed's τ; None when the table is missing."""
    if not table.is_file():
        return None
    values = pl.read_parquet(table, columns=["status", column])
    alive = values.filter(pl.col("status") != "dead")[column].to_numpy()
    return 100.0 * float((alive <= SEED_TAU).mean()) if len(alive) else None
