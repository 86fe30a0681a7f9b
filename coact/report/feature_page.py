"""An output feature's page: formula, inputs with their examples, its layer graph (block
runs), top contexts and what each preceding token contributes (context ablation),
histogram, linearity, logic label with its truth table and co-activations, causal check;
artefact (outlier) flags throughout. Attention features' pages are `attention_page`'s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from coact.report import feature_parts
from coact.report.ablation_section import ablation_section
from coact.report.contributions import contributions_chart, input_contributions
from coact.report.feature_jacobian import agreement_part, jacobian_formula, jacobian_verdict
from coact.report.feature_logic import logic_section
from coact.report.feature_parts import (
    PageParts,
    table_row,
)
from coact.report.layer_graphs import GraphWriter
from coact.report.markdown import md_table, note, num
from coact.report.outlier_marks import outlier_text, outlier_warning
from coact.rundir.read import RunData

CAUSAL_COLUMNS = {  # the causal check's table: the columns a feature page shows, as headed
    "weight_refit": "refit weight",
    "n_tokens": "tokens",
    "actual_mean": "actual change",
    "predicted_mean": "predicted (formula)",
    "predicted_lsq_mean": "predicted (least squares)",
    "predicted_mlp_mean": "predicted (mlp)",
    "corr": "correlation",
    "sign_agrees": "sign agrees",
    "size_agrees": "size within 2×",
    "judged": "judged",
}


def feature_page(parts: PageParts, j: int, reasons: Sequence[str]) -> str:
    """One output feature: formula, inputs with their examples, its layer graph (block
    runs, drawn by `graphs`), top contexts, histogram, linearity, logic label with its
    truth table and co-activations, causal check. `model`: a link to the model report."""
    data, evidence, fig, token_text = parts.data, parts.evidence, parts.fig, parts.token_text
    graphs, model = parts.graphs, parts.model
    row = table_row(data.features, j)
    assert row is not None
    lab = table_row(data.labels, j, "output")
    title = f"out {j}"
    if lab is not None:
        title += f": {lab['label']} (confidence {lab['confidence']:.2f})"
    out = [
        f"# {title}",
        "",
        f"Feature {j} of `{data.out_site}` (written by the MLP of block {data.layer}). "
        f"Shown because: {'; '.join(reasons)}. " + feature_parts.page_links(data, model),
        "",
    ]
    out += outlier_warning(data, data.out_slug, j, f"out {j}", "formula and label")
    out += [
        "## Formula",
        "",
        "The sparse linear connector at the chosen α, its coefficients refitted by least squares "
        "on its inputs" + (", beside how strongly it fires and what its inputs add" if evidence
                            else "") + ":",
        "",
        feature_parts.formula_beside(row, f"out {j}", _small_charts(parts, j)),
        "",
        *jacobian_formula(data, j),
        "## Inputs",
        "",
        *feature_parts.inputs_part(
            data, data.weights, j, data.in_site, evidence, token_text,
            lab=lab, logic=True, needs=data.ablation is not None,
        ),
    ]  # fmt: skip
    if graphs is not None:
        out += _graph_section(parts, j, graphs)
    out += ["## Evidence: where it fires", ""]
    if evidence is None:
        codes = data.layout.codes.name
        out += [note(f"No feature codes in the run ({codes}/): no contexts or histogram."), ""]
    else:
        out += feature_parts.evidence_part(
            evidence, data.out_slug, j, f"out {j}", "out", fig, data, histogram=False
        )
    out += ablation_section(data, data.out_slug, j, f"out {j}", fig)
    out += _linearity_section(data, j, row)
    out += logic_section(data, j, lab, evidence, fig)
    out += _causal_section(data, j)
    return "\n".join(out)


def _small_charts(parts: PageParts, j: int) -> list[str]:
    """Beside the formula: the activation histogram and what each input adds (connector
    and Jacobian), where the run has codes."""
    data, evidence, fig = parts.data, parts.evidence, parts.fig
    if evidence is None:
        return []
    name = f"out {j}"
    charts = [feature_parts.histogram_figure(evidence, data.out_slug, j, name, "out", fig, True)]
    table = input_contributions(data, evidence, j)
    if table.height:
        charts.append(
            fig.figure(
                contributions_chart(table, name),
                f"out-{j}-contributions",
                "Read: how much each input moves it where both fire (mean code units); the "
                "connector's bar is its refitted weight times the input's code, the Jacobian's "
                "the block's own slope times it: bars that differ mean the formula misreads "
                "that input.",
            ).strip()
        )
    return charts


def _graph_section(parts: PageParts, j: int, graphs: GraphWriter) -> list[str]:
    """Which features of the block feed out j, and which it feeds (next-stream features
    through the residual composition in a block run; else the MLP's other outputs that
    read the same inputs); a click on a node opens its page."""
    data = parts.data
    if data.has_block:
        what = (
            f"the features of `{data.in_site}` the MLP reads to write it, the "
            f"`{data.next_site}` features it feeds through the residual composition"
        )
    else:
        what = (
            f"the features of `{data.in_site}` the MLP reads to write it and the other "
            "outputs that read them (the MLP's connector only: `--block` adds attention and "
            "the next stream)"
        )
    out = [
        "## Layer graph",
        "",
        f"out {j} in its block: {what}, and one hop further each way (the {graphs.top} "
        "strongest connections of each feature and hop; the exported tables hold the drawn "
        "connections with their weights). Click an output feature to open its page (or, "
        "without one, its line in the feature browser).",
        "",
    ]
    return out + graphs.section(
        data, data.out_site, j, "both", parts.fig, f"out-{j}-graph", "../", parts.node_link
    )


def _linearity_section(data: RunData, j: int, row: Mapping[str, Any]) -> list[str]:
    """d with its intervals, the verdict at the connect stage's τ and at the calibrated
    and the seed's τ."""
    out = [
        "## Linearity",
        "",
        *feature_parts.linearity_part(row, "Verdict at the connect stage's τ: "),
    ]
    r = table_row(data.calibrated, j)
    if r is not None:
        tau, form = data.tau()
        out += [
            f"At the calibrated τ = {num(tau)} ({form} form): **{r['verdict']}**; at the "
            f"seed's τ = 0.001: {r['seed_verdict']}.",
            "",
        ]
    return out + jacobian_verdict(data, j)


def _causal_section(data: RunData, j: int) -> list[str]:
    """Each input of out j ablated in the model: the actual change against the formula's,
    least squares' and the mlp's prediction."""
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
    table = [
        [f"in {r['input']}{outlier_text(data, data.in_slug, int(r['input']))}"]
        + [num(r[column]) for column in CAUSAL_COLUMNS]
        for r in rows.iter_rows(named=True)
    ]
    out += [
        "Each input ablated in the stream the MLP reads, at the tokens where it fires: the "
        "model's actual mean change of this feature against the formula's prediction −w·code "
        "(and the least-squares and mlp connectors' predictions).",
        "",
        md_table(["input", *CAUSAL_COLUMNS.values()], table),
        "",
    ]
    return out + agreement_part(data, j)
