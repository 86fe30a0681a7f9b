"""The report's pages as markdown (with raw HTML for charts, coloured contexts and sortable
tables): the run's index, the layer page, the table of all features (one page per feature
is in `feature_page.py`). Features flagged as outliers (artefacts) carry a ⚠ in every
table, its tooltip giving the reason.

Links written in raw HTML point at the built `.html` files (the site is built with
`use_directory_urls: false`, so it opens from the file system); markdown links point at
the `.md` sources and are checked by `mkdocs build --strict`."""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from coact.errors import CoactError
from coact.models.sites import Site
from coact.report.charts import base as base_charts
from coact.report.charts import block as block_charts
from coact.report.charts import calibrate as calibrate_charts
from coact.report.charts import connect as connect_charts
from coact.report.charts import logic as logic_charts
from coact.report.charts import sae as sae_charts
from coact.report.embed import Figures, load_spec
from coact.rundir.read import RunData

LABEL_ORDER = ("WEIGHTED-SUM", "OR", "AND", "A-AND-NOT-B", "UNEXPLAINED", "DEAD")


def feature_page_name(feature: int) -> str:
    return f"out-{int(feature)}"


def layer_page_name(data: RunData) -> str:
    return f"layer-{data.layer}"


def num(value: Any, spec: str = ".3g") -> str:
    """A number for a table; '–' for missing or NaN."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return format(value, spec)


def pct(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * float(value):.{digits}f}%"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


Cell = tuple[str, Any]  # (HTML shown, value sorted by)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], sortable: bool) -> str:
    """A raw-HTML table; `data-sortable` makes its columns sortable by the report's script."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for shown, key in row:
            sort = "" if key is None else f' data-sort="{html.escape(str(key), quote=True)}"'
            cells.append(f"<td{sort}>{shown}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = " data-sortable" if sortable else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def note(text: str) -> str:
    return f'!!! note "Not in this run"\n    {text}\n'


def _formula_html(text: str) -> str:
    return f"<code>{html.escape(text)}</code>"


OUTLIER = "⚠"
PHRASES = {
    "first tokens": "at a context's first positions",
    "first delimiter": "its context's first newline, period or comma",
    "high norm": "tokens of very high activation norm",
}


def outlier_help(reason: str) -> str:
    """A tooltip for a flag, e.g. 'possible artefact (outlier feature): 60% of its active
    tokens are at a context's first positions; see the layer page'."""
    parts = []
    for part in reason.split("; "):
        name, _, share = part.rpartition(" ")
        parts.append(f"{share} of its active tokens are {PHRASES.get(name, name)}")
    return f"possible artefact (outlier feature): {'; '.join(parts)}; see the layer page"


def outlier_mark(data: RunData, slug: str, feature: int) -> str:
    """' ⚠' with the reason in its tooltip when the feature is flagged, else ''."""
    reason = data.outlier_reason(slug, feature)
    if reason is None:
        return ""
    tip = html.escape(outlier_help(reason), True)
    return (
        f' <span class="coact-outlier" title="{tip}" style="color:#b45309;cursor:help">'
        f"{OUTLIER}</span>"
    )


def outlier_cell(data: RunData, slug: str, feature: int) -> Cell:
    """A table cell: '⚠ first tokens 83%' with its tooltip, or '–'; sorts by the reason."""
    reason = data.outlier_reason(slug, feature)
    if reason is None:
        return ("–", "")
    return (outlier_mark(data, slug, feature).strip() + " " + html.escape(reason), reason)


def outlier_text(data: RunData, slug: str, feature: int) -> str:
    """' ⚠' for plain-text (markdown) cells and table headers, else ''."""
    return f" {OUTLIER}" if data.outlier_reason(slug, feature) is not None else ""


class TokenText:
    """A feature's top tokens as stored by `connect` (top_tokens.parquet), e.g.
    `' call' ×4, 'call'`, HTML escaped."""

    def __init__(self, *top_tokens: pl.DataFrame | None) -> None:
        self.groups: dict[tuple[str, int], list[str]] = {}
        for table in top_tokens:
            if table is None:
                continue
            for r in table.sort(["feature", "rank"]).iter_rows(named=True):
                slug = str(r.get("site") or "")
                text = r.get("token")
                shown = repr(text) if text is not None else f"⟨{r['token_id']}⟩"
                self.groups.setdefault((slug, int(r["feature"])), []).append(shown)

    def __call__(self, slug: str, feature: int) -> str:
        tokens = self.groups.get((slug, int(feature)))
        if not tokens:
            return "–"
        counts: dict[str, int] = {}
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
        return ", ".join(html.escape(t) + (f" ×{n}" if n > 1 else "") for t, n in counts.items())


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
        direction: str,
        fig: Figures,
        name: str,
        prefix: str = "",
    ) -> list[str]:
        """The chart of one feature's graph and links to its exported tables; `prefix`
        leads from the page to docs/ (e.g. "../" from a feature page)."""
        from coact.block.graph import feature_graph, write_graph
        from coact.report.graph import graph_chart

        tables = data.layer_tables()
        if tables is None:
            return []
        try:
            graph = feature_graph(
                tables, site, feature, top=self.top, depth=self.depth,
                direction=direction,  # type: ignore[arg-type]
            )  # fmt: skip
        except CoactError as error:
            return [f"No layer graph of `{site}` #{feature}: {error}.", ""]
        paths = write_graph(graph, self.dir)
        csv = paths["csv"]
        chart, caption = graph_chart(graph)
        links = " · ".join(
            f"[{what}]({prefix}{GRAPH_DIR}/{path.name})"
            for what, path in (
                ("edge table (CSV)", csv),
                ("edge table (parquet)", paths["edges"]),
                ("node table (parquet)", paths["nodes"]),
            )
        )
        return [
            fig.figure(chart, name, caption),
            "",
            f"{graph.edges.height:,} connections among {graph.nodes.height:,} features: {links}.",
            "",
        ]


def model_link(data: RunData, page_dir: Path) -> str | None:
    """A relative link from a page in `page_dir` (of this layer's built site) to the model
    report, when the run is a layer of a model run (its config names the shared directory,
    whose report/site/index.html `build_model_report` writes); None otherwise."""
    shared = data.config.get("shared_dir")
    if not shared:
        return None
    target = data.run_dir / shared / "report" / "site" / "index.html"
    return Path(os.path.relpath(target.absolute(), page_dir.absolute())).as_posix()


# ---------------------------------------------------------------------------------- index
# ---------------------------------------------------------------------------------- index


