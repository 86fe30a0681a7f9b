"""`build_model_report`: a model run (`coact analyze --layers …`) → one page that sets its
layers side by side (the per-layer table, the seed study's table for every layer and site,
charts across layers) and links each layer's own report, built here where it is missing.

The model site lives at `<model_dir>/report/site/`; each layer's at
`<model_dir>/L<ℓ>/report/site/`, so the model page links them relatively
(`../../L<ℓ>/report/site/index.html`) and the whole run directory can be moved or opened
from the file system as one piece."""

from __future__ import annotations

import html
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from coact.errors import CoactError
from coact.linearity.table import LinearityConfig, percent_linear, relabel
from coact.report.build import _prepare, _Say, build_report
from coact.report.charts import model as model_charts
from coact.report.embed import Figures
from coact.report.pages import Cell, html_table, md_table, note, num, pct
from coact.report.site import build_site, mkdocs_config, write_assets, write_config
from coact.rundir.files import atomic_write
from coact.rundir.layout import read_run_config
from coact.rundir.read import RunData, _json, load_run

SEED_TAU = LinearityConfig(tau=0.001, form="seed")  # the seed study's threshold and form
# layers.parquet's columns as the model page names them (unknown ones keep their name)
COLUMNS = {
    "layer": "layer",
    "mlp_tau": "MLP τ",
    "attention_tau": "attention τ",
    "form": "form of d",
    "mlp_percent_linear": "MLP % linear",
    "attention_percent_linear": "attention % linear",
    "attention_percent_same_position": "attention % same position",
    "attention_percent_context_free": "attention % context-free (resampled)",
    "attention_percent_self_only": "attention % kept by self-only attention",
    "mlp_percent_linear_seed_tau": "MLP % linear at 0.001",
    "attention_percent_linear_seed_tau": "attention % linear at 0.001",
    "attention_percent_same_position_seed_tau": "attention % same position at 0.001",
    "mlp_nmse_linear": "MLP NMSE, least squares",
    "mlp_nmse_mlp": "MLP NMSE, mlp",
    "mlp_percent_mlp_gain": "MLP % the mlp fits better",
    "attention_nmse_linear": "attention NMSE, least squares",
    "attention_nmse_mlp": "attention NMSE, mlp",
    "attention_percent_mlp_gain": "attention % the mlp fits better",
    "attention_nmse_same_position": "attention NMSE, same position",
    "attention_nmse_with_context": "attention NMSE, with earlier positions",
    "composition_r2_sparse": "composition R² (sparse)",
    "composition_r2_ls": "composition R² (least squares)",
}
SOURCES = {"resid_pre": "skip (resid_pre)", "attn_out": "attention", "mlp_out": "MLP"}
CHECKS = ("identity_raw", "identity_decoded", "composition_decoded", "target_sae")


def is_model_run(run_dir: str | Path) -> bool:
    """A model run's directory: its config.json names several layers, or its summary.json
    their run directories."""
    run = Path(run_dir)
    config = _json(run / "config.json") or {}
    summary = _json(run / "summary.json") or {}
    return bool(config.get("layers")) or "layer_runs" in summary


