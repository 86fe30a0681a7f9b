"""A feature's page: formula, inputs with their examples, top contexts and what each
preceding token contributes (context ablation), histogram, linearity, logic label with
its truth table and co-activations, causal check; artefact (outlier) flags throughout.

In a block run, attention features get pages too (`attention_page`): the same-position
connector (formula, inputs, d at attention's τ), where it fires, the position score, the
causal check of earlier tokens and the layer graph."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import polars as pl

from coact.models.sites import Site
from coact.report.charts import base as base_charts
from coact.report.charts import evidence as evidence_charts
from coact.report.charts import logic as logic_charts
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
from coact.report.select import attention_form
from coact.rundir.read import RunData

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
    out = [
        f"# {title}",
        "",
        f"Feature {j} of `{data.out_site}` (written by the MLP of block {data.layer}). "
        f"Shown because: {'; '.join(reasons)}. " + _links(data, model),
        "",
    ]
    out += _outlier_warning(data, data.out_slug, j, f"out {j}", "formula and label")
    out += [
        "## Formula",
        "",
        "The sparse linear connector at the chosen α, its coefficients refitted by least squares "
        "on its inputs:",
        "",
        *_formula_part(row, f"out {j}"),
    ]
    out += _inputs_section(data, j, lab, evidence, token_text)
    if graphs is not None and data.has_block:
        out += _graph_section(data, j, graphs, fig)
    out += ["## Evidence: where it fires", ""]
    if evidence is None:
        out += [note("No feature codes in the run (codes/): no contexts or histogram."), ""]
    else:
        out += _evidence_part(evidence, data.out_slug, j, f"out {j}", "out", fig)
    out += ablation_section(data, data.out_slug, j, f"out {j}", fig)
    out += _linearity_section(data, j, row)
    out += _logic_section(data, j, lab, evidence, fig)
    out += _causal_section(data, j)
    return "\n".join(out)


def _links(data: RunData, model: str | None) -> str:
    """A feature page's links: its layer, every feature, the model report (if any)."""
    return (
        f"[Layer {data.layer}](../{layer_page_name(data)}.md) · [all features](../features.md)"
        + (f' · <a href="{html.escape(model, True)}">the model report</a>' if model else "")
    )


def _outlier_warning(data: RunData, slug: str, j: int, name: str, read: str) -> list[str]:
    """The warning box of a feature flagged as an outlier (nothing for others); `read`
    names what to read with that in mind."""
    reason = data.outlier_reason(slug, j)
    if reason is None:
        return []
    return [
        '!!! warning "Possible artefact (outlier feature)"',
        f"    {name} fires mostly on tokens where models park attention or norm ({reason} "
        f"of its active tokens; see the layer page's outlier section). Read its {read} "
        "with that in mind.",
        "",
    ]


def _formula_part(row: Mapping[str, Any], name: str) -> list[str]:
    """A connector's formula (`name = …`) and its summary: held-out loss, terms, verdict."""
    formula = str(row.get("formula") or f"{name} = 0")
    stored, _, terms = formula.partition(" = ")
    if terms and stored != name:  # connect names every target "out j"
        formula = f"{name} = {terms}"
    return [
        "```text",
        formula,
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
                    str(row.get("verdict") or row.get("status")),
                    num(row.get("active_count")),
                ]
            ],
        ),
        "",
    ]


def _evidence_part(
    evidence: Evidence, slug: str, j: int, name: str, prefix: str, fig: Figures
) -> list[str]:
    """A feature's top contexts from the code store and the histogram of its activations
    (chart `<prefix>-<j>-histogram`)."""
    top = evidence.top_contexts(slug, j, k=8)
    vmax = top[0].activation if top else 0.0
    values = evidence.activations(slug, j)
    return [
        f"The {len(top)} largest activations of {name}, one per context; colour: its "
        f"activation on each token relative to its maximum {vmax:.3g} (hover for values).",
        "",
        contexts_table(top, vmax, name),
        "",
        fig.figure(
            evidence_charts.activation_histogram(values, name, evidence.n_tokens),
            f"{prefix}-{j}-histogram",
            "Read: the spread of its activations; a long right tail means the top contexts "
            "above are exceptional, a bump near zero means it mostly fires weakly.",
        ),
        "",
    ]