def index_page(data: RunData, fig: Figures, n_pages: int, model: str | None = None) -> str:
    """The run's page; `model`: a relative link to the model report this layer is part of."""
    s = data.summary or {}
    layer = layer_page_name(data)
    out = [
        f"# coact report: {data.model}, layer {data.layer}",
        "",
    ]
    if model is not None:
        out += [
            f'Layer {data.layer} of a model run: <a href="{html.escape(model, True)}">the model '
            "report</a> compares every layer.",
            "",
        ]
    out += [
        f"How the SAE features that block {data.layer}'s MLP reads (`{data.in_site}`) turn "
        f"into the features it writes (`{data.out_site}`). Run directory: "
        f"`{data.run_dir}`; corpus `{data.config.get('corpus', '?')}`.",
        "",
        f"[The layer page](layer-{data.layer}.md) has the connectors, linearity, calibration "
        f"and logic labels"
        + (
            f", and the block's [attention](layer-{data.layer}.md#attention) and [residual "
            f"composition](layer-{data.layer}.md#residual-composition)"
            if data.has_block
            else ""
        )
        + f"; [all features](features.md) lists every output feature, and "
        f"{n_pages} of them have a page with their evidence.",
        "",
        "## Headline",
        "",
    ]
    out += [f"- {line}" for line in headline(data)]
    out += ["", "## SAE quality", ""]
    sites = data.sites()
    if sites:
        rows = []
        for site, q in sites.items():
            recovered = q.get("ce_recovered")
            if recovered is None and {"ce_clean", "ce_spliced", "ce_ablated"} <= q.keys():
                gap = q["ce_ablated"] - q["ce_clean"]
                recovered = (q["ce_ablated"] - q["ce_spliced"]) / gap if gap else None
            rows.append(
                [
                    f"`{site}`",
                    num(q.get("width")),
                    num(q.get("fve")),
                    num(q.get("l0"), ".1f"),
                    pct(q.get("dead_fraction")),
                    num(q.get("ce_clean"), ".3f"),
                    num(q.get("ce_spliced"), ".3f"),
                    num(q.get("ce_ablated"), ".3f"),
                    pct(recovered),
                    num(q.get("n_tokens")),
                ]
            )
        out.append(
            md_table(
                [
                    "site",
                    "width",
                    "FVE",
                    "L0",
                    "dead",
                    "CE clean (nats)",
                    "CE spliced (nats)",
                    "CE ablated (nats)",
                    "CE recovered",
                    "eval tokens",
                ],
                rows,
            )
        )
        out += [
            "",
            "FVE: fraction of the site's variance (about its mean) the SAE explains on held-out "
            "contexts; L0: active latents per token; CE recovered: (CE ablated − CE spliced) / "
            "(CE ablated − CE clean), with the site zeroed for CE ablated.",
            "",
        ]
    else:
        out += [note("No SAE evaluation was found (summary.json or sae_eval/)."), ""]
    if data.sae_logs:
        out.append(
            fig.figure(
                sae_charts.sae_training(data.sae_logs),
                "sae-training",
                "Read: FVU should fall and level off, and the dead share stay small; a curve "
                "still falling at the end means the SAE saw too few tokens.",
            )
        )
        out.append("")
    codes = (s.get("codes") or {}).get("bytes_per_token") or {}
    if codes:
        out += ["## Feature codes", ""]
        out.append(
            md_table(
                [
                    "site",
                    "stored bytes / token",
                    "ideal (nonzeros × (index + value))",
                    "dense float32",
                ],
                [
                    [
                        f"`{k}`",
                        num(v["stored"], ".1f"),
                        num(v["ideal"], ".1f"),
                        num(v["dense_float32"], ".0f"),
                    ]
                    for k, v in codes.items()
                ],
            )
        )
        out.append("")
    timings = s.get("timings") or {}
    if timings:
        out += ["## Timings", ""]
        out.append(md_table(["stage", "seconds"], [[k, num(v, ".1f")] for k, v in timings.items()]))
        out.append("")
    out += [f"Go on to [layer {data.layer}]({layer}.md).", ""]
    return "\n".join(out)


def headline(data: RunData) -> list[str]:
    """The run's headline figures as short sentences."""
    lines = []
    if data.summary:
        lines.append(f"Feature codes stored for {data.summary.get('tokens', 0):,} tokens.")
    c = data.connect
    if c is None:
        lines.append("Connectors were not fitted (no connect/connect.json).")
    else:
        lines.append(
            f"Sparse linear connector: chosen α = {c['alpha']:.3g} (elbow, {c['alpha_index'] + 1} "
            f"of {c['n_alphas']}), held-out NMSE {c['heldout_nmse_sparse']:.3f} with "
            f"{c['weights_per_output']:.1f} weights per output; least squares "
            f"{c['heldout_nmse_linear']:.3f}, mlp {c['heldout_nmse_mlp']:.3f} "
            f"({c['tokens_heldout']:,} held-out tokens)."
        )
        line = (
            f"Linear at τ = {c['tau']:g} ({c['form']} form): {c['percent_linear']:.1f}% of "
            f"{c['alive']:,} alive output features ({c['dead']:,} dead)"
        )
        if "percent_linear_confident" in c:
            line += (
                f"; beyond d's noise floor between {c['percent_linear_confident']:.1f}% and "
                f"{c['percent_linear_possible']:.1f}%"
            )
        lines.append(line + ".")
    k = data.calibrate
    if k is None:
        lines.append("τ was not calibrated (no calibrate/calibrate.json).")
    else:
        cal = k["linear_calibrated"]
        lines.append(
            f"Calibrated τ = {k['tau']:.3g} ({k['form']} form; ε = {k['tolerance']:g} nats per "
            f"token of extra loss over the mlp splice, {k['n_tokens']:,} tokens): "
            f"{cal['percent_linear']:.1f}% of {cal['alive']:,} alive features are linear."
        )
        sp = k.get("splices") or {}
        parts = [
            f"{name} {sp[name]['delta_ce']:+.4f} nats ({pct(sp[name]['ce_recovered'], 0)} "
            "recovered)"
            for name in ("sae", "linear", "mlp", "zero")
            if name in sp
        ]
        if parts:
            lines.append("Spliced MLP output, ΔCE: " + "; ".join(parts) + ".")
        if k.get("causal"):
            ca = k["causal"]
            lines.append(
                f"Causal check of {ca['judged']:,} strong connections: sign agrees "
                f"{pct(ca['share_sign_agrees'], 0)}, size within 2× "
                f"{pct(ca['share_size_agrees'], 0)}."
            )
    lines += block_headline(data)
    o = data.outlier_summary
    if o is not None and o.get("sites"):
        parts = []
        for slug, s in o["sites"].items():
            kinds = ", ".join(
                f"{name} {s[kind]:,}"
                for kind, name in (
                    ("first_tokens", "first tokens"),
                    ("first_delimiter", "first delimiter"),
                    ("high_norm", "high norm"),
                )
                if s.get(kind)
            )
            parts.append(
                f"`{slug}` {s['flagged']:,} of {s['alive']:,} alive"
                + (f" ({kinds})" if kinds else "")
            )
        lines.append(
            "Outlier features (possible artefacts, ⚠ in tables): " + "; ".join(parts) + "."
        )
    a = data.ablation_summary
    if a is not None:
        lines.append(
            f"Context ablation: {a['contexts']:,} top contexts of {a['features']:,} features, "
            f"{a['sequences']:,} sequences rerun up to the site ({a['seconds']:.0f} s)."
        )
    g = data.logic
    if g is None:
        lines.append("Features were not labelled (no logic/logic.json).")
    else:
        counts = ", ".join(f"{k} {v:,}" for k, v in g["counts"].items() if v)
        lines.append(f"Logic labels of the output features: {counts}.")
    return lines


