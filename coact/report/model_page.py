"""The model page (a model run's docs/index.md): its layers side by side (layers.parquet's
tables), the seed study's table for every layer and site, charts across layers, the
shared SAEs' quality and the shared stages' timings."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl

from coact.block.positions import PositionShare
from coact.codes.store import CodeStore
from coact.linearity.table import SEED_TAU, LinearityConfig, LinearShare, percent_linear, relabel
from coact.pipeline.config import AnalyzeConfig
from coact.pipeline.summary import ModelSummary
from coact.report.charts import model as model_charts
from coact.report.embed import Figures
from coact.report.markdown import md_table, note, num, pct
from coact.report.model_columns import SOURCES, column_notes, layers_html
from coact.report.run_page import SAE_COLUMNS, ce_recovered, sae_cells, timings_table
from coact.report.select import attention_share
from coact.rundir.layout import CodesFiles, RunLayout
from coact.rundir.read import RunData
from coact.sae.evaluate import SaeEvaluation, SaeReport

SEED_LINEARITY = LinearityConfig(tau=SEED_TAU, form="seed")  # the seed study's τ and form
CHECKS = ("identity_raw", "identity_decoded", "composition_decoded", "target_sae")
LAYERS_TABLE = RunLayout(Path(), Path()).layers_table.name  # as the page names it
Bracket = tuple[float | None, float | None, float | None]  # percent, at least, at most


def span(layers: Sequence[int]) -> str:
    """Layers as a reader writes them: '0–5' for a run of three or more, else '1, 3'."""
    layers = sorted(int(ell) for ell in layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(str(ell) for ell in layers)


def model_name(config: AnalyzeConfig, summary: ModelSummary | None) -> str:
    """The model's name as the run recorded it (its summary's, else its config's)."""
    return str((summary.model if summary else None) or config.model)


def model_page(
    model_dir: Path,
    config: AnalyzeConfig,
    summary: ModelSummary | None,
    table: pl.DataFrame,
    runs: Mapping[int, RunData],
    links: Mapping[int, str],
    fig: Figures,
) -> str:
    """The model page's markdown: headline, per-layer table, seed table, charts, links."""
    layers = [int(ell) for ell in table["layer"]]
    tokens = (summary.tokens if summary else None) or config.tokens  # no summary until the end
    out = [
        f"# coact model report: {model_name(config, summary)}, layers {span(layers)}",
        "",
        "Every block ℓ of the run: its MLP (`mlp_resid[ℓ]` → `mlp_out[ℓ]`), its attention "
        "(`resid_pre[ℓ]` → `attn_out[ℓ]`) and the composition of the next residual stream "
        "(`resid_pre[ℓ+1]` from `resid_pre[ℓ]`, `attn_out[ℓ]` and `mlp_out[ℓ]`), from one set "
        "of SAEs and one code store"
        + (f" ({int(tokens):,} tokens" if tokens else " (")
        + f" of corpus `{config.corpus}`). Run directory: `{model_dir}`.",
        "",
        *_unfinished(config, layers),
        "Each layer has its own report: "
        + " · ".join(f'<a href="{html.escape(links[ell], True)}">layer {ell}</a>' for ell in layers)
        + ".",
        "",
        "## Layers side by side",
        "",
        "Each share is read at its own site's τ, calibrated against the model's loss where "
        "calibration ran: the MLP's at `mlp_out[ℓ]`, attention's (and the position score's) "
        "at `attn_out[ℓ]`. Click a column header to sort.",
        "",
        layers_html(table, links),
        "",
        *column_notes(table),
        "",
        "## The seed study's table, for every layer and site",
        "",
        seed_table(runs),
        "",
        "The seed study (Pythia-70m-deduped, 3072-feature SAEs) found 78.8 / 95.9 / 97.8 / "
        "98.0 / 98.9% of MLP output features linear for layers 1–5 at τ = 0.001 (seed form); "
        "other models and SAEs need not match. Same position: the share of attention "
        "features whose gain from earlier positions is at most 0.001 (seed form).",
        "",
        "## Across layers",
        "",
    ]
    out += _charts(table, runs, fig)
    out += _sae_section(RunLayout.of(model_dir))
    if summary is not None and summary.timings:
        out += ["## Timings of the shared stages", "", timings_table(summary.timings), ""]
    return "\n".join(out)


def _unfinished(config: AnalyzeConfig, layers: Sequence[int]) -> list[str]:
    """A warning when the run asked for more layers than it has finished."""
    asked = config.layers
    if not isinstance(asked, tuple) or not (missing := sorted(set(asked) - set(layers))):
        return []
    return [
        note(
            f"{len(layers)} of {len(asked)} layers are finished; "
            + (f"layer {missing[0]} is" if len(missing) == 1 else f"layers {span(missing)} are")
            + " not yet. Rerun the same `coact analyze --layers …` command to complete the "
            "run: it resumes where it stopped."
        ),
        "",
    ]