def _inputs_section(
    data: RunData,
    j: int,
    lab: Mapping[str, Any] | None,
    evidence: Evidence | None,
    token_text: Callable[[str, int], str],
) -> list[str]:
    return [
        "## Inputs",
        "",
        *_inputs_part(
            data, data.weights, j, data.in_site, evidence, token_text,
            lab=lab, logic=True, needs=data.ablation is not None,
        ),
    ]  # fmt: skip


def _inputs_part(
    data: RunData,
    weights_table: pl.DataFrame | None,
    j: int,
    in_site: str,
    evidence: Evidence | None,
    token_text: Callable[[str, int], str],
    *,
    lab: Mapping[str, Any] | None = None,
    logic: bool = False,
    needs: bool = False,
) -> list[str]:
    """The inputs table of output j of a connector (`weights_table`: its weights.parquet)
    reading `in_site`: its strongest terms, then (`logic`: a labelled site) the inputs its
    logic label `lab` added, each with its top tokens and contexts; `needs`: a column of
    what each input needs (context ablation)."""
    out: list[str] = []
    in_slug = Site.parse(in_site).slug
    weights = pl.DataFrame()
    if weights_table is not None:
        weights = weights_table.filter(pl.col("output") == j).sort(
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
        if evidence is not None and in_slug in evidence.store.sites:
            contexts = evidence.top_contexts(in_slug, i, k=3, before=8, after=2)
            vmax = contexts[0].activation if contexts else 0.0
            examples = "<br>".join(context_html(c, vmax) for c in contexts)
        cells: list[Cell] = []
        if data.outliers is not None:
            cells.append(outlier_cell(data, in_slug, i))
        if needs:
            cells.append((input_needs(data, i, in_slug), None))
        rows.append(
            [
                (f"in {i}{outlier_mark(data, in_slug, i)}", i),
                (num(w["weight_refit"]) if w else "–", sort_key(w["weight_refit"]) if w else ""),
                (num(w["standardised"]) if w else "–", sort_key(w["standardised"]) if w else ""),
                (num(w.get("in_both")) if w else "–", None),
                (html.escape(where), None),
                (token_text(in_slug, i), None),
                (examples or "–", None),
                *cells,
            ]
        )
    out += [
        f"Inputs are features of `{in_site}`: the connector's terms by |refitted weight| "
        "(standardised: |w|·std(in)/std(out); stable: kept with the same sign when refitted on "
        "each half of the tokens)"
        + (", then inputs the logic stage added" if logic else "")
        + ". Their top tokens and top "
        "contexts (colour: the input's own activation) show what each reads"
        + (
            "; *needs*: per top context, the preceding token whose replacement (context "
            "ablation) lowers the input most, how far back, and the share lost."
            if needs
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
                *(["needs (ablation)"] if needs else []),
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


def _d_table(row: Mapping[str, Any]) -> str:
    """d in its three forms, each with its 95% interval over contexts."""
    rows = []
    for name, col in (("raw", "d"), ("/ variance", "d_fvu"), ("seed form", "d_seed")):
        rows.append(
            [
                f"d ({name})",
                num(row.get(col)),
                f"[{num(row.get(col + '_low'))}, {num(row.get(col + '_high'))}]",
            ]
        )
    return md_table(["d(j) = MSE_lin − MSE_mlp", "value", "95% interval over contexts"], rows)


def _linearity_section(data: RunData, j: int, row: Mapping[str, Any]) -> list[str]:
    out = ["## Linearity", ""]
    out += [
        f"MSE of least squares {num(row.get('mse_linear'))}, of the mlp "
        f"{num(row.get('mse_mlp'))} (held-out tokens, code units²; variance "
        f"{num(row.get('variance'))}). Verdict at the connect stage's τ: "
        f"**{row.get('verdict') or row.get('status')}**"
        + (f" ({row.get('status')} at the point estimate)." if row.get("verdict") else "."),
        "",
        _d_table(row),
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
            spec = logic_charts.coactivation(frame, inputs, j, title).to_dict()
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
                    logic_charts.cluster_summary(modes, f"out {j}: co-activation modes"),
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


# ------------------------------------------------------------------------ attention pages

POSITION_VERDICTS = {
    "same_position": "its interval lies below τ: earlier positions add nothing the token's own "
    "features do not already give",
    "needs_context": "its interval lies above τ: earlier positions explain part of it that the "
    "token's own features cannot",
    "undecided": "its interval straddles τ: the held-out tokens cannot tell",
    "dead": "it never fires on the held-out tokens",
}
CARRIERS = {"previous": "the previous token", "decayed": "further back (the decayed sum)"}


def _finite(value: Any) -> float | None:
    """A float, or None for a missing or NaN value."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _row(table: pl.DataFrame | None, j: int, column: str = "feature") -> dict[str, Any] | None:
    if table is None:
        return None
    hit = table.filter(pl.col(column) == j)
    return hit.row(0, named=True) if hit.height else None


def attention_page(
    data: RunData,
    j: int,
    reasons: Sequence[str],
    evidence: Evidence | None,
    fig: Figures,
    token_text: Callable[[str, int], str],
    graphs: GraphWriter | None = None,
    model: str | None = None,
) -> str:
    """One attention feature of a block run (a feature of data.attn_out_site): where it
    fires, the same-position connector from data.attn_in_site (formula, inputs, d at
    attention's τ), the position score, the causal check of earlier tokens and its layer
    graph (drawn by `graphs`). Parts the run lacks are left out with a note."""
    site, slug, name = data.attn_out_site, Site.parse(data.attn_out_site).slug, f"attn {j}"
    row = _row(data.attention_features, j)
    position = _row(data.positions_table, j)
    active = next(
        (r["active_count"] for r in (row, position) if r is not None and "active_count" in r),
        None,
    )
    reason = data.outlier_reason(slug, j)
    flag = "–" if data.outliers is None else (f"⚠ {reason}" if reason else "no")
    out = [
        f"# {name}",
        "",
        f"Feature {j} of `{site}` (written by the attention of block {data.layer}). Shown "
        f"because: {'; '.join(reasons)}. " + _links(data, model),
        "",
        md_table(
            ["feature", "site", "active tokens", "artefact? (outlier flag)"],
            [[name, f"`{site}`", num(active), flag]],
        ),
        "",
    ]
    out += _outlier_warning(data, slug, j, name, "formula and position score")
    out += _attention_evidence(data, j, slug, name, evidence, fig, token_text)
    out += _attention_connector(data, j, row, name, evidence, token_text)
    out += _position_score(data, j, position, name)
    out += _attention_causal(data, j, name)
    if graphs is not None and data.attention_weights is not None:
        nxt = data.next_site if data.composition is not None else None
        out += [
            "## Layer graph",
            "",
            f"{name} in its block: the features of `{data.attn_in_site}` its same-position "
            "connector reads"
            + (f", the `{nxt}` features it feeds through the residual composition" if nxt else "")
            + f", and one hop further each way (the {graphs.top} strongest connections of each "
            "feature and hop; the exported tables hold the drawn connections with their "
            "weights). Only same-position connections are drawn: what attention brings from "
            "earlier tokens is the position score's, above.",
            "",
        ]
        out += graphs.section(data, site, j, "both", fig, f"attn-{j}-graph", "../")
    return "\n".join(out)


def _attention_evidence(
    data: RunData,
    j: int,
    slug: str,
    name: str,
    evidence: Evidence | None,
    fig: Figures,
    token_text: Callable[[str, int], str],
) -> list[str]:
    """Its top tokens (connect's table), its top contexts and histogram (the code store),
    and its context ablation where the run has one."""
    out = ["## Evidence: where it fires", ""]
    stored = pl.DataFrame()
    if data.attention_top_tokens is not None:
        t = data.attention_top_tokens
        mine = (pl.col("site") == slug) if "site" in t.columns else pl.lit(True)
        stored = t.filter(mine & (pl.col("feature") == j)).sort("rank")
    if stored.height:
        tokens = token_text(slug, j)
        out += [f"Its top tokens (the attention connector's top_tokens): {tokens}.", ""]
    if evidence is not None and slug in evidence.store.sites:
        out += _evidence_part(evidence, slug, j, name, "attn", fig)
    else:
        out += [note("No codes of this site in the run (codes/): no contexts or histogram."), ""]
        if stored.height:
            out += [
                f"The largest activations of {name} the connect stage stored:",
                "",
                md_table(
                    ["rank", "token", "activation (code units)", "where"],
                    [
                        [
                            str(int(r["rank"]) + 1),
                            _tok(r.get("token")),
                            num(r["activation"]),
                            f"context {r.get('context', '–')}, position {r.get('position', '–')}",
                        ]
                        for r in stored.iter_rows(named=True)
                    ],
                ),
                "",
            ]
    if data.ablation is not None and data.ablation.filter(pl.col("site") == slug).height:
        out += ablation_section(data, slug, j, name, fig)
    return out


def _attention_connector(
    data: RunData,
    j: int,
    row: Mapping[str, Any] | None,
    name: str,
    evidence: Evidence | None,
    token_text: Callable[[str, int], str],
) -> list[str]:
    """The same-position connector: formula, strongest inputs, d at attention's τ."""
    out = ["## Same-position connector", ""]
    if row is None:
        return [*out, note("No same-position connector of attention in this run."), ""]
    in_site = data.attn_in_site
    a = data.attention or {}
    form = attention_form(data)
    tau = _finite(a.get("tau"))
    where = f"calibrated at `{data.attn_out_site}`" if data.attention_calibration else "set"
    out += [
        f"{name} from the features of `{in_site}` at the same token (what attention would write "
        "if it read no other position): the sparse linear connector at the chosen α, its "
        "coefficients refitted by least squares on its inputs:",
        "",
        *_formula_part(row, name),
        *_inputs_part(
            data, data.attention_weights, j, in_site, evidence, token_text,
            needs=data.ablation is not None
            and data.ablation.filter(pl.col("site") == Site.parse(in_site).slug).height > 0,
        ),
    ]  # fmt: skip
    column = base_charts.D_COLUMN.get(form, "d_seed")
    verdict = row.get("verdict") or row.get("status")
    at = f"τ = {num(tau)} ({form} form, {where})" if tau is not None else f"its τ ({form} form)"
    out += [
        "### Linearity at attention's τ",
        "",
        f"MSE of least squares {num(row.get('mse_linear'))}, of the mlp "
        f"{num(row.get('mse_mlp'))} (held-out tokens, code units²; variance "
        f"{num(row.get('variance'))}). d ({form} form) = {num(row.get(column))}, 95% interval "
        f"[{num(row.get(column + '_low'))}, {num(row.get(column + '_high'))}]; at attention's "
        f"{at}: **{verdict}**"
        + (f" ({row.get('status')} at the point estimate)." if row.get("verdict") else "."),
        "",
        _d_table(row),
        "",
    ]
    return out


def _position_score(
    data: RunData, j: int, position: Mapping[str, Any] | None, name: str
) -> list[str]:
    """How much earlier positions add to the same-position fit (the position score)."""
    out = ["## Position score: does it need earlier positions?", ""]
    if data.positions is None or data.positions_table is None:
        return [*out, note("No position score: `coact analyze --block` computes it."), ""]
    if position is None:
        return [*out, f"{name} has no row in the position score.", ""]
    from coact.report.select import position_ranking

    p = data.positions
    form = attention_form(data)
    column = base_charts.GAIN_COLUMN.get(form, "gain_seed")
    ranked = position_ranking(data, form)["feature"].to_list()
    rank = f"rank {ranked.index(j) + 1} of {len(ranked)}" if j in ranked else "not ranked"
    verdict = str(position.get("verdict") or position.get("status"))
    carrier = CARRIERS.get(str(position.get("carrier")), "–")
    summaries = ", ".join(p.get("summaries") or [])
    out += [
        f"The gain from earlier positions: MSE of the same-position ridge fit − MSE of one "
        f"that also reads the previous token and a decayed sum of the ones before ({summaries}; "
        f"decay {p.get('decay', '–')}, window {p.get('window', '–')} tokens), in the {form} "
        f"form, on held-out tokens, with its 95% interval over contexts; read at τ = "
        f"{num(_finite(p.get('tau')))}. Alone: the gain of each summary by itself (/ variance). "
        "Carrier: the summary that alone recovers more of the gain. Both fits are ridge "
        f"regressions, λ chosen for this feature on validation contexts (× the mean input "
        f"variance): same position {num(_finite(position.get('ridge_same')))}, with earlier "
        f"positions {num(_finite(position.get('ridge_context')))}.",
        "",
        md_table(
            [
                f"gain ({form} form)",
                "95% interval",
                "verdict",
                "carrier",
                "previous token alone (/ variance)",
                "decayed context alone (/ variance)",
                "rank by gain",
            ],
            [
                [
                    num(position.get(column)),
                    f"[{num(position.get(column + '_low'))}, "
                    f"{num(position.get(column + '_high'))}]",
                    verdict,
                    carrier,
                    num(position.get("gain_previous_alone_fvu")),
                    num(position.get("gain_decayed_alone_fvu")),
                    rank,
                ]
            ],
        ),
        "",
        f"Read: **{verdict.replace('_', ' ')}**: {POSITION_VERDICTS.get(verdict, verdict)}"
        + (f"; most of the gain comes from {carrier}." if carrier != "–" else "."),
        "",
    ]
    return out


def _attention_causal(data: RunData, j: int, name: str) -> list[str]:
    """The causal counterpart of the position score for this feature: its code with the
    earlier tokens resampled and with self-only attention (the layer page explains both)."""
    out = ["## Causal check: does it use earlier tokens?", ""]
    c, table = data.attention_causal, data.attention_causal_table
    if c is None or table is None:
        return [*out, note("No causal check of attention: `coact analyze --block` runs it."), ""]
    row = _row(table, j)
    if row is None:
        return [*out, f"{name} has no row in the causal check.", ""]
    threshold = _finite((c.get("resample") or {}).get("threshold"))
    fvu, kept = _finite(row.get("resample_fvu")), _finite(row.get("resample_kept"))
    own_fvu, own_kept = _finite(row.get("self_only_fvu")), _finite(row.get("self_only_kept"))
    out += [
        f"The model rerun on {num(c.get('contexts'))} held-out contexts with what attention "
        "reads at every earlier token but BOS taken from another text (**resampled**), and "
        "with every head attending only to its own token (**self-only**). FVU: the squared "
        f"change of {name}'s code / its variance; kept: Σ min(c, c′) / Σ c, the share of its "
        "mass (code units summed over tokens) that survives.",
        "",
        md_table(
            ["intervention", "tokens where it fires", "FVU", "mass kept"],
            [
                [
                    "earlier tokens resampled",
                    num(row.get("resample_active")),
                    num(fvu),
                    _share(kept),
                ],
                ["self-only attention", num(row.get("active")), num(own_fvu), _share(own_kept)],
            ],
        ),
        "",
    ]
    if kept is None or fvu is None:
        reading = f"it never fired on the resampled targets, so the check says nothing of {name}"
    else:
        reading = f"the code keeps {_share(kept)} of its mass (FVU {num(fvu)}"
        if threshold is not None:
            free = fvu <= threshold
            reading += (
                f", {'within' if free else 'above'} the context-free threshold "
                f"{num(threshold)}): {name} "
                + ("does not use" if free else "uses")
                + " the content of earlier tokens"
            )
        else:
            reading += ")"
    line = f"Read: earlier tokens resampled: {reading}."
    if own_kept is not None and own_fvu is not None:
        line += (
            f" Self-only attention keeps {_share(own_kept)} (FVU {num(own_fvu)}); it also "
            "removes what heads read from the BOS sink, so it loses more than resampling."
        )
    out += [line, ""]
    return out


def _share(value: float | None) -> str:
    return "–" if value is None else pct(value, 0)


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


def input_needs(data: RunData, i: int, slug: str | None = None, contexts: int = 2) -> str:
    """For an input's inputs-table cell: per top context, the preceding token whose
    ablation lowers it most, e.g. `'"' −1: 92%`; `slug`: the input's site (the MLP's
    input by default)."""
    assert data.ablation is not None
    slug = slug or data.in_slug
    rows = data.ablation.filter((pl.col("site") == slug) & (pl.col("feature") == i))
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
            evidence_charts.ablation_drops(rows, name, filler),
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