def block_headline(data: RunData) -> list[str]:
    """Attention and composition in one sentence each (nothing for a run without them)."""
    lines = []
    a, p = data.attention, data.positions
    if a is not None:
        line = (
            f"Attention ({a['in_site']} → {a['out_site']}): {a['percent_linear']:.1f}% of "
            f"{a['alive']:,} alive features linear at τ = {a['tau']:.3g} ({a['form']} form)"
        )
        if p is not None:
            line += f"; {p['percent_same_position']:.1f}% need no earlier position"
        lines.append(line + ".")
    c = data.composition
    if c is not None:
        shares = ", ".join(
            f"{site} {v:.2f}" for site, v in (c.get("variance_share_ls") or {}).items()
        )
        lines.append(
            f"Residual composition of {c['target']}: held-out R² {c['r2_sparse']:.3f} sparse "
            f"({c['weights_per_output']:.1f} weights per feature), {c['r2_ls']:.3f} least "
            f"squares; variance share per source {shares}."
        )
    return lines


# ---------------------------------------------------------------------------------- layer


def layer_page(
    data: RunData,
    fig: Figures,
    featured: Mapping[int, list[str]],
    pages: set[int],
    *,
    token_text: TokenText | None = None,
    graphs: GraphWriter | None = None,
    model: str | None = None,
) -> str:
    """The layer: the MLP's connectors, linearity, calibration and labels, then (for a
    block run) attention and the residual composition. `token_text` gives features' top
    tokens, `graphs` draws and exports layer graphs (none without it), `model` links the
    model report."""
    c = data.connect
    token_text = token_text or TokenText(data.top_tokens, data.attention_top_tokens)
    back = f' · <a href="{html.escape(model, True)}">the model report</a>' if model else ""
    out = [
        f"# Layer {data.layer}: {data.in_site} → {data.out_site}",
        "",
        f"[Back to the run](index.md) · [all features](features.md){back}",
        "",
    ]
    held = int(c["tokens_heldout"]) if c else None
    out += ["## Connectors: loss per family", ""]
    if c is None:
        out += [note("Connectors were not fitted: `coact connect RUN` fits them."), ""]
    else:
        if data.mlp_curve is not None and data.mlp_curve.height:
            out.append(
                fig.figure(
                    connect_charts.mlp_curve(data.mlp_curve, c.get("tokens_train")),
                    "mlp-curve",
                    "Read: the validation loss should level off where training stopped; a gap "
                    "that widens means the mlp overfits, a curve still falling means more epochs "
                    "would add to d.",
                )
            )
        if data.sweep is not None and data.sweep.height:
            out.append(
                fig.figure(
                    connect_charts.lasso_path(data.sweep, held),
                    "lasso-path",
                    "Read: held-out loss falls as α shrinks and more weights join; where it stops "
                    "falling, more weights only fit noise.",
                )
            )
        families = [
            ("sparse linear (chosen α)", c.get("heldout_nmse_sparse")),
            ("least squares (no L1)", c.get("heldout_nmse_linear")),
            ("mlp (no L1)", c.get("heldout_nmse_mlp")),
        ]
        if data.hidden is not None and "connector_heldout_nmse" in data.hidden.columns:
            families.append(("sae-connector", float(data.hidden["connector_heldout_nmse"][0])))
        rows = [(name, float(v)) for name, v in families if v is not None]
        out.append(
            fig.figure(
                connect_charts.family_losses(rows, held),
                "families",
                "Read: the gap between least squares and the mlp is what nonlinearity adds on "
                "average; the sparse connector trades loss for a few readable weights.",
            )
        )
        out.append("")
        out += ["## Choosing α: the Pareto frontier", ""]
        if data.sweep is not None and data.sweep.height:
            out.append(
                fig.figure(
                    connect_charts.pareto(data.sweep, held),
                    "pareto",
                    "Read: points on the grey frontier are the best trade-offs; the diamond (the "
                    "elbow) is where more weight stops buying much lower loss.",
                )
            )
            out.append("")
    out += linearity_section(data, fig)
    out += calibration_section(data, fig)
    out += logic_section(data, fig, pages)
    if data.has_block:
        out += attention_section(data, fig, token_text)
        out += composition_section(data, fig, graphs)
    out += outliers_section(data, pages)
    out += ["## Features", ""]
    if featured:
        out += [
            f"The {len(featured)} features with a page, and why each was picked; click a column "
            "header to sort. [All features](features.md) has every output feature.",
            "",
            features_table(data, featured, pages, prefix="features/"),
            "",
        ]
    else:
        out += [note("No feature pages: the run has no linearity table or no codes."), ""]
    return "\n".join(out)