def _positions_as_linearity(table: pl.DataFrame) -> pl.DataFrame:
    """positions.parquet in linearity's vocabulary (gain → d, same_position → linear), so
    `relabel` and `percent_linear` read it at another τ."""
    names = {"same_position": "linear", "needs_context": "nonlinear"}
    renamed = {
        f"{gain}{end}": f"{d}{end}"
        for gain, d in (("gain", "d"), ("gain_fvu", "d_fvu"), ("gain_seed", "d_seed"))
        for end in ("", "_low", "_high")
        if f"{gain}{end}" in table.columns
    }
    return table.rename(renamed).with_columns(
        pl.col("status").replace(names),
        *([pl.col("verdict").replace(names)] if "verdict" in table.columns else []),
    )


def seed_shares(table: pl.DataFrame | None, positions: bool = False) -> LinearShare | None:
    """The linear share of a features (or, with `positions`, positions) table at the seed
    study's τ = 0.001 in the seed form; None without the table."""
    if table is None or not table.height:
        return None
    if positions:
        table = _positions_as_linearity(table)
    return percent_linear(relabel(table, SEED_LINEARITY))


def seed_table(runs: Mapping[int, RunData]) -> str:
    """Per layer and site: % of alive features linear (same position) at τ = 0.001."""

    def cell(share: LinearShare | None) -> str:
        """'78.8% of 2,900 (75.0–80.1%)': the share, of alive, and its bracket."""
        if share is None:
            return "–"
        shown = f"{share.percent_linear:.1f}% of {share.alive:,}"
        if share.percent_linear_confident is not None:
            shown += f" ({share.percent_linear_confident:.1f}–{share.percent_linear_possible:.1f}%)"
        return shown

    rows = [
        [
            str(ell),
            cell(seed_shares(data.features)),
            cell(seed_shares(data.attention_features)),
            cell(seed_shares(data.positions_table, positions=True)),
        ]
        for ell, data in sorted(runs.items())
    ]
    headers = ["layer ℓ", "`mlp_out[ℓ]` linear (of alive; beyond noise)"]
    headers += ["`attn_out[ℓ]` linear (of alive; beyond noise)"]
    return md_table([*headers, "`attn_out[ℓ]` same position (of alive; beyond noise)"], rows)


def _bracket(share: LinearShare | PositionShare | None) -> Bracket:
    """A share's percent and its bracket beyond d's noise (at least, at most)."""
    if share is None:
        return None, None, None
    if isinstance(share, PositionShare):
        return (
            share.percent_same_position,
            share.percent_same_position_confident,
            share.percent_same_position_possible,
        )
    return share.percent_linear, share.percent_linear_confident, share.percent_linear_possible


def _layer_brackets(data: RunData | None) -> dict[str, tuple[Bracket, Bracket]]:
    """Per series, the share's bracket at the layer's τ and at the seed's τ."""
    if data is None:
        empty = (None, None, None)
        return dict.fromkeys(("mlp", "attention", "positions"), (empty, empty))
    calibrated = data.calibrate
    mlp = (
        calibrated.linear_calibrated if calibrated else data.connect.share if data.connect else None
    )
    positions = data.positions.share if data.positions else None
    return {
        "mlp": (_bracket(mlp), _bracket(seed_shares(data.features))),
        "attention": (
            _bracket(attention_share(data)),
            _bracket(seed_shares(data.attention_features)),
        ),
        "positions": (
            _bracket(positions),
            _bracket(seed_shares(data.positions_table, positions=True)),
        ),
    }


def shares_frame(table: pl.DataFrame, runs: Mapping[int, RunData]) -> pl.DataFrame:
    """Per layer, series and threshold (the layer's τ, the seed's 0.001): the percent,
    its noise bracket and τ."""
    series = (
        ("MLP linear", "mlp", "mlp_percent_linear"),
        ("attention linear", "attention", "attention_percent_linear"),
        ("attention same position", "positions", "attention_percent_same_position"),
    )
    rows = []
    for r in table.iter_rows(named=True):
        ell = int(r["layer"])
        brackets = _layer_brackets(runs.get(ell))
        found = []
        for name, key, column in series:
            (_, low, high), _ = brackets[key]
            found.append((name, "each layer's τ", r.get(column), low, high, r.get("tau")))
        for name, key, column in series:
            _, (percent, _, _) = brackets[key]
            at_seed = r.get(f"{column}_seed_tau")
            percent = percent if at_seed is None else at_seed
            found.append((name, "seed's τ = 0.001", percent, None, None, SEED_LINEARITY.tau))
        rows += [
            {"layer": ell, "series": name, "threshold": threshold, "percent": float(percent),
             "low": low, "high": high, "tau": tau}
            for name, threshold, percent, low, high, tau in found
            if percent is not None and math.isfinite(float(percent))
        ]  # fmt: skip
    schema = {"layer": pl.Int64, "series": pl.String, "threshold": pl.String,
              "percent": pl.Float64, "low": pl.Float64, "high": pl.Float64,
              "tau": pl.Float64}  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def _charts(table: pl.DataFrame, runs: Mapping[int, RunData], fig: Figures) -> list[str]:
    """The charts across layers: the shares, the composition's sources, the decoded checks."""
    out = []
    shares = shares_frame(table, runs)
    if shares.height:
        out.append(
            fig.figure(
                model_charts.layer_shares(shares),
                "layer-shares",
                "Read: how much of each layer's computation is linear (MLP, attention) and how "
                "much of attention needs no earlier position; compare layers on the dashed "
                "lines (one τ), and a wide band means many features sit near the layer's τ.",
            )
        )
    out += _composition_chart(table, fig)
    out += _decoded_chart(table, fig)
    if not out:
        return [note(f"{LAYERS_TABLE} has no shares to chart."), ""]
    return [*out, ""]


