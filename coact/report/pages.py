"""The report's pages as markdown (with raw HTML for charts, coloured contexts and sortable
tables): the run's index, the layer page, the table of all features, one page per feature.

Links written in raw HTML point at the built `.html` files (the site is built with
`use_directory_urls: false`, so it opens from the file system); markdown links point at
the `.md` sources and are checked by `mkdocs build --strict`."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import polars as pl

from coact import charts
from coact.report import figures
from coact.report.data import RunData
from coact.report.embed import Figures, load_spec
from coact.report.evidence import Evidence, context_html, contexts_table

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
            )
            rows.append(
                [
                    (label, label),
                    (shown, j),
                    (html.escape(describe_label(r)), None),
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
    if data.calibrated is not None:
        headers.insert(2, "at calibrated τ")
    if featured is not None:
        headers.append("why shown")
    rows = []
    for r in wanted.iter_rows(named=True):
        j = int(r["feature"])
        name = f"out {j}"
        shown = f'<a href="{prefix}{feature_page_name(j)}.html">{name}</a>' if j in pages else name
        lab = labels.get(j, {})
        row: list[Cell] = [
            (shown, j),
            (str(r.get("verdict") or r.get("status")), r.get("verdict") or r.get("status")),
            (num(r["d_seed"]), _key(r["d_seed"])),
            (num(r["d_fvu"]), _key(r["d_fvu"])),
            (num(r["active_count"]), r["active_count"]),
            (num(r.get("nmse_sparse")), _key(r.get("nmse_sparse"))),
            (num(r.get("n_terms")), r.get("n_terms")),
            (str(lab.get("label", "–")), lab.get("label", "")),
            (num(lab.get("confidence"), ".2f"), _key(lab.get("confidence"))),
            (_formula_html(str(r.get("formula") or "")), None),
        ]
        if data.calibrated is not None:
            row.insert(2, (calibrated.get(j, "–"), calibrated.get(j, "")))
        if featured is not None:
            row.append((html.escape("; ".join(featured[j])), None))
        rows.append(row)
    return html_table(headers, rows, sortable=True)


def _key(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def all_features_page(data: RunData, pages: set[int]) -> str:
    out = [
        f"# All output features of {data.out_site}",
        "",
        f"[Back to layer {data.layer}]({layer_page_name(data)}.md). Click a column header to "
        "sort; features with a page are linked. d is MSE_lin − MSE_mlp on held-out tokens; the "
        "verdict compares its 95% interval with τ.",
        "",
    ]
    if data.features is None:
        return "\n".join([*out, note("No linearity table: `coact connect RUN` makes it.")])
    out.append(features_table(data, None, pages, prefix="features/"))
    out.append("")
    return "\n".join(out)


# -------------------------------------------------------------------------------- feature


def feature_page(
    data: RunData,
    j: int,
    reasons: Sequence[str],
    evidence: Evidence | None,
    fig: Figures,
    token_text: Callable[[str, int], str],
) -> str:
    """One output feature: formula, inputs with their examples, top contexts, histogram,
    linearity, logic label with its truth table and co-activations, causal check."""
    assert data.features is not None
    row = data.features.filter(pl.col("feature") == j).row(0, named=True)
    lab = None
    if data.labels is not None:
        hit = data.labels.filter(pl.col("output") == j)
        lab = hit.row(0, named=True) if hit.height else None
    title = f"out {j}"
    if lab is not None:
        title += f": {lab['label']} (confidence {lab['confidence']:.2f})"
    verdict = row.get("verdict") or row.get("status")
    out = [
        f"# {title}",
        "",
        f"Feature {j} of `{data.out_site}` (written by the MLP of block {data.layer}). "
        f"Shown because: {'; '.join(reasons)}. "
        f"[Layer {data.layer}](../{layer_page_name(data)}.md) · [all features](../features.md)",
        "",
        "## Formula",
        "",
        "The sparse linear connector at the chosen α, its coefficients refitted by least squares "
        "on its inputs:",
        "",
        "```text",
        str(row.get("formula") or f"out {j} = 0"),
        "```",
        "",
        md_table(
            [
                "held-out NMSE (sparse)",
                "terms",
                "intercept",
                "stable terms",
                "linear verdict",
                "active tokens",
            ],
            [
                [
                    num(row.get("nmse_sparse")),
                    num(row.get("n_terms")),
                    num(row.get("intercept")),
                    pct(row.get("stable_share"), 0),
                    str(verdict),
                    num(row.get("active_count")),
                ]
            ],
        ),
        "",
    ]
    out += _inputs_section(data, j, lab, evidence, token_text)
    out += ["## Evidence: where it fires", ""]
    if evidence is None:
        out += [note("No feature codes in the run (codes/): no contexts or histogram."), ""]
    else:
        top = evidence.top_contexts(data.out_slug, j, k=8)
        vmax = top[0].activation if top else 0.0
        out += [
            f"The {len(top)} largest activations of out {j}, one per context; colour: its "
            f"activation on each token relative to its maximum {vmax:.3g} (hover for values).",
            "",
            contexts_table(top, vmax, f"out {j}"),
            "",
        ]
        values = evidence.activations(data.out_slug, j)
        out.append(
            fig.figure(
                figures.activation_histogram(values, f"out {j}", evidence.n_tokens),
                f"out-{j}-histogram",
                "Read: the spread of its activations; a long right tail means the top contexts "
                "above are exceptional, a bump near zero means it mostly fires weakly.",
            )
        )
        out.append("")
    out += _linearity_section(data, j, row)
    out += _logic_section(data, j, lab, evidence, fig)
    out += _causal_section(data, j)
    return "\n".join(out)


def _inputs_section(
    data: RunData,
    j: int,
    lab: Mapping[str, Any] | None,
    evidence: Evidence | None,
    token_text: Callable[[str, int], str],
) -> list[str]:
    out = ["## Inputs", ""]
    weights = pl.DataFrame()
    if data.weights is not None:
        weights = data.weights.filter(pl.col("output") == j).sort(
            pl.col("weight_refit").abs(), descending=True
        )
    inputs = [int(i) for i in weights["input"].to_list()] if weights.height else []
    extra = [int(i) for i in (lab or {}).get("inputs") or [] if int(i) not in inputs]
    shown = inputs[:6] + extra
    if not shown:
        return [*out, "It has no inputs in the sparse connector.", ""]
    by_input = {int(r["input"]): r for r in weights.iter_rows(named=True)} if weights.height else {}
    rows = []
    for i in shown:
        w = by_input.get(i)
        where = "connector" if w is not None else "logic (added from co-activations)"
        examples = ""
        if evidence is not None:
            contexts = evidence.top_contexts(data.in_slug, i, k=3, before=8, after=2)
            vmax = contexts[0].activation if contexts else 0.0
            examples = "<br>".join(context_html(c, vmax) for c in contexts)
        rows.append(
            [
                (f"in {i}", i),
                (num(w["weight_refit"]) if w else "–", _key(w["weight_refit"]) if w else ""),
                (num(w["standardised"]) if w else "–", _key(w["standardised"]) if w else ""),
                (num(w.get("in_both")) if w else "–", None),
                (html.escape(where), None),
                (token_text(data.in_slug, i), None),
                (examples or "–", None),
            ]
        )
    out += [
        f"Inputs are features of `{data.in_site}`: the connector's terms by |refitted weight| "
        "(standardised: |w|·std(in)/std(out); stable: kept with the same sign when refitted on "
        "each half of the tokens), then inputs the logic stage added. Their top tokens and top "
        "contexts (colour: the input's own activation) show what each reads.",
        "",
        html_table(
            [
                "input",
                "refit weight",
                "standardised",
                "stable",
                "from",
                "top tokens",
                "top contexts",
            ],
            rows,
            sortable=False,
        ),
        "",
    ]
    return out


def _linearity_section(data: RunData, j: int, row: Mapping[str, Any]) -> list[str]:
    out = ["## Linearity", ""]
    rows = []
    for name, col in (("raw", "d"), ("/ variance", "d_fvu"), ("seed form", "d_seed")):
        rows.append(
            [
                f"d ({name})",
                num(row.get(col)),
                f"[{num(row.get(col + '_low'))}, {num(row.get(col + '_high'))}]",
            ]
        )
    out += [
        f"MSE of least squares {num(row.get('mse_linear'))}, of the mlp "
        f"{num(row.get('mse_mlp'))} (held-out tokens, code units²; variance "
        f"{num(row.get('variance'))}). Verdict at the connect stage's τ: "
        f"**{row.get('verdict') or row.get('status')}**"
        + (f" ({row.get('status')} at the point estimate)." if row.get("verdict") else "."),
        "",
        md_table(["d(j) = MSE_lin − MSE_mlp", "value", "95% interval over contexts"], rows),
        "",
    ]
    if data.calibrated is not None:
        hit = data.calibrated.filter(pl.col("feature") == j)
        if hit.height:
            r = hit.row(0, named=True)
            tau, form = data.tau()
            out += [
                f"At the calibrated τ = {num(tau)} ({form} form): **{r['verdict']}**; at the "
                f"seed's τ = 0.001: {r['seed_verdict']}.",
                "",
            ]
    return out


def _pattern_cells(pattern: str) -> list[Cell]:
    return [("●" if bit == "1" else "○", bit) for bit in pattern]


def _logic_section(
    data: RunData,
    j: int,
    lab: Mapping[str, Any] | None,
    evidence: Evidence | None,
    fig: Figures,
) -> list[str]:
    out = ["## Logic label", ""]
    if data.logic is None:
        return [*out, note("Features were not labelled: `coact logic RUN` labels them."), ""]
    if lab is None:
        return [*out, "This feature has no row in logic/features.parquet.", ""]
    inputs = [int(i) for i in lab.get("inputs") or []]
    out += [
        f"**{lab['label']}**: `{describe_label(lab)}`, confidence {lab['confidence']:.2f} (share "
        f"of 200 bootstrap resamples of the tokens giving the same label), decided by the rule "
        f"*{lab['rule']}*.",
        "",
        md_table(
            [
                "active tokens",
                "active with no input active",
                "additivity s",
                "I(T; pattern) bits",
                "synergy bits",
                "modes where it fires",
                "modes where it is suppressed",
            ],
            [
                [
                    num(lab.get("n_active")),
                    num(lab.get("n_uncovered")),
                    f"{num(lab.get('additivity'))} ± {num(lab.get('additivity_se'))}",
                    num(lab.get("mi_pattern")),
                    num(lab.get("synergy")),
                    num(lab.get("n_clusters_fires")),
                    num(lab.get("n_clusters_suppressed")),
                ]
            ],
        ),
        "",
    ]
    table = (
        data.truth_tables.filter(pl.col("output") == j)
        if data.truth_tables is not None
        else pl.DataFrame()
    )
    if table.height and inputs:
        rows = []
        for r in table.iter_rows(named=True):
            rows.append(
                [
                    *_pattern_cells(str(r["pattern"])),
                    (num(r["count"]), r["count"]),
                    (num(r["n_active"]), r["n_active"]),
                    (num(r["p_active"], ".2f"), _key(r["p_active"])),
                    (num(r["mean_activation_when_active"]), _key(r["mean_activation_when_active"])),
                    ("yes" if r["observed"] else "no (too few tokens)", None),
                ]
            )
        out += [
            "Truth table: each token falls in the row of the inputs active on it (● active).",
            "",
            html_table(
                [
                    *(f"in {i}" for i in inputs),
                    "tokens",
                    f"out {j} active",
                    "P(active)",
                    "mean activation when active",
                    "observed",
                ],
                rows,
                sortable=True,
            ),
            "",
        ]
    if evidence is not None and inputs:
        frame, total = evidence.coactive(data.in_slug, data.out_slug, inputs, j)
        if frame.height:
            title = f"out {j} against its inputs: {describe_label(lab)}"
            spec = charts.coactivation(frame, inputs, j, title).to_dict()
            spec["title"]["subtitle"] = (
                f"{frame.height:,} of the {total:,} tokens where an input or the target is "
                "active (evenly spaced; activations in code units)"
            )
            out.append(
                fig.figure(
                    spec,
                    f"out-{j}-coactivation",
                    "Read: where the target (colour) is bright tells which inputs, alone or "
                    "together, make it fire; bright only where both are large suggests AND.",
                )
            )
    if data.clusters is not None:
        modes = data.clusters.filter(pl.col("output") == j)
        if modes.filter(pl.col("cluster") >= 0).height:
            out.append(
                fig.figure(
                    charts.cluster_summary(modes, f"out {j}: co-activation modes"),
                    f"out-{j}-modes",
                    "Read: each row is a typical pattern of input activations (HDBSCAN mode) "
                    "where the target fires, or where its inputs fire but it does not.",
                )
            )
    out.append("")
    return out


def _causal_section(data: RunData, j: int) -> list[str]:
    out = ["## Causal check", ""]
    if data.causal is None:
        return [*out, note("No causal check: `coact calibrate RUN` runs it."), ""]
    rows = data.causal.filter(pl.col("output") == j)
    if not rows.height:
        return [
            *out,
            f"None of its connections is among the {data.causal.height} strongest that were "
            "checked by ablating the input in the model.",
            "",
        ]
    out += [
        "Each input ablated in the stream the MLP reads, at the tokens where it fires: the "
        "model's actual mean change of this feature against the formula's prediction −w·code "
        "(and the least-squares and mlp connectors' predictions).",
        "",
        md_table(
            [
                "input",
                "refit weight",
                "tokens",
                "actual change",
                "predicted (formula)",
                "predicted (least squares)",
                "predicted (mlp)",
                "correlation",
                "sign agrees",
                "size within 2×",
                "judged",
            ],
            [
                [
                    f"in {r['input']}",
                    num(r["weight_refit"]),
                    num(r["n_tokens"]),
                    num(r["actual_mean"]),
                    num(r["predicted_mean"]),
                    num(r["predicted_lsq_mean"]),
                    num(r["predicted_mlp_mean"]),
                    num(r["corr"]),
                    num(r["sign_agrees"]),
                    num(r["size_agrees"]),
                    num(r["judged"]),
                ]
                for r in rows.iter_rows(named=True)
            ],
        ),
        "",
    ]
    return out