def linearity_section(data: RunData, fig: Figures) -> list[str]:
    out = ["## Linearity: what the mlp adds per feature", ""]
    c, f = data.connect, data.features
    if c is None or f is None:
        return [*out, note("No linearity table: `coact connect RUN` makes it."), ""]
    form = str(c.get("form", "seed"))
    taus: dict[str, float] = {f"τ = {c['tau']:g} (connect)": float(c["tau"])}
    tau_cal, form_cal = data.tau()
    if tau_cal is not None and form_cal == form:
        taus[f"τ = {tau_cal:.3g} (calibrated)"] = tau_cal
    out.append(
        fig.figure(
            connect_charts.d_distribution(f, form, taus, int(c["tokens_heldout"])),
            "d-distribution",
            "Read: features left of a dashed τ are linear at that τ; colour shows whether d's "
            "95% interval lies wholly below τ (linear), above it (nonlinear) or across it.",
        )
    )
    out += ["", "The linear share of alive output features at each threshold:", ""]
    rows = [_share_row(f"{c['tau']:g} ({form}, connect stage)", c)]
    if data.calibrate is not None:
        k = data.calibrate
        rows.append(_share_row(f"{k['tau']:.3g} ({k['form']}, calibrated)", k["linear_calibrated"]))
        connect_is_seed = abs(float(c["tau"]) - 0.001) < 1e-12 and form == "seed"
        if not connect_is_seed:
            rows.append(_share_row("0.001 (seed, the seed study's)", k["linear_seed_tau"]))
    out.append(
        md_table(
            [
                "τ (form)",
                "linear",
                "nonlinear",
                "dead",
                "alive",
                "% linear",
                "% linear beyond noise (at least – at most)",
            ],
            rows,
        )
    )
    out += [
        "",
        "The seed study (Pythia-70m-deduped, 3072-feature SAEs, τ = 0.001) found 78.8 / 95.9 / "
        "97.8 / 98.0 / 98.9% linear for MLP layers 1–5; other models and SAEs need not match.",
        "",
    ]
    return out


def _share_row(name: str, s: Mapping[str, Any]) -> list[str]:
    bracket = "–"
    if "percent_linear_confident" in s:
        bracket = f"{s['percent_linear_confident']:.1f}% – {s['percent_linear_possible']:.1f}%"
    return [
        name,
        num(s["linear"]),
        num(s["nonlinear"]),
        num(s["dead"]),
        num(s["alive"]),
        f"{s['percent_linear']:.1f}%",
        bracket,
    ]


POSITION_KEYS = {
    "linear": "same_position",
    "nonlinear": "needs_context",
    "percent_linear": "percent_same_position",
    "percent_linear_confident": "percent_same_position_confident",
    "percent_linear_possible": "percent_same_position_possible",
}


def _block_tau(data: RunData) -> tuple[float, str, str]:
    """(τ, form, where it comes from) that attention's shares are read at."""
    b = data.attention or data.block or data.positions or {}
    tau, form = float(b.get("tau", 0.001)), str(b.get("form", "seed"))
    if data.attention_calibration is not None:
        return tau, form, f"calibrated at {data.attn_out_site}"
    cal, _ = data.tau()
    same = cal is not None and abs(cal - tau) <= 1e-12 * max(1, tau)
    return tau, form, "the MLP's calibrated τ" if same else "set"


def _attention_threshold(data: RunData, fig: Figures) -> list[str]:
    """Attention's own calibration: its τ curve, as the MLP's section draws the MLP's."""
    k = data.attention_calibration
    directory = data.run_dir / "attention" / "calibrate"
    splices = data.attention_splices
    if k is None or splices is None or not splices.filter(pl.col("tau").is_not_null()).height:
        return []
    spec = load_spec(directory / "threshold.vl.json")
    chart = spec or calibrate_charts.threshold_curve(
        splices, float(k["tau"]), float(k["tolerance"])
    )
    line = (
        f"Attention's τ = {float(k['tau']):.3g} is calibrated like the MLP's, at "
        f"`{data.attn_out_site}`: the largest threshold whose splice (least squares for the "
        f"features under it, the mlp for the rest) costs at most ε = {float(k['tolerance']):g} "
        f"nats per token more than the all-mlp splice, on {int(k['n_tokens']):,} tokens of "
        f"{int(k['n_contexts'])} held-out contexts."
    )
    return [
        line,
        "",
        fig.figure(
            chart,
            "attention-threshold",
            "Read: τ is the rightmost point whose extra loss, and that of every point left of "
            "it, stays under the dashed ε line.",
        ),
        "",
    ]


def attention_section(data: RunData, fig: Figures, token_text: TokenText) -> list[str]:
    """Attention of the block: its connectors' loss and linearity at attention's own τ, and
    how much its features need earlier positions."""
    a, p = data.attention, data.positions
    out = ["## Attention", ""]
    if a is None and p is None:
        return [*out, note("Attention was not analysed: `coact analyze --block` does it."), ""]
    tau, form, where = _block_tau(data)
    in_site, out_site = data.attn_in_site, data.attn_out_site
    out += [
        f"Attention of block {data.layer} reads `{in_site}` and writes `{out_site}`. The same "
        f"connectors as the MLP's, fitted on the same tokens (same position: the features at "
        f"token t from those at t), and read at τ = {tau:.3g} ({form} form, {where}). "
        "Attention also reads earlier positions: the position score below says how much "
        "they add.",
        "",
    ]
    out += _attention_threshold(data, fig)
    rows = []
    if a is not None:
        held = int(a["tokens_heldout"])
        families = [
            ("sparse linear (chosen α)", a.get("heldout_nmse_sparse")),
            ("least squares (no L1)", a.get("heldout_nmse_linear")),
            ("mlp (no L1)", a.get("heldout_nmse_mlp")),
        ]
        out.append(
            fig.figure(
                connect_charts.family_losses(
                    [(n, float(v)) for n, v in families if v is not None],
                    held,
                    "Attention connector families",
                ),
                "attention-families",
                "Read: how much of each attention feature the same-position features explain; "
                "the gap between least squares and the mlp is what nonlinearity adds, and a "
                "loss near 1 means the feature depends on other positions or on nothing here.",
            )
        )
        if data.attention_features is not None:
            out.append(
                fig.figure(
                    connect_charts.d_distribution(
                        data.attention_features, form, {f"τ = {tau:.3g} ({where})": tau}, held
                    ),
                    "attention-d-distribution",
                    "Read: attention features left of the dashed τ are linear in the "
                    "same-position features; colour: d's 95% interval below τ, above it or "
                    "across it.",
                )
            )
        rows.append(_share_row(f"linear at τ = {tau:.3g} ({form})", a))
    if p is not None:
        shares = {k: p.get(v) for k, v in POSITION_KEYS.items() if v in p}
        rows.append(_share_row("same position (gain ≤ τ)", {**p, **shares}))
    out += [
        "",
        md_table(
            [
                "share of alive attention features",
                "yes",
                "no",
                "dead",
                "alive",
                "% yes",
                "% yes beyond noise (at least – at most)",
            ],
            rows,
        ),
        "",
        "Linear: d = MSE_lin − MSE_mlp ≤ τ. Same position: the gain from earlier positions "
        "(MSE of the same-position ridge fit − MSE of one that also reads the previous "
        "token and a decayed sum of the ones before, each with λ per feature chosen on "
        "validation contexts) ≤ τ. The bracket counts the features "
        "whose 95% interval lies below τ (at least) and those whose interval does not lie "
        "above it (at most).",
        "",
    ]
    if p is not None and data.positions_table is not None:
        out += _positions_part(data, fig, token_text, tau, form)
    out += _causal_part(data, fig)
    return out


