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
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import polars as pl

from coact import charts
from coact.report import figures
from coact.report.data import RunData
from coact.report.embed import Figures, load_spec

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


# ---------------------------------------------------------------------------------- index


def index_page(data: RunData, fig: Figures, n_pages: int) -> str:
    s = data.summary or {}
    layer = layer_page_name(data)
    out = [
        f"# coact report: {data.model}, layer {data.layer}",
        "",
        f"How the SAE features that block {data.layer}'s MLP reads (`{data.in_site}`) turn "
        f"into the features it writes (`{data.out_site}`). Run directory: "
        f"`{data.run_dir}`; corpus `{data.config.get('corpus', '?')}`.",
        "",
        f"[The layer page](layer-{data.layer}.md) has the connectors, linearity, calibration "
        f"and logic labels; [all features](features.md) lists every output feature, and "
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
                figures.sae_training(data.sae_logs),
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


# ---------------------------------------------------------------------------------- layer


def layer_page(
    data: RunData, fig: Figures, featured: Mapping[int, list[str]], pages: set[int]
) -> str:
    c = data.connect
    out = [
        f"# Layer {data.layer}: {data.in_site} → {data.out_site}",
        "",
        "[Back to the run](index.md) · [all features](features.md)",
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
                    figures.mlp_curve(data.mlp_curve, c.get("tokens_train")),
                    "mlp-curve",
                    "Read: the validation loss should level off where training stopped; a gap "
                    "that widens means the mlp overfits, a curve still falling means more epochs "
                    "would add to d.",
                )
            )
        if data.sweep is not None and data.sweep.height:
            out.append(
                fig.figure(
                    figures.lasso_path(data.sweep, held),
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
                figures.family_losses(rows, held),
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
                    figures.pareto(data.sweep, held),
                    "pareto",
                    "Read: points on the grey frontier are the best trade-offs; the diamond (the "
                    "elbow) is where more weight stops buying much lower loss.",
                )
            )
            out.append("")
    out += linearity_section(data, fig)
    out += calibration_section(data, fig)
    out += logic_section(data, fig, pages)
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
            figures.d_distribution(f, form, taus, int(c["tokens_heldout"])),
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
                spec if spec is not None else charts.noise_curves(data.noise, data.out_site),
                "noise",
                "Read: how many nats of next-token loss each size of error costs; if the "
                "SAE-shaped curve lies above the isotropic one, error along feature directions "
                "hurts more.",
            )
        )
    if data.splices is not None and data.splices.filter(pl.col("tau").is_not_null()).height:
        spec = load_spec(directory / "threshold.vl.json")
        chart = spec or charts.threshold_curve(data.splices, float(k["tau"]), float(k["tolerance"]))
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
                figures.splices(data.splices),
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
                figures.causal(data.causal),
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
            figures.label_counts(g["counts"], g.get("hidden_counts"), g.get("tokens")),
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
