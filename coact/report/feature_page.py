"""A feature's page: formula, inputs with their examples, top contexts and what each
preceding token contributes (context ablation), histogram, linearity, logic label with
its truth table and co-activations, causal check; artefact (outlier) flags throughout."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import polars as pl

from coact import charts
from coact.report import figures
from coact.report.data import RunData
from coact.report.embed import Figures
from coact.report.evidence import Evidence, context_html, contexts_table
from coact.report.pages import (
    Cell,
    GraphWriter,
    describe_label,
    html_table,
    layer_page_name,
    md_table,
    note,
    num,
    outlier_cell,
    outlier_mark,
    outlier_text,
    pct,
    sort_key,
)

MATTERS = 0.25  # a preceding token "matters" when ablating it removes this share or more


def feature_page(
    data: RunData,
    j: int,
    reasons: Sequence[str],
    evidence: Evidence | None,
    fig: Figures,
    token_text: Callable[[str, int], str],
    graphs: GraphWriter | None = None,
    model: str | None = None,
) -> str:
    """One output feature: formula, inputs with their examples, its layer graph (block
    runs, drawn by `graphs`), top contexts, histogram, linearity, logic label with its
    truth table and co-activations, causal check. `model`: a link to the model report."""
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
        f"[Layer {data.layer}](../{layer_page_name(data)}.md) · [all features](../features.md)"
        + (f' · <a href="{html.escape(model, True)}">the model report</a>' if model else ""),
        "",
    ]
    reason = data.outlier_reason(data.out_slug, j)
    if reason is not None:
        out += [
            '!!! warning "Possible artefact (outlier feature)"',
            f"    out {j} fires mostly on tokens where models park attention or norm ({reason} "
            "of its active tokens; see the layer page's outlier section). Read its formula "
            "and label with that in mind.",
            "",
        ]
    out += [
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
    if graphs is not None and data.has_block:
        out += _graph_section(data, j, graphs, fig)
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
    out += ablation_section(data, data.out_slug, j, f"out {j}", fig)
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
        cells: list[Cell] = []
        if data.outliers is not None:
            cells.append(outlier_cell(data, data.in_slug, i))
        if data.ablation is not None:
            cells.append((input_needs(data, i), None))
        rows.append(
            [
                (f"in {i}{outlier_mark(data, data.in_slug, i)}", i),
                (num(w["weight_refit"]) if w else "–", sort_key(w["weight_refit"]) if w else ""),
                (num(w["standardised"]) if w else "–", sort_key(w["standardised"]) if w else ""),
                (num(w.get("in_both")) if w else "–", None),
                (html.escape(where), None),
                (token_text(data.in_slug, i), None),
                (examples or "–", None),
                *cells,
            ]
        )
    out += [
        f"Inputs are features of `{data.in_site}`: the connector's terms by |refitted weight| "
        "(standardised: |w|·std(in)/std(out); stable: kept with the same sign when refitted on "
        "each half of the tokens), then inputs the logic stage added. Their top tokens and top "
        "contexts (colour: the input's own activation) show what each reads"
        + (
            "; *needs*: per top context, the preceding token whose replacement (context "
            "ablation) lowers the input most, how far back, and the share lost."
            if data.ablation is not None
            else "."
        ),
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
                *(["artefact?"] if data.outliers is not None else []),
                *(["needs (ablation)"] if data.ablation is not None else []),
            ],
            rows,
            sortable=False,
        ),
        "",
    ]
    return out


def _graph_section(data: RunData, j: int, graphs: GraphWriter, fig: Figures) -> list[str]:
    """Which features of the block feed out j, and which next-stream features it feeds."""
    nxt = data.next_site
    out = [
        "## Layer graph",
        "",
        f"out {j} in its block: the features of `{data.in_site}` the MLP reads to write it, "
        f"the `{nxt}` features it feeds through the residual composition, and one hop further "
        f"each way (the {graphs.top} strongest connections of each feature and hop; the "
        "exported tables hold the drawn connections with their weights).",
        "",
    ]
    return out + graphs.section(data, data.out_site, j, "both", fig, f"out-{j}-graph", "../")


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
        f"**{lab['label']}**: `{describe_label(lab)}`"
        + _flagged_inputs(data, inputs)
        + f", confidence {lab['confidence']:.2f} (share "
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
                    (num(r["p_active"], ".2f"), sort_key(r["p_active"])),
                    (
                        num(r["mean_activation_when_active"]),
                        sort_key(r["mean_activation_when_active"]),
                    ),
                    ("yes" if r["observed"] else "no (too few tokens)", None),
                ]
            )
        out += [
            "Truth table: each token falls in the row of the inputs active on it (● active).",
            "",
            html_table(
                [
                    *(f"in {i}{outlier_text(data, data.in_slug, i)}" for i in inputs),
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
                    f"in {r['input']}{outlier_text(data, data.in_slug, int(r['input']))}",
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


def _flagged_inputs(data: RunData, inputs: Sequence[int]) -> str:
    """' (⚠ possible artefacts among its inputs: in 3 (first tokens 80%))' or ''."""
    flagged = [
        f"in {i} ({reason})"
        for i in inputs
        if (reason := data.outlier_reason(data.in_slug, int(i))) is not None
    ]
    return f" (⚠ possible artefacts among its inputs: {', '.join(flagged)})" if flagged else ""


def _preferred_mode(rows: pl.DataFrame) -> str:
    """Replacing keeps every other token in place, so it is read first when present."""
    modes = set(rows["mode"].to_list())
    return "replace" if "replace" in modes else "remove"


def _best_per_context(rows: pl.DataFrame, mode: str) -> pl.DataFrame:
    """Per top context (rank), the ablated token of largest drop in `mode`."""
    return (
        rows.filter(pl.col("mode") == mode)
        .sort(["drop", "ablated_offset"], descending=[True, False])
        .group_by("rank", maintain_order=True)
        .first()
        .sort("rank")
    )


def _tok(text: Any) -> str:
    return html.escape(repr(str(text))) if text is not None else "?"


def input_needs(data: RunData, i: int, contexts: int = 2) -> str:
    """For an input's inputs-table cell: per top context, the preceding token whose
    ablation lowers it most, e.g. `'"' −1: 92%`."""
    assert data.ablation is not None
    rows = data.ablation.filter((pl.col("site") == data.in_slug) & (pl.col("feature") == i))
    if not rows.height:
        return "–"
    best = _best_per_context(rows, _preferred_mode(rows)).head(contexts)
    return "<br>".join(
        f"{_tok(r['ablated_token'])} −{r['ablated_offset']}: {pct(r['drop_fraction'], 0)}"
        for r in best.iter_rows(named=True)
    )


def ablation_section(data: RunData, slug: str, j: int, name: str, fig: Figures) -> list[str]:
    """The context-ablation chart of a feature's top contexts and what it says."""
    out = ["### Which preceding tokens it needs (context ablation)", ""]
    if data.ablation is None:
        return [*out, note("No context ablation: `coact ablate RUN` runs it."), ""]
    rows = data.ablation.filter((pl.col("site") == slug) & (pl.col("feature") == j))
    if not rows.height:
        return [
            *out,
            f"{name} was not among the ablated features (`coact ablate RUN --feature {j}` "
            "adds it).",
            "",
        ]
    summary = data.ablation_summary or {}
    filler = summary.get("filler")
    window = int(rows["ablated_offset"].to_numpy().max())
    n = rows["rank"].n_unique()
    out += [
        f"Each of the {window} tokens before the activating token of its top {n} contexts "
        "was, one at a time, removed (later tokens move one place left) or replaced by "
        f"{_tok(filler)} (nothing moves); the model was rerun up to `{slug}` and {name} "
        "re-encoded at the activating token. Drop = clean − ablated activation, in the chart "
        "as a share of the clean one. Removing a token also changes the distance to every "
        "earlier token, so a drop under removal alone points at position, not content.",
        "",
        fig.figure(
            figures.ablation_drops(rows, name, filler),
            f"{slug.replace('.', '-').replace('_', '-')}-{j}-ablation",
            "Read: a red cell is a token the feature needs (the activation falls without it); "
            "a row with no red cell fires on the activating token itself or on longer context.",
        ),
    ]
    mode = _preferred_mode(rows)
    best = _best_per_context(rows, mode)
    verb = "replacing" if mode == "replace" else "removing"
    top = best.sort("drop_fraction", descending=True).row(0, named=True)
    if float(top["drop_fraction"]) < MATTERS:
        out.append(
            f"**No single preceding token matters much**: {verb} any of the {window} before it "
            f"removes at most {pct(top['drop_fraction'], 0)} of the activation "
            f"({_tok(top['ablated_token'])}, {top['ablated_offset']} before, top context "
            f"{top['rank']}). {name} fires on the activating token itself or on longer context."
        )
    else:
        texts = best["ablated_token"].to_list()
        counts = {t: texts.count(t) for t in texts}
        first = best.row(0, named=True)
        token = max(counts, key=lambda t: (counts[t], t == first["ablated_token"]))
        same = best.filter(pl.col("ablated_token") == token)
        out.append(
            f"**Most important preceding token: {_tok(token)}**: {verb} it "
            f"lowers {name} most in {same.height} of {best.height} top contexts, by "
            f"{pct(same['drop_fraction'].mean(), 0)} on average ("
            + ", ".join(
                f"top context {r['rank']}: {r['ablated_offset']} before, "
                f"{pct(r['drop_fraction'], 0)}"
                for r in same.iter_rows(named=True)
            )
            + ")."
        )
    out += ["", "Per top context, the token whose ablation lowers it most:", ""]
    per_mode = {
        m: _best_per_context(rows, m) for m in ("replace", "remove") if m in set(rows["mode"])
    }
    contexts = (
        rows.select("rank", "context", "position", "token", "clean").unique("rank").sort("rank")
    )
    table = []
    for r in contexts.iter_rows(named=True):
        cells = [
            str(r["rank"]),
            f"context {r['context']}, position {r['position']}",
            _tok(r["token"]),
            num(r["clean"]),
        ]
        for b in per_mode.values():
            hit = b.filter(pl.col("rank") == r["rank"])
            if hit.height:
                h = hit.row(0, named=True)
                cells.append(
                    f"{_tok(h['ablated_token'])} ({h['ablated_offset']} before): "
                    f"{num(h['drop'])} ({pct(h['drop_fraction'], 0)})"
                )
            else:
                cells.append("–")
        table.append(cells)
    headers = ["rank", "where", "activating token", "clean activation"]
    headers += [f"largest drop when {m}d" for m in per_mode]
    out += [md_table(headers, table), ""]
    return out