def _causal_part(data: RunData, fig: Figures) -> list[str]:
    """The position score's causal counterpart: resampled earlier tokens and self-only
    attention per feature, and how often they agree with the predictive verdict."""
    c, table = data.attention_causal, data.attention_causal_table
    if c is None or table is None:
        return []
    r, s = c["resample"], c["self_only"]
    out = [
        "### Causal check: does attention use earlier tokens?",
        "",
        f"The position score above is predictive. Here the model is run with what attention "
        f"reads at every earlier token but BOS taken from another text (**resampled**), and "
        f"with every head attending only to its own token (**self-only**), on "
        f"{int(c['contexts'])} held-out contexts. A feature counts as context-free when its "
        f"FVU under the intervention is ≤ {float(r['threshold']):g}: "
        f"{float(r['percent_context_free']):.1f}% of {int(r['alive']):,} alive features "
        f"under resampling, {float(s['percent_self_only']):.1f}% under self-only attention "
        f"(median FVU {float(r['median_resample_fvu']):.3g} and "
        f"{float(s['median_self_only_fvu']):.3g}). Self-only attention also removes what "
        "heads read from the BOS sink, so it loses more than resampling.",
        "",
    ]
    agreement = c.get("agreement")
    if agreement:
        rows = [
            ["same position", str(agreement["same_position_context_free"]),
             str(agreement["same_position_uses_context"])],
            ["needs context", str(agreement["needs_context_context_free"]),
             str(agreement["needs_context_uses_context"])],
        ]  # fmt: skip
        out += [
            md_table(["predictive verdict", "context-free (resampled)", "uses context"], rows),
            "",
        ]
        if "gain_fvu" in table.columns:
            out.append(
                fig.figure(
                    block_charts.position_causal(
                        table, float(r["threshold"]), int(c["contexts"]), int(c.get("targets", 8))
                    ),
                    "position-causal",
                    "Read: features in the lower left are same-position by both measures, "
                    "those in the upper right need earlier tokens by both; red points below "
                    "the line are predicted to need context but do not change when it does.",
                )
            )
            out.append("")
    return out


def attention_page_name(feature: int) -> str:
    """The page of attention feature j (docs/features/attn-<j>.md; output features'
    pages are out-<j>)."""
    return f"attn-{int(feature)}"


def _attention_link(fig: Figures, j: int, text: str) -> str:
    """`text` linked to attention feature j's page where the report wrote one (build_report
    writes the attention pages before the layer page; `fig` writes into docs/charts/)."""
    name = attention_page_name(j)
    if not (fig.dir.parent / "features" / f"{name}.md").is_file():
        return text
    return f'<a href="features/{name}.html">{text}</a>'


def _positions_part(
    data: RunData, fig: Figures, token_text: TokenText, tau: float, form: str
) -> list[str]:
    from coact.report.select import position_ranking

    p, table = data.positions or {}, data.positions_table
    assert table is not None
    out = ["### Which attention features need earlier positions", ""]
    out.append(
        fig.figure(
            block_charts.position_gains(table, form, tau, p.get("tokens_heldout")),
            "position-gains",
            "Read: features right of τ gain from earlier positions (attention moves "
            "information to them); those left of 0 gain nothing, the wider fit only overfits.",
        )
    )
    column = base_charts.GAIN_COLUMN.get(form, "gain_seed")
    top = position_ranking(data, form).head(10)
    verdicts: dict[int, str] = {}
    if data.attention_features is not None:
        f = data.attention_features
        verdicts = dict(zip(f["feature"].to_list(), f["verdict"].to_list(), strict=True))
    slug = Site.parse(data.attn_out_site).slug
    carriers = {"previous": "previous token", "decayed": "further back (decayed)"}
    resampled: dict[int, float] = {}
    if data.attention_causal_table is not None:
        t = data.attention_causal_table
        resampled = dict(zip(t["feature"].to_list(), t["resample_fvu"].to_list(), strict=True))
    rows = []
    for r in top.iter_rows(named=True):
        j = int(r["feature"])
        cells: list[Cell] = [
            (_attention_link(fig, j, f"attn {j}") + outlier_mark(data, slug, j), j),
            (
                f"{num(r[column])} [{num(r[column + '_low'])}, {num(r[column + '_high'])}]",
                sort_key(r[column]),
            ),
            (str(r["verdict"]), r["verdict"]),
            (carriers.get(str(r["carrier"]), "–"), r["carrier"] or ""),
            (num(r.get("gain_previous_alone_fvu")), sort_key(r.get("gain_previous_alone_fvu"))),
            (num(r.get("gain_decayed_alone_fvu")), sort_key(r.get("gain_decayed_alone_fvu"))),
            (num(r["active_count"]), r["active_count"]),
            (num(resampled.get(j)), sort_key(resampled.get(j))),
            (verdicts.get(j, "–"), verdicts.get(j, "")),
            (token_text(slug, j), None),
        ]
        if data.outliers is not None:
            cells.append(outlier_cell(data, slug, j))
        rows.append(cells)
    headers = [
        "feature",
        f"gain ({form} form, 95% interval)",
        "verdict",
        "carrier",
        "previous token alone (/ variance)",
        "decayed context alone (/ variance)",
        "active tokens",
        "FVU with earlier tokens resampled",
        "same-position linear verdict",
        "top tokens",
    ]
    if data.outliers is not None:
        headers.append("artefact?")
    summaries = ", ".join(p.get("summaries") or [])
    out += [
        "",
        f"The {top.height} attention features (of `{data.attn_out_site}`) whose fit gains most "
        f"from earlier positions ({summaries}; decay {p.get('decay', '–')}, window "
        f"{p.get('window', '–')} tokens). Carrier: the summary that alone recovers more of the "
        "gain, for features that need context. Sortable; a linked feature has a page.",
        "",
        html_table(headers, rows, sortable=True),
        "",
    ]
    return out