def _composition_chart(table: pl.DataFrame, fig: Figures) -> list[str]:
    """Each layer's next-stream variance by source, with the composition's R²."""
    kinds = [k for k in SOURCES if f"composition_share_{k}" in table.columns]
    if not kinds:
        return []
    composition = pl.DataFrame(
        [
            {"layer": int(r["layer"]), "source": SOURCES[k], "rank": i,
             "share": float(r[f"composition_share_{k}"])}
            for r in table.iter_rows(named=True)
            for i, k in enumerate(kinds)
            if r[f"composition_share_{k}"] is not None
        ],
        schema={"layer": pl.Int64, "source": pl.String, "rank": pl.Int64, "share": pl.Float64},
    )  # fmt: skip
    r2 = table.select(
        pl.col("layer").cast(pl.Int64), pl.col("composition_r2_sparse").alias("r2")
    ).filter(pl.col("r2").is_not_null())
    return [
        fig.figure(
            model_charts.layer_composition(composition, r2),
            "layer-composition",
            "Read: which source each layer's next-stream features come from; a growing "
            "MLP or attention bar means that layer writes more of what the next one reads.",
        )
    ]


def _decoded_chart(table: pl.DataFrame, fig: Figures) -> list[str]:
    """Each layer's decoded checks: the FVU of each reconstruction of the next stream."""
    checks = [c for c in CHECKS if f"decoded_fvu_{c}" in table.columns]
    checks += [
        c.removeprefix("decoded_fvu_")
        for c in table.columns
        if c.startswith("decoded_fvu_") and c.removeprefix("decoded_fvu_") not in checks
    ]
    if not checks:
        return []
    decoded = pl.DataFrame(
        [
            {"layer": int(r["layer"]), "check": c, "fvu": float(r[f"decoded_fvu_{c}"])}
            for r in table.iter_rows(named=True)
            for c in checks
            if r[f"decoded_fvu_{c}"] is not None
        ],
        schema={"layer": pl.Int64, "check": pl.String, "fvu": pl.Float64},
    )
    return [
        fig.figure(
            model_charts.layer_decoded(decoded),
            "layer-decoded",
            "Read: identity_raw near 0 confirms the captured sites add up; the gap between "
            "composition_decoded and target_sae is what the sparse composition loses.",
        )
    ]


def _sae_section(layout: RunLayout) -> list[str]:
    """Every shared SAE's quality on the evaluation contexts (its saved evaluation; its
    width from the code store)."""
    widths: dict[str, int] = {}
    if CodesFiles(layout.codes).manifest.is_file():
        widths = CodeStore.open(layout.codes).sites
    reports: list[tuple[str, SaeReport]] = []
    for path in sorted(layout.sae_eval.glob("*.json")):
        evaluation = SaeEvaluation.read(path)
        if evaluation is not None:
            reports.append((path.stem, evaluation.report))
    if not reports:
        return []
    reports.sort(key=lambda item: (_site_layer(item[1].site), str(item[1].site)))
    rows = [
        [*sae_cells(q.site, widths.get(slug), q), pct(ce_recovered(q)), num(q.n_tokens)]
        for slug, q in reports
    ]
    return [
        "## Shared SAEs",
        "",
        md_table([*SAE_COLUMNS, "CE recovered", "eval tokens"], rows),
        "",
        "FVE: fraction of the site's variance the SAE explains on held-out contexts; CE "
        "recovered: (CE ablated − CE spliced) / (CE ablated − CE clean), the site zeroed for "
        "CE ablated. Each layer's report has its SAEs' training curves.",
        "",
    ]


def _site_layer(site: str) -> int:
    """The layer a site names (`mlp_out[3]` → 3); -1 when it names none."""
    try:
        return int(site.rsplit("[", 1)[1].rstrip("]"))
    except (IndexError, ValueError):
        return -1