def build_model_report(
    model_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    features: Sequence[int] | int | None = None,
    rebuild_layers: bool = False,
    progress: bool = True,
) -> Path:
    """Write the model page and build its site; return the built `index.html`
    (`<model_dir>/report/site/index.html` unless `out_dir` is given).

    Each layer's report (`<model_dir>/L<ℓ>/report/`) is built first where it is missing,
    older than one of the layer's stage results, or `rebuild_layers` (or given `features`)
    asks for it, with `features` (default: the run's `report_features`)."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    say = _Say(progress)
    config = read_run_config(model_dir)
    table_path = model_dir / "layers.parquet"
    _add_finished_layers(model_dir, table_path)
    if not table_path.is_file():
        raise CoactError(
            f"{model_dir} has no layers.parquet: the model run has not finished a layer; "
            "rerun `coact analyze --layers …` with the same settings to complete it"
        )
    table = pl.read_parquet(table_path).sort("layer")
    if not table.height:
        raise CoactError(f"{table_path} has no layers")
    summary = _json(model_dir / "summary.json") or {}
    layer_dirs = {int(ell): _layer_dir(model_dir, summary, int(ell)) for ell in table["layer"]}
    wanted = features if features is not None else config.get("report_features")

    layer_index: dict[int, Path] = {}
    for ell, layer_dir in layer_dirs.items():
        index = layer_dir / "report" / "site" / "index.html"
        if rebuild_layers or features is not None or _stale(index, layer_dir):
            say(f"building the report of layer {ell} ({layer_dir})")
            index = build_report(layer_dir, features=wanted, progress=progress)
        layer_index[ell] = index

    out = (Path(out_dir) if out_dir is not None else model_dir / "report").resolve()
    _prepare(out)
    docs = out / "docs"
    write_assets(docs)
    site = out / "site"
    links = {
        ell: Path(os.path.relpath(index.resolve(), site)).as_posix()
        for ell, index in layer_index.items()
    }
    runs = {ell: load_run(d) for ell, d in layer_dirs.items()}
    say("writing the model page")
    text = model_page(model_dir, config, summary, table, runs, links, Figures(docs))
    (docs / "index.md").write_text(text, encoding="utf-8")
    model = str(summary.get("model") or config.get("model", "?"))
    layers = table["layer"].to_list()
    mkdocs = mkdocs_config(
        f"coact: {model}, layers {_span(layers)}",
        [{"Model": "index.md"}],
        description=f"{model}: MLP, attention and residual composition of layers {_span(layers)}",
    )
    say("building the site (mkdocs, strict)")
    index = build_site(write_config(out, mkdocs))
    say(f"model report built in {time.perf_counter() - started:.1f} s: {index}")
    return index


def _add_finished_layers(model_dir: Path, table_path: Path) -> None:
    """Rewrite layers.parquet from every finished layer of the run where that adds layers
    it lacks (finished by another process, or by an earlier run stopped before its own
    table was written); rows of layers kept elsewhere (a moved run) are never dropped."""
    from coact.pipeline.run import finished_layers, layers_table

    finished = finished_layers(model_dir)
    listed = set(pl.read_parquet(table_path)["layer"].to_list()) if table_path.is_file() else set()
    if finished and listed < set(finished):
        atomic_write(table_path, layers_table(finished).write_parquet)


def _layer_dir(model_dir: Path, summary: Mapping[str, Any], layer: int) -> Path:
    """L<ℓ>/ beside layers.parquet (the run may have moved), else what summary.json says."""
    here = model_dir / f"L{layer}"
    if (here / "config.json").is_file():
        return here
    recorded = (summary.get("layer_runs") or {}).get(str(layer))
    if recorded and (Path(recorded) / "config.json").is_file():
        return Path(recorded)
    raise CoactError(f"layer {layer} of {model_dir} has no run directory ({here} is missing)")


RESULTS = (  # each stage's headline, written last; summary.json is rewritten after the report
    "connect/connect.json",
    "calibrate/calibrate.json",
    "logic/logic.json",
    "outliers/outliers.json",
    "evidence/ablation.json",
    "attention/connect/connect.json",
    "attention/positions/positions.json",
    "composition/composition.json",
    "block.json",
)


def _stale(index: Path, layer_dir: Path) -> bool:
    """The layer's site is missing or older than one of its stages' results."""
    if not index.is_file():
        return True
    built = index.stat().st_mtime
    return any(
        (layer_dir / name).is_file() and (layer_dir / name).stat().st_mtime > built
        for name in RESULTS
    )


def _span(layers: Sequence[int]) -> str:
    layers = sorted(int(ell) for ell in layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(str(ell) for ell in layers)


# ------------------------------------------------------------------------------ the page


def model_page(
    model_dir: Path,
    config: Mapping[str, Any],
    summary: Mapping[str, Any],
    table: pl.DataFrame,
    runs: Mapping[int, RunData],
    links: Mapping[int, str],
    fig: Figures,
) -> str:
    """The model page's markdown: headline, per-layer table, seed table, charts, links."""
    model = str(summary.get("model") or config.get("model", "?"))
    layers = [int(ell) for ell in table["layer"]]
    tokens = summary.get("tokens") or config.get("tokens")  # no summary.json until the end
    out = [
        f"# coact model report: {model}, layers {_span(layers)}",
        "",
        "Every block ℓ of the run: its MLP (`mlp_resid[ℓ]` → `mlp_out[ℓ]`), its attention "
        "(`resid_pre[ℓ]` → `attn_out[ℓ]`) and the composition of the next residual stream "
        "(`resid_pre[ℓ+1]` from `resid_pre[ℓ]`, `attn_out[ℓ]` and `mlp_out[ℓ]`), from one set "
        "of SAEs and one code store"
        + (f" ({int(tokens):,} tokens" if tokens else " (")
        + f" of corpus `{config.get('corpus', '?')}`). Run directory: `{model_dir}`.",
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
        *_column_notes(table),
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
    out += _sae_section(model_dir, layers)
    timings = summary.get("timings") or {}
    if timings:
        out += [
            "## Timings of the shared stages",
            "",
            md_table(["stage", "seconds"], [[k, num(v, ".1f")] for k, v in timings.items()]),
            "",
        ]
    return "\n".join(out)


def _unfinished(config: Mapping[str, Any], layers: Sequence[int]) -> list[str]:
    """A warning when the run asked for more layers than it has finished."""
    asked = config.get("layers")
    if not isinstance(asked, list) or not (missing := sorted(set(asked) - set(layers))):
        return []
    return [
        note(
            f"{len(layers)} of {len(asked)} layers are finished; "
            + (f"layer {missing[0]} is" if len(missing) == 1 else f"layers {_span(missing)} are")
            + " not yet. Rerun the same `coact analyze --layers …` command to complete the "
            "run: it resumes where it stopped."
        ),
        "",
    ]


def _header(column: str) -> str:
    if column in COLUMNS:
        return COLUMNS[column]
    if column.startswith("composition_share_"):
        kind = column.removeprefix("composition_share_")
        return f"share from {SOURCES.get(kind, kind)}"
    if column.startswith("decoded_fvu_"):
        return f"FVU {column.removeprefix('decoded_fvu_')}"
    return column


def _value(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if column == "layer" or not isinstance(value, int | float):
        return str(value)
    if "percent" in column:
        return f"{float(value):.1f}%"
    if column.startswith("decoded_fvu_") or column.endswith("tau"):
        return num(float(value), ".3g")
    return num(float(value), ".3f")


def column_groups(columns: Sequence[str]) -> dict[str, list[str]]:
    """layers.parquet's columns in the model page's tables (every column in one of them)."""
    seed = "The same shares at the seed's τ = 0.001 (one threshold for every layer)"
    fit = "How much the connectors explain (held-out NMSE) and how often the mlp wins"
    groups: dict[str, list[str]] = {
        "Linear and same-position shares": [],
        seed: [],
        fit: [],
        "Residual composition": [],
        "Decoded checks": [],
        "Other": [],
    }
    for c in columns:
        if c == "layer":
            continue
        if "percent" in c and c.endswith("_seed_tau"):
            groups[seed].append(c)
        elif "_nmse_" in c or c.endswith("_percent_mlp_gain"):
            groups[fit].append(c)
        elif c in ("mlp_tau", "attention_tau", "form") or "percent" in c:
            groups["Linear and same-position shares"].append(c)
        elif c.startswith("composition_"):
            groups["Residual composition"].append(c)
        elif c.startswith("decoded_fvu_"):
            groups["Decoded checks"].append(c)
        else:
            groups["Other"].append(c)
    return {name: members for name, members in groups.items() if members}


def layers_html(table: pl.DataFrame, links: Mapping[int, str]) -> str:
    """layers.parquet as sortable tables, one per group of columns, every column in one,
    each row's layer linked to its report."""
    parts = []
    for name, columns in column_groups(table.columns).items():
        parts += [f"### {name}", "", _layers_table(table, ["layer", *columns], links), ""]
    return "\n".join(parts)


def _layers_table(table: pl.DataFrame, columns: Sequence[str], links: Mapping[int, str]) -> str:
    rows = []
    for r in table.iter_rows(named=True):
        ell = int(r["layer"])
        cells: list[Cell] = []
        for column in columns:
            value = r[column]
            shown = html.escape(_value(column, value))
            if column == "layer" and ell in links:
                shown = f'<a href="{html.escape(links[ell], True)}">{shown}</a>'
            key = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
            cells.append((shown, key))
        rows.append(cells)
    return html_table([_header(c) for c in columns], rows, sortable=True)


def _column_notes(table: pl.DataFrame) -> list[str]:
    notes = [
        "- **MLP τ**, **attention τ**, **form of d**: each site's threshold (the largest "
        "whose linear splice at that site costs at most ε extra next-token loss) and the form "
        "of d it applies to; calibrated τ differ between sites and layers, so the columns "
        "*at 0.001* (the seed's τ, seed form) compare them on one threshold.",
        "- **MLP % linear**: alive `mlp_out[ℓ]` features whose per-feature gain of an mlp "
        "connector over least squares, d = MSE_lin − MSE_mlp, is at most τ.",
        "- **attention % linear**: the same for `attn_out[ℓ]` from `resid_pre[ℓ]` at the same "
        "position.",
        "- **attention % same position**: alive `attn_out[ℓ]` features that earlier positions "
        "(the previous token, a decayed sum of the ones before) improve by at most τ.",
        "- **attention % context-free (resampled)**: the causal counterpart of the last "
        "column: alive `attn_out[ℓ]` features whose code at a token changes little "
        "(FVU ≤ 0.5) when what attention reads at every earlier token but BOS comes from "
        "another text. **% kept by self-only attention**: the same when every head attends "
        "only to the token itself (heads that rest on the BOS sink lose here, not there).",
        "- **composition R²**: mean held-out R² of `resid_pre[ℓ+1]` features from the three "
        "sources' features (sparse at the chosen α; least squares on every input).",
    ]
    if any("_nmse_" in c for c in table.columns):
        notes.append(
            "- **NMSE …**: held-out MSE over the variance of each output feature (1: explains "
            "nothing), averaged over alive features, for least squares and the mlp (both "
            "without L1) and for the position score's two ridge fits. **% the mlp "
            "fits better**: alive features whose d lies above 0 beyond its noise floor (the "
            "95 % interval over held-out contexts). Where the mlp never wins and its NMSE "
            "equals least squares', a 100 % linear share says that the mlp found nothing "
            "more at this budget, not that it was shown to be linear."
        )
    if any(c.startswith("composition_share_") for c in table.columns):
        notes.append(
            "- **share from …**: the mean share of a `resid_pre[ℓ+1]` feature's variance each "
            "source explains, cov(ŷ_s, y)/var(y), least squares on training tokens (the shares "
            "add up to that fit's training R²)."
        )
    if any(c.startswith("decoded_fvu_") for c in table.columns):
        notes.append(
            "- **FVU …**: the fraction of the true `resid_pre[ℓ+1]`'s variance left "
            "unexplained, on raw activations: `identity_raw` the exact sum of the three "
            "sources (≈ 0), `identity_decoded` that sum through each source's SAE, "
            "`composition_decoded` the target SAE decoding the composition connector's codes, "
            "`target_sae` the target SAE's own reconstruction (the floor)."
        )
    return notes


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


def seed_shares(table: pl.DataFrame | None, positions: bool = False) -> dict[str, float] | None:
    """percent_linear of a features (or, with `positions`, positions) table at the seed
    study's τ = 0.001 in the seed form; None without the table."""
    if table is None or not table.height:
        return None
    if positions:
        table = _positions_as_linearity(table)
    return percent_linear(relabel(table, SEED_TAU))


def seed_table(runs: Mapping[int, RunData]) -> str:
    """Per layer and site: % of alive features linear (same position) at τ = 0.001."""

    def cell(share: Mapping[str, float] | None) -> str:
        if share is None:
            return "–"
        shown = f"{share['percent_linear']:.1f}% of {int(share['alive']):,}"
        if "percent_linear_confident" in share:
            shown += (
                f" ({share['percent_linear_confident']:.1f}–"
                f"{share['percent_linear_possible']:.1f}%)"
            )
        return shown

    rows = []
    for ell, data in sorted(runs.items()):
        rows.append(
            [
                str(ell),
                cell(seed_shares(data.features)),
                cell(seed_shares(data.attention_features)),
                cell(seed_shares(data.positions_table, positions=True)),
            ]
        )
    return md_table(
        [
            "layer ℓ",
            "`mlp_out[ℓ]` linear (of alive; beyond noise)",
            "`attn_out[ℓ]` linear (of alive; beyond noise)",
            "`attn_out[ℓ]` same position (of alive; beyond noise)",
        ],
        rows,
    )


def _bracket(share: Mapping[str, Any] | None, key: str = "percent_linear") -> dict[str, Any]:
    share = share or {}
    return {
        "percent": share.get(key),
        "low": share.get(f"{key}_confident"),
        "high": share.get(f"{key}_possible"),
    }


def shares_frame(table: pl.DataFrame, runs: Mapping[int, RunData]) -> pl.DataFrame:
    """Per layer, series and threshold (the layer's τ, the seed's 0.001): the percent,
    its noise bracket and τ."""
    rows = []
    layer_tau, seed_tau = "each layer's τ", "seed's τ = 0.001"
    for r in table.iter_rows(named=True):
        ell = int(r["layer"])
        data = runs.get(ell)
        mlp: Mapping[str, Any] | None = None
        if data is not None:
            if data.calibrate is not None:
                mlp = data.calibrate.get("linear_calibrated")
            mlp = mlp or data.connect
        seed = {
            "mlp": seed_shares(data.features) if data else None,
            "attention": seed_shares(data.attention_features) if data else None,
            "positions": seed_shares(data.positions_table, positions=True) if data else None,
        }
        series = [
            ("MLP linear", layer_tau, r.get("mlp_percent_linear"), _bracket(mlp), r.get("tau")),
            ("attention linear", layer_tau, r.get("attention_percent_linear"),
             _bracket(data.attention if data else None), r.get("tau")),
            ("attention same position", layer_tau, r.get("attention_percent_same_position"),
             _bracket(data.positions if data else None, "percent_same_position"), r.get("tau")),
        ]  # fmt: skip
        for name, key, column in (
            ("MLP linear", "mlp", "mlp_percent_linear_seed_tau"),
            ("attention linear", "attention", "attention_percent_linear_seed_tau"),
            ("attention same position", "positions", "attention_percent_same_position_seed_tau"),
        ):
            bracket = _bracket(seed[key])
            percent = r.get(column)
            percent = bracket["percent"] if percent is None else percent
            series.append((name, seed_tau, percent, {"low": None, "high": None}, SEED_TAU.tau))
        for name, threshold, percent, bracket, tau in series:
            if percent is None or not math.isfinite(float(percent)):
                continue
            rows.append(
                {
                    "layer": ell,
                    "series": name,
                    "threshold": threshold,
                    "percent": float(percent),
                    "low": bracket["low"],
                    "high": bracket["high"],
                    "tau": tau,
                }
            )
    schema = {"layer": pl.Int64, "series": pl.String, "threshold": pl.String,
              "percent": pl.Float64, "low": pl.Float64, "high": pl.Float64,
              "tau": pl.Float64}  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def _charts(table: pl.DataFrame, runs: Mapping[int, RunData], fig: Figures) -> list[str]:
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
    kinds = [k for k in SOURCES if f"composition_share_{k}" in table.columns]
    if kinds:
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
        out.append(
            fig.figure(
                model_charts.layer_composition(composition, r2),
                "layer-composition",
                "Read: which source each layer's next-stream features come from; a growing "
                "MLP or attention bar means that layer writes more of what the next one reads.",
            )
        )
    checks = [c for c in CHECKS if f"decoded_fvu_{c}" in table.columns]
    checks += [
        c.removeprefix("decoded_fvu_")
        for c in table.columns
        if c.startswith("decoded_fvu_") and c.removeprefix("decoded_fvu_") not in checks
    ]
    if checks:
        decoded = pl.DataFrame(
            [
                {"layer": int(r["layer"]), "check": c, "fvu": float(r[f"decoded_fvu_{c}"])}
                for r in table.iter_rows(named=True)
                for c in checks
                if r[f"decoded_fvu_{c}"] is not None
            ],
            schema={"layer": pl.Int64, "check": pl.String, "fvu": pl.Float64},
        )
        out.append(
            fig.figure(
                model_charts.layer_decoded(decoded),
                "layer-decoded",
                "Read: identity_raw near 0 confirms the captured sites add up; the gap between "
                "composition_decoded and target_sae is what the sparse composition loses.",
            )
        )
    if not out:
        return [note("layers.parquet has no shares to chart."), ""]
    return [*out, ""]


def _sae_section(model_dir: Path, layers: Sequence[int]) -> list[str]:
    """Every shared SAE's quality on the evaluation contexts (sae_eval/*.json)."""
    reports = []
    for path in sorted((model_dir / "sae_eval").glob("*.json")):
        saved = _json(path) or {}
        if "report" in saved:
            q = dict(saved["report"])
            cfg = _json(model_dir / "sae" / path.stem / "cfg.json") or {}
            q.setdefault("width", cfg.get("d_sae"))
            reports.append(q)
    if not reports:
        return []
    rows = []
    for q in sorted(reports, key=lambda q: (_site_layer(q.get("site")), str(q.get("site")))):
        recovered = None
        if {"ce_clean", "ce_spliced", "ce_ablated"} <= q.keys():
            gap = q["ce_ablated"] - q["ce_clean"]
            recovered = (q["ce_ablated"] - q["ce_spliced"]) / gap if gap else None
        rows.append(
            [
                f"`{q.get('site')}`",
                num(q.get("width")),
                num(q.get("fve")),
                num(q.get("l0"), ".1f"),
                pct(q.get("dead_fraction")),
                pct(recovered),
                num(q.get("n_tokens")),
            ]
        )
    return [
        "## Shared SAEs",
        "",
        md_table(
            ["site", "width", "FVE", "L0", "dead", "CE recovered", "eval tokens"],
            rows,
        ),
        "",
        "FVE: fraction of the site's variance the SAE explains on held-out contexts; CE "
        "recovered: (CE ablated − CE spliced) / (CE ablated − CE clean), the site zeroed for "
        "CE ablated. Each layer's report has its SAEs' training curves.",
        "",
    ]


def _site_layer(site: Any) -> int:
    text = str(site or "")
    try:
        return int(text.rsplit("[", 1)[1].rstrip("]"))
    except (IndexError, ValueError):
        return -1