DECODED = {
    "identity_raw": "the block's exact identity on raw activations: near 0 says the sites "
    "are captured right",
    "identity_decoded": "the same sum, each source replaced by its SAE's reconstruction: the "
    "error the three source SAEs add together",
    "composition_decoded": "the next stream's SAE decoding the composition connector's "
    "predicted codes: how much of the stream the feature-level composition gives back",
    "target_sae": "the next stream's SAE reconstructing it: the floor the decoded composition "
    "cannot beat",
}


def composition_section(data: RunData, fig: Figures, graphs: GraphWriter | None) -> list[str]:
    """The next residual stream's features from the block's three sources: fit, variance
    share per source, the decoded checks and a few next-stream features' graphs."""
    c = data.composition
    out = ["## Residual composition", ""]
    if c is None:
        return [
            *out,
            note("The residual composition was not fitted: `coact analyze --block` fits it."),
            "",
        ]
    sources = [str(s) for s in c["sources"]]
    target = str(c["target"])
    per_source = c.get("weights_per_output_by_source") or {}
    out += [
        f"`{target}` = `{'` + `'.join(sources)}` holds exactly in activations; here each "
        f"`{target}` feature is fitted as a sparse linear mix of the sources' features (exact "
        f"L1 path on their codes side by side, refitted on the chosen support), with least "
        f"squares on every input as the ceiling. Chosen α = {c['alpha']:.3g} (elbow, "
        f"{int(c['alpha_index']) + 1} of {c['n_alphas']}), "
        f"{c['weights_per_output']:.1f} weights per feature ("
        + ", ".join(f"{k} {v:.1f}" for k, v in per_source.items())
        + f"); {c['alive']:,} alive and {c['dead']:,} dead features; "
        f"{c['tokens_train']:,} training and {c['tokens_heldout']:,} held-out tokens.",
        "",
    ]
    shares = {
        name: c.get(key) or {}
        for name, key in (
            ("least squares, training tokens", "variance_share_ls"),
            ("least squares, held-out tokens", "variance_share_ls_heldout"),
            ("sparse refit, training tokens", "variance_share_refit"),
        )
    }
    out += [
        md_table(
            ["fit", "measured on", "R²"],
            [
                ["sparse (chosen α)", "held-out tokens", num(c.get("r2_sparse"))],
                ["sparse, refitted by least squares", "held-out tokens", num(c.get("r2_refit"))],
                ["least squares on every input", "held-out tokens", num(c.get("r2_ls"))],
                ["least squares on every input", "training tokens", num(c.get("r2_ls_train"))],
            ],
        ),
        "",
        "R² is the mean over alive features of 1 − MSE / variance; a least-squares fit far "
        "better on training than on held-out tokens overfits its many inputs.",
        "",
        md_table(
            ["variance share (mean over features)", *[f"`{s}`" for s in sources]],
            [[name, *(num(v.get(s)) for s in sources)] for name, v in shares.items()],
        ),
        "",
    ]
    if data.composition_table is not None:
        out.append(
            fig.figure(
                block_charts.composition_shares(data.composition_table, sources, target),
                "composition-shares",
                "Read: the colours split what the fit explains of each feature among the "
                "sources; a wide block of one colour means many features come mostly from "
                "that source, a short stack means the features are poorly explained.",
            )
        )
    if data.composition_sweep is not None and data.composition_sweep.height:
        out.append(
            fig.figure(
                connect_charts.lasso_path(
                    data.composition_sweep, int(c["tokens_heldout"]), "Residual composition"
                ),
                "composition-lasso-path",
                "Read: the chosen α (dashed) sits where the held-out loss stops falling; "
                "left of it more weights fit noise.",
            )
        )
    if data.decoded is not None and data.decoded.height:
        out += [
            "",
            "### Decoded checks (activation space)",
            "",
            md_table(
                ["check", "what is compared with the true next stream", "FVU", "tokens"],
                [
                    [
                        f"`{r['check']}`",
                        DECODED.get(str(r["check"]), str(r.get("what") or "")),
                        num(r["fvu"], ".4g"),
                        num(r["tokens"]),
                    ]
                    for r in data.decoded.iter_rows(named=True)
                ],
            ),
            "",
            "FVU: the fraction of the true next stream's variance (about its mean) left "
            "unexplained, on raw activations of the evaluation contexts.",
            "",
        ]
    if graphs is not None and data.composition_table is not None:
        out += _next_stream_graphs(data, fig, graphs, sources, target)
    return out


def _next_stream_graphs(
    data: RunData,
    fig: Figures,
    graphs: GraphWriter,
    sources: Sequence[str],
    target: str,
    count: int = 3,
) -> list[str]:
    """Layer graphs of the next-stream features the MLP writes most into."""
    table = data.composition_table
    assert table is not None
    mlp = [s for s in sources if Site.parse(s).kind == "mlp_out"]
    if not mlp:
        return []
    kind = Site.parse(mlp[0]).kind
    key = f"share_refit_{kind}" if f"share_refit_{kind}" in table.columns else f"share_ls_{kind}"
    ranked = (
        table.filter(pl.col("status") != "dead")
        .filter(pl.col(key).is_finite())
        .sort([key, "feature"], descending=[True, False])
    )
    # prefer features the graph can follow through the MLP: some MLP feature that writes
    # them has inputs in the MLP's connector (many next-stream features merely copy one
    # MLP feature that the sparse connector leaves without inputs)
    readable: set[int] = set()
    cw = data.composition_weights
    if cw is not None and data.weights is not None and data.weights.height:
        names = [n for n in cw["source_site"].unique().to_list() if Site.parse(n).kind == kind]
        read = data.weights["output"].unique().to_list()
        readable = set(
            cw.filter(pl.col("source_site").is_in(names) & pl.col("in_feature").is_in(read))[
                "out_feature"
            ].to_list()
        )
    preferred = ranked.filter(pl.col("feature").is_in(list(readable))).head(count)
    rest = ranked.filter(~pl.col("feature").is_in(preferred["feature"].to_list()))
    chosen = pl.concat([preferred, rest.head(count - preferred.height)])
    if not chosen.height:
        return []
    slug = Site.parse(target).slug
    out = [
        "### Layer graphs of the next stream's features",
        "",
        f"The {chosen.height} `{target}` features with the largest share from `{mlp[0]}` "
        "(sparse refit) among those written by an MLP feature that has inputs in the MLP's "
        "sparse connector, each with the features that feed it through the block, two hops "
        "back.",
        "",
    ]
    for r in chosen.iter_rows(named=True):
        j = int(r["feature"])
        out += [
            f"#### `{target}` #{j}{outlier_text(data, slug, j)}: "
            f"{pct(r[key])} of its variance from the MLP",
            "",
        ]
        out += graphs.section(data, target, j, "in", fig, f"graph-{slug.replace('.', '-')}-{j}")
    return out


def calibration_section(data: RunData, fig: Figures) -> list[str]:
    out = ["## Calibration of τ against the model's loss", ""]
    k = data.calibrate
    if k is None:
        return [*out, note("τ was not calibrated: `coact calibrate RUN` measures it."), ""]
    directory = data.run_dir / "calibrate"
    if data.noise is not None and data.noise.height:
        spec = load_spec(directory / "noise.vl.json")
        out.append(
            fig.figure(
                spec
                if spec is not None
                else calibrate_charts.noise_curves(data.noise, data.out_site),
                "noise",
                "Read: how many nats of next-token loss each size of error costs; if the "
                "SAE-shaped curve lies above the isotropic one, error along feature directions "
                "hurts more.",
            )
        )
    if data.splices is not None and data.splices.filter(pl.col("tau").is_not_null()).height:
        spec = load_spec(directory / "threshold.vl.json")
        chart = spec or calibrate_charts.threshold_curve(
            data.splices, float(k["tau"]), float(k["tolerance"])
        )
        out.append(
            fig.figure(
                chart,
                "threshold",
                "Read: τ is the rightmost point whose extra loss, and that of every point left of "
                "it, stays under the dashed ε line.",
            )
        )
    if data.splices is not None and data.splices.height:
        out.append(
            fig.figure(
                calibrate_charts.splices(data.splices),
                "splices",
                "Read: a splice near zero costs the model nothing; compare linear and mlp with "
                "the SAE's own reconstruction (the floor) and with zero ablation (the ceiling).",
            )
        )
        named = data.splices.filter(pl.col("tau").is_null())
        out += [
            "",
            md_table(
                [
                    "splice",
                    "CE spliced (nats)",
                    "ΔCE (nats, 95% interval)",
                    "KL (nats)",
                    "CE recovered",
                    "tokens",
                ],
                [
                    [
                        r["splice"],
                        num(r["ce_spliced"], ".4f"),
                        f"{r['delta_ce']:+.4f} "
                        f"[{r['delta_ce_low']:+.4f}, {r['delta_ce_high']:+.4f}]",
                        num(r["kl"], ".4f"),
                        pct(r["ce_recovered"]),
                        num(r["n_tokens"]),
                    ]
                    for r in named.iter_rows(named=True)
                ],
            ),
            "",
        ]
    if data.causal is not None and data.causal.height:
        ca = k.get("causal") or {}
        out.append(
            fig.figure(
                calibrate_charts.causal(data.causal),
                "causal",
                "Read: points on the diagonal are connections whose formula predicts the model's "
                "own change; points in the wrong quadrant have the wrong sign.",
            )
        )
        if ca:
            out += [
                "",
                f"Of {ca['judged']:,} judged connections (of {ca['connections']:,} checked), the "
                f"sign agrees for {pct(ca['share_sign_agrees'], 0)}, the size within 2× for "
                f"{pct(ca['share_size_agrees'], 0)}, both for {pct(ca['share_both_agree'], 0)}.",
            ]
    out.append("")
    return out


def logic_section(data: RunData, fig: Figures, pages: set[int]) -> list[str]:
    out = ["## Logic labels", ""]
    g = data.logic
    if g is None or data.labels is None:
        return [*out, note("Features were not labelled: `coact logic RUN` labels them."), ""]
    out.append(
        fig.figure(
            logic_charts.label_counts(g["counts"], g.get("hidden_counts"), g.get("tokens")),
            "label-counts",
            "Read: how many features each computation explains; UNEXPLAINED features fire "
            "mostly without their inputs or follow no clean rule.",
        )
    )
    labels = data.labels.filter(pl.col("label") != "DEAD")
    rows = []
    for label in LABEL_ORDER:
        best = labels.filter(pl.col("label") == label).sort(
            ["confidence", "n_active"], descending=True
        )
        for r in best.head(3).iter_rows(named=True):
            j = int(r["output"])
            name = f"out {j}"
            shown = (
                f'<a href="features/{feature_page_name(j)}.html">{name}</a>' if j in pages else name
            ) + outlier_mark(data, data.out_slug, j)
            rows.append(
                [
                    (label, label),
                    (shown, j),
                    (flag_inputs(data, html.escape(describe_label(r)), r.get("inputs")), None),
                    (num(r["confidence"], ".2f"), r["confidence"]),
                    (num(r["n_active"]), r["n_active"]),
                ]
            )
    out += [
        "",
        "The most confident features of each label:",
        "",
        html_table(["label", "feature", "computation", "confidence", "active tokens"], rows, True),
        "",
    ]
    return out


def flag_inputs(data: RunData, text: str, inputs: Iterable[int] | None) -> str:
    """`text` (HTML) with a ⚠ mark after each `in i` that is a flagged input feature."""
    for i in inputs or []:
        mark = outlier_mark(data, data.in_slug, int(i))
        if mark:
            text = re.sub(rf"\bin {int(i)}\b", f"in {int(i)}" + mark.replace("\\", "\\\\"), text)
    return text


def outliers_section(data: RunData, pages: set[int]) -> list[str]:
    out = ["## Outlier features (possible artefacts)", ""]
    summary, table = data.outlier_summary, data.outliers
    if table is None:
        return [*out, note("No outlier check: `coact outliers RUN` runs it."), ""]
    cfg = (summary or {}).get("config") or {}
    k, share = cfg.get("first_positions", 4), cfg.get("share", 0.5)
    out += [
        f"A feature is flagged ({OUTLIER} in every table, the reason in its tooltip) when at "
        f"least {pct(share, 0)} of the tokens it fires on, with at least "
        f"{cfg.get('min_active', 10)} of them, are one kind of token where models park "
        "attention or norm rather than meaning:",
        "",
        f"- **first tokens**: positions 1 to {k - 1} of a context (BOS, position 0, is not "
        "stored): attention-sink positions;",
        f"- **first delimiter**: the first newline, period or comma of its context (decided by "
        f"the token's text, {cfg.get('delimiters', '')!r} with spaces aside);",
        f"- **high norm**: tokens whose activation norm at the site exceeds "
        f"{cfg.get('norm_factor', 10):g}× the site's median (massive activations), the norm "
        "being that of the SAE's reconstruction from the stored codes.",
        "",
    ]
    rows = []
    for slug, s in ((summary or {}).get("sites") or {}).items():
        base = s.get("base_rates") or {}
        share_of_alive = s["flagged"] / s["alive"] if s.get("alive") else None
        rows.append(
            [
                f"`{slug}`",
                num(s.get("alive")),
                num(s.get("judged")),
                f"{num(s.get('flagged'))} ({pct(share_of_alive)})",
                num(s.get("first_tokens")),
                num(s.get("first_delimiter")),
                num(s.get("high_norm")) if s.get("norm") != "unknown" else "unknown",
                " / ".join(
                    pct(base.get(kind), 2)
                    for kind in ("first_tokens", "first_delimiter", "high_norm")
                ),
            ]
        )
    if rows:
        out += [
            md_table(
                [
                    "site",
                    "alive features",
                    "judged",
                    "flagged (of alive)",
                    "first tokens",
                    "first delimiter",
                    "high norm",
                    "share of all stored tokens that are first / first delimiter / high norm",
                ],
                rows,
            ),
            "",
        ]
    flagged = table.filter(pl.col("outlier")).sort(["site", "n_active"], descending=[False, True])
    if not flagged.height:
        return [*out, "No feature is flagged.", ""]
    cells = []
    for r in flagged.iter_rows(named=True):
        j, slug = int(r["feature"]), str(r["site"])
        name = f"{'out' if slug == data.out_slug else 'in'} {j}"
        if slug == data.out_slug and j in pages:
            name = f'<a href="features/{feature_page_name(j)}.html">{name}</a>'
        name += outlier_mark(data, slug, j)
        cells.append(
            [
                (html.escape(slug), slug),
                (name, j),
                (num(r["n_active"]), r["n_active"]),
                (pct(r["share_first_tokens"], 0), sort_key(r["share_first_tokens"])),
                (pct(_finite(r["share_first_delimiter"]), 0), sort_key(r["share_first_delimiter"])),
                (pct(_finite(r["share_high_norm"]), 0), sort_key(r["share_high_norm"])),
                (html.escape(str(r["reason"])), r["reason"]),
            ]
        )
    table_html = html_table(
        [
            "site",
            "feature",
            "active tokens",
            "first tokens",
            "first delimiter",
            "high norm",
            "reason",
        ],
        cells,
        sortable=True,
    )
    out += [
        f"<details><summary>The {flagged.height:,} flagged features (click to open; sortable)"
        f"</summary>{table_html}</details>",
        "",
    ]
    return out


def _finite(value: Any) -> Any:
    return value if value is not None and math.isfinite(float(value)) else None


def describe_label(row: Mapping[str, Any]) -> str:
    """`in 12 OR in 40`, `in 3 AND NOT in 9`, … (the label's reading of a feature)."""
    inputs = [f"in {i}" for i in row.get("inputs") or []]
    label = row["label"]
    if label in ("OR", "AND", "WEIGHTED-SUM"):
        return {"OR": " OR ", "AND": " AND ", "WEIGHTED-SUM": " + "}[label].join(inputs) or label
    if label == "A-AND-NOT-B":
        negated = row.get("negated")
        rest = [f"in {i}" for i in row.get("inputs") or [] if i != negated]
        return " AND ".join(rest) + (f" AND NOT in {negated}" if negated is not None else "")
    return f"{label} (inputs: {', '.join(inputs) or 'none'})"


def features_table(
    data: RunData,
    featured: Mapping[int, list[str]] | None,
    pages: set[int],
    prefix: str,
) -> str:
    """A sortable table of output features (the featured ones, or all when None)."""
    f = data.features
    assert f is not None
    labels: dict[int, dict[str, Any]] = {}
    if data.labels is not None:
        labels = {int(r["output"]): r for r in data.labels.iter_rows(named=True)}
    calibrated: dict[int, str] = {}
    if data.calibrated is not None:
        calibrated = dict(
            zip(
                data.calibrated["feature"].to_list(),
                data.calibrated["verdict"].to_list(),
                strict=True,
            )
        )
    wanted = f if featured is None else f.filter(pl.col("feature").is_in(list(featured)))
    if featured is not None:
        order = {j: i for i, j in enumerate(featured)}
        wanted = wanted.sort(pl.col("feature").replace_strict(order, default=len(order)))
    headers = [
        "feature",
        "verdict",
        "d (seed form)",
        "d / variance",
        "active tokens",
        "sparse NMSE",
        "terms",
        "label",
        "confidence",
        "formula",
    ]
    if data.outliers is not None:
        headers.append("artefact?")
    if data.calibrated is not None:
        headers.insert(2, "at calibrated τ")
    if featured is not None:
        headers.append("why shown")
    rows = []
    for r in wanted.iter_rows(named=True):
        j = int(r["feature"])
        name = f"out {j}"
        shown = f'<a href="{prefix}{feature_page_name(j)}.html">{name}</a>' if j in pages else name
        shown += outlier_mark(data, data.out_slug, j)
        lab = labels.get(j, {})
        row: list[Cell] = [
            (shown, j),
            (str(r.get("verdict") or r.get("status")), r.get("verdict") or r.get("status")),
            (num(r["d_seed"]), sort_key(r["d_seed"])),
            (num(r["d_fvu"]), sort_key(r["d_fvu"])),
            (num(r["active_count"]), r["active_count"]),
            (num(r.get("nmse_sparse")), sort_key(r.get("nmse_sparse"))),
            (num(r.get("n_terms")), r.get("n_terms")),
            (str(lab.get("label", "–")), lab.get("label", "")),
            (num(lab.get("confidence"), ".2f"), sort_key(lab.get("confidence"))),
            (_formula_html(str(r.get("formula") or "")), None),
        ]
        if data.outliers is not None:
            row.append(outlier_cell(data, data.out_slug, j))
        if data.calibrated is not None:
            row.insert(2, (calibrated.get(j, "–"), calibrated.get(j, "")))
        if featured is not None:
            row.append((html.escape("; ".join(featured[j])), None))
        rows.append(row)
    return html_table(headers, rows, sortable=True)


def sort_key(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def all_features_page(data: RunData, pages: set[int]) -> str:
    out = [
        f"# All output features of {data.out_site}",
        "",
        f"[Back to layer {data.layer}]({layer_page_name(data)}.md). Click a column header to "
        "sort; features with a page are linked. d is MSE_lin − MSE_mlp on held-out tokens; the "
        "verdict compares its 95% interval with τ. ⚠ marks a possible artefact (an outlier "
        "feature: hover for the reason; the layer page says how they are found).",
        "",
    ]
    if data.features is None:
        return "\n".join([*out, note("No linearity table: `coact connect RUN` makes it.")])
    out.append(features_table(data, None, pages, prefix="features/"))
    out.append("")
    return "\n".join(out)
